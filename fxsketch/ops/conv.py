"""probed_conv: a convolution whose backward estimates dW from a small sketch of its input.

The two heavy steps are torch custom ops, so that fake tensors, ``torch.compile`` and the
planner treat them as single ops with a shape function, not as the dozens of hashing and
scatter ops inside:

* ``fxsketch::probe_sketch``: Xbar = Z^T X (forward), saved instead of X;
* ``fxsketch::probe_weight_grad``: the unbiased dW estimate from dY and Xbar (backward).

Their real implementations run the Triton kernels on CUDA (:mod:`fxsketch.ops.triton_kernels`)
and the torch reference elsewhere (:mod:`fxsketch.ops.probed`); their fake implementations
give the output shapes and allocate the estimated workspace. The output, dX and db are torch's
own convolution and its backward. The seed is a 0-d tensor drawn once per forward, so nothing
here reads a value on fake tensors: the ops have no fake special case.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

from .probed import (ConvGeometry, _input_and_bias_grad, conv_geometry, dw_channel, dw_spatial, sketch,
                     sketch_workspace_nbytes, weight_grad_workspace_nbytes)
from .probes import check_rank_mode_probe, sketch_shape
from .triton_kernels import dw_spatial_triton, sketch_triton, use_triton

__all__ = ["probed_conv", "probe_sketch", "probe_weight_grad", "draw_seed"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@torch.library.custom_op("fxsketch::probe_sketch", mutates_args=())
def probe_sketch(x: torch.Tensor, seed: torch.Tensor, rank: int, mode: str, probe: str) -> torch.Tensor:
    """Xbar = Z^T X of a batched conv input x (N, C, *spatial) for the probes of ``seed``, a
    0-d int64 tensor: (N, C, rank) in spatial mode, (N, rank) in channel mode, in x's dtype."""
    fn = sketch_triton if use_triton(x) else sketch
    return fn(x, int(seed), rank, mode, probe)


@probe_sketch.register_fake
def _(x, seed, rank, mode, probe):
    _workspace(x, sketch_workspace_nbytes(x.shape, rank, mode))
    return x.new_empty(sketch_shape(x.shape, rank, mode))


@torch.library.custom_op("fxsketch::probe_weight_grad", mutates_args=())
def probe_weight_grad(dy: torch.Tensor, xbar: torch.Tensor, seed: torch.Tensor, rank: int, mode: str,
                      probe: str, x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                      dilation: Sequence[int], pad_left: Sequence[int], pad_right: Sequence[int],
                      groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The estimate of dW (``weight_shape``, in ``dtype``; fp32 accumulation) from the output
    gradient dy and the sketch xbar that :func:`probe_sketch` made with the same seed."""
    geo = ConvGeometry(tuple(stride), tuple(dilation), tuple(pad_left), tuple(pad_right), groups)
    args = (dy, xbar, int(seed), rank, probe)
    if mode == "spatial":
        fn = dw_spatial_triton if use_triton(dy) else dw_spatial
        dw = fn(*args, tuple(x_shape[2:]), tuple(weight_shape), geo)
    else:
        dw = dw_channel(*args, tuple(x_shape), tuple(weight_shape), geo)
    return dw.to(dtype).contiguous()


@probe_weight_grad.register_fake
def _(dy, xbar, seed, rank, mode, probe, x_shape, weight_shape, stride, dilation, pad_left,
      pad_right, groups, dtype):
    _workspace(dy, weight_grad_workspace_nbytes(x_shape, dy.shape, weight_shape, rank, mode))
    return dy.new_empty(weight_shape, dtype=dtype)


def _workspace(like: torch.Tensor, nbytes: int) -> None:
    """Allocate and drop the real op's estimated temporaries on fake tensors: the planner's step
    profiler runs fxsketch's fake implementations visibly (fxsketch.ops.visible), so the plan
    counts this workspace. (The probe ops read the seed's value and build sparse matrices, so
    unlike the lean ops they cannot run their real implementation on fake tensors.)"""
    tmp = like.new_empty(max(1, nbytes // like.element_size()))
    del tmp


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from torch's RNG (or ``generator``) as a 0-d int64 tensor: the probes' seed.

    A tensor, not an int: on fake tensors (planning) and under ``torch.compile`` it is a value
    nobody needs to read; the custom ops read it when they run for real.
    """
    return torch.randint(2**31 - 1, (), generator=generator)


class _ProbedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, rank, mode, probe, generator=None):
        ctx.geo = conv_geometry(tuple(weight.shape), stride, padding, dilation, groups)
        y = _CONV_FN[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        ctx.x_shape, ctx.has_bias = tuple(x.shape), bias is not None
        ctx.rank, ctx.mode, ctx.probe = rank, mode, probe
        if ctx.needs_input_grad[1]:
            # one draw from the caller's RNG: fresh probes every step, reproducible under manual_seed
            ctx.seed = draw_seed(generator)
            ctx.save_for_backward(probe_sketch(x, ctx.seed, rank, mode, probe), weight)
        else:
            ctx.seed = None
            ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: the dW estimate is not differentiable
            raise UnsupportedError(
                "fxsketch.ops.probed_conv does not support double backward (create_graph=True, e.g. "
                "a gradient penalty): its weight gradient is an estimate from a sketch. Plan without "
                "probes: optimize(..., methods=('lean', 'recompute')).")
        saved = ctx.saved_tensors
        weight, geo = saved[-1], ctx.geo
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = db = dw = None
        if need_dx or need_db:
            dx, db = _input_and_bias_grad(dy, ctx.x_shape, weight, ctx.has_bias, need_dx, need_db, geo)
        if need_dw:
            dw = probe_weight_grad(dy, saved[0], ctx.seed, ctx.rank, ctx.mode, ctx.probe, ctx.x_shape,
                                   tuple(weight.shape), geo.stride, geo.dilation, geo.pad_left,
                                   geo.pad_right, geo.groups, weight.dtype)
        return dx, dw, db if need_db else None, None, None, None, None, None, None, None, None


def probed_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                rank, mode="spatial", probe="gaussian", generator=None):
    """A 1d/2d/3d convolution (from ``weight.dim()``) with an unbiased, sketched dW.

    Takes every argument ``F.convNd`` takes; output, dX and db are torch's own, dW is estimated
    from a sketch of ``rank`` probe columns (mode="spatial": N x C x rank values saved; mode="channel":
    N x rank). Each call draws one integer seed from torch's default RNG (or ``generator``) when
    the weight needs a gradient, so results are reproducible under ``torch.manual_seed``.

    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    >>> probed_conv(x, w, padding="same", rank=16).shape
    torch.Size([2, 4, 8, 8])
    """
    check_rank_mode_probe(rank, mode, probe)
    if weight.dim() - 2 not in _CONV_FN:
        raise ValueError(f"weight must be 3-, 4- or 5-dimensional (1d/2d/3d conv), got shape {tuple(weight.shape)}")
    d = weight.dim() - 2
    if input.dim() not in (d + 1, d + 2):
        raise ValueError(f"a {d}d conv (weight {tuple(weight.shape)}) needs input of {d + 2} dims "
                         f"(N, C, *spatial) or {d + 1} unbatched, got input shape {tuple(input.shape)}")
    unbatched = input.dim() == d + 1
    x = input.unsqueeze(0) if unbatched else input
    y = _ProbedConv.apply(x, weight, bias, stride, padding, dilation, groups, rank, mode, probe, generator)
    return y.squeeze(0) if unbatched else y
