"""Memory-lean autograd ops: the probed convolution and lean companions with exact gradients."""
from .lean import lean_leaky_relu, lean_max_pool, lean_relu
from .conv import probed_conv
from .probes import probe_buckets_and_values, rank_for_ratio, sketch_nbytes, sketch_shape

__all__ = [
    "probed_conv",
    "sketch_shape",
    "sketch_nbytes",
    "rank_for_ratio",
    "probe_buckets_and_values",
    "lean_relu",
    "lean_leaky_relu",
    "lean_max_pool",
]
