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

Under ``torch.compile`` the whole op is traced, without a graph break; the custom ops stay opaque
kernels. The seed is drawn by a third one, ``fxsketch::generator_draw`` (:func:`draw`), from the
private ``torch.Generator`` (``optimize(..., seed=)``; a generator cannot enter a graph, the op
takes its key) or from ``torch.default_generator``: at run time, in program order, the draws the
eager module makes. A traced ``randint`` would not do: AOTAutograd may recompute it in the
backward graph, a second draw, and the dW estimate would pair the sketch with other probes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from ._args import traceable

from .probed import (ConvGeometry, _input_and_bias_grad, conv_geometry, dw_channel, dw_spatial, sketch,
                     sketch_workspace_nbytes, weight_grad_workspace_nbytes)
from .probes import check_rank_mode_probe, sketch_shape
from .triton_kernels import dw_spatial_triton, sketch_triton, use_triton

__all__ = ["probed_conv", "probe_sketch", "probe_weight_grad", "draw_seed", "draw", "generator_draw"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@torch.library.custom_op("fxsketch::probe_sketch", mutates_args=())
def probe_sketch(x: torch.Tensor, seed: torch.Tensor, rank: int, mode: str, probe: str) -> torch.Tensor:
    """Xbar = Z^T X of a batched conv input x (N, C, *spatial) for the probes of ``seed``, a
    0-d int64 tensor: (N, C, rank) in spatial mode, (N, rank) in channel mode, in x's dtype."""
    fn = sketch_triton if use_triton(x) else sketch
    with _no_autocast(x):  # fp32 accumulation in x's dtype, whatever autocast the caller runs under
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
    with _no_autocast(dy):
        if mode == "spatial":
            fn = dw_spatial_triton if use_triton(dy) else dw_spatial
            dw = fn(*args, tuple(x_shape[2:]), tuple(weight_shape), geo)
        else:
            dw = dw_channel(*args, tuple(x_shape), tuple(weight_shape), geo)
    return dw.to(dtype).contiguous()


def _no_autocast(like: torch.Tensor):
    return torch.autocast(like.device.type, enabled=False)


def _autocast_dtype(x: torch.Tensor):
    """The dtype autocast casts a conv's operands to where the caller runs under it, else None."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


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


def draw_seed(generator: torch.Generator | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
    """One draw from torch's RNG (or ``generator``) as a 0-d int64 CPU tensor: the probes' seed.

    A tensor, not an int: on fake tensors (planning) and under ``torch.compile`` it is a value
    nobody needs to read; the custom ops read it when they run for real. ``like``: the tensor
    the seed is for (under compile, the draw comes after it, as eagerly).
    """
    return draw(generator, "seed", (), like)


_DRAWS = {"seed": torch.int64, "uniform": torch.float32, "bit": torch.int8}
_GENERATORS: dict[int, torch.Generator] = {}
"""The generators compiled graphs draw from, by id: registered while dynamo traces, and held
for good, so that no id is ever reused for another generator."""


def _draw(generator, kind: str, shape, device=None) -> torch.Tensor:
    if kind == "seed":
        return torch.randint(2**31 - 1, shape, generator=generator)
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=device)
    return torch.randint(0, 2, shape, generator=generator, device=device, dtype=torch.int8)


@torch.library.custom_op("fxsketch::generator_draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def generator_draw(like: torch.Tensor, key: int, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """A draw from the registered generator ``key`` (see :func:`draw`), on its device. Tagged
    random, so compilers neither merge two draws nor recompute one; ``like`` (any tensor) gives
    it a place in the graph and a device for torch's RNG bookkeeping."""
    return _draw(_GENERATORS[key], kind, tuple(shape))


@generator_draw.register_fake
def _(like, key, kind, shape):
    return torch.empty(tuple(shape), dtype=_DRAWS[kind], device=_GENERATORS[key].device)


@torch.compiler.assume_constant_result
def _register(generator: torch.Generator) -> int:
    # runs while dynamo traces, with the real generator (and not in the compiled graph)
    _GENERATORS[id(generator)] = generator
    return 0


def draw(generator: torch.Generator | None, kind: str, shape, like: torch.Tensor | None = None,
         device=None) -> torch.Tensor:
    """Random values for the ops: ``kind`` "seed" (int64 in [0, 2**31 - 1), on the CPU),
    "uniform" (float32 in [0, 1)) or "bit" (int8 0 or 1), of ``shape``, from ``generator`` (on
    its device) or torch's RNG (on ``device``).

    Under ``torch.compile`` a generator's draw is the custom op :func:`generator_draw`, keyed by
    the generator's id (dynamo guards on the generator object), so compiled and eager modules
    draw the same values in the same order without a graph break. So is a seed from torch's RNG
    (``torch.default_generator``): it is drawn in forward and read in backward, and AOTAutograd
    may recompute a traced ``randint`` in the backward graph instead of saving it, a second
    draw that would pair the sketch with another seed's probes. An opaque op is saved, not
    recomputed (and in a checkpoint region it is replayed from the restored RNG state).
    """
    if not torch.compiler.is_compiling():
        return _draw(generator, kind, shape, device if generator is None else generator.device)
    if generator is None:
        if kind != "seed":
            return _draw(None, kind, shape, device)  # drawn and read within one graph
        generator = torch.default_generator
    key = id(generator)
    _register(generator)
    return generator_draw(like if like is not None else torch.empty(0), key, kind, list(shape))


def check_conv_args(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``input`` is unbatched; a ValueError naming the shapes where the weight is not a
    1d/2d/3d conv's or the input does not fit it."""
    if weight.dim() - 2 not in _CONV_FN:
        raise ValueError(f"weight must be 3-, 4- or 5-dimensional (1d/2d/3d conv), got shape {tuple(weight.shape)}")
    d = weight.dim() - 2
    if input.dim() not in (d + 1, d + 2):
        raise ValueError(f"a {d}d conv (weight {tuple(weight.shape)}) needs input of {d + 2} dims "
                         f"(N, C, *spatial) or {d + 1} unbatched, got input shape {tuple(input.shape)}")
    return input.dim() == d + 1


class _ProbedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seed, stride, padding, dilation, groups, rank, mode, probe):
        ctx.geo = conv_geometry(tuple(weight.shape), stride, padding, dilation, groups)
        y = _CONV_FN[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
        ctx.x_shape, ctx.has_bias = tuple(x.shape), bias is not None
        ctx.rank, ctx.mode, ctx.probe = rank, mode, probe
        ctx.seed = seed  # a 0-d tensor, not saved: a plan counts the sketch and the weight only
        # under autocast the conv ran on x cast to the low dtype: sketch that (as eager saves it),
        # and take dX / db in that dtype in backward
        ctx.amp = _autocast_dtype(x) if x.is_floating_point() else None
        if seed is not None:
            xs = x.to(ctx.amp) if ctx.amp is not None else x
            ctx.save_for_backward(probe_sketch(xs, seed, rank, mode, probe), weight)
        else:
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
            w = weight.to(ctx.amp) if ctx.amp is not None else weight  # as autocast ran the forward
            dx, db = _input_and_bias_grad(dy.to(w.dtype), ctx.x_shape, w, ctx.has_bias, need_dx, need_db, geo)
        if need_dw:
            dw = probe_weight_grad(dy, saved[0], ctx.seed, ctx.rank, ctx.mode, ctx.probe, ctx.x_shape,
                                   tuple(weight.shape), geo.stride, geo.dilation, geo.pad_left,
                                   geo.pad_right, geo.groups, weight.dtype)
        return dx, dw, db if need_db else None, None, None, None, None, None, None, None, None


@traceable
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
    unbatched = check_conv_args(input, weight)
    x = input.unsqueeze(0) if unbatched else input
    seed = None
    if weight.requires_grad and torch.is_grad_enabled():
        # one draw from the caller's RNG: fresh probes every step, reproducible under manual_seed
        seed = draw_seed(generator, x)
    y = _ProbedConv.apply(x, weight, bias, seed, stride, padding, dilation, groups, rank, mode, probe)
    return y.squeeze(0) if unbatched else y
