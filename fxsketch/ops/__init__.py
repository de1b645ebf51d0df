"""fxsketch's autograd ops: the probed convolution, lean companions with exact gradients, Mem-AOP-GD layers."""
from .lean import lean_leaky_relu, lean_max_pool, lean_relu
from .conv import probed_conv
from .aop import AopMemory, aop_conv, aop_linear, reset_aop_memory
from .probes import probe_buckets_and_values, rank_for_ratio, sketch_nbytes, sketch_shape
from .chunked import chunked_conv
from .quant import (quant_batch_norm, quant_group_norm, quant_instance_norm, quant_layer_norm,  # noqa: E402
                    quant_norm_module)
from .qconv import quant_conv, quant_conv_transpose  # noqa: E402

__all__ = [
    "probed_conv",
    "sketch_shape",
    "sketch_nbytes",
    "rank_for_ratio",
    "probe_buckets_and_values",
    "lean_relu",
    "lean_leaky_relu",
    "lean_max_pool",
    "aop_linear",
    "aop_conv",
    "AopMemory",
    "reset_aop_memory",
    "quant_batch_norm",
    "quant_group_norm",
    "quant_instance_norm",
    "quant_layer_norm",
    "quant_norm_module",
    "chunked_conv",
    "quant_conv",
    "quant_conv_transpose",
]
