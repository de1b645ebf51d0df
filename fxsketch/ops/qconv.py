"""Compressed conv inputs: a convolution whose backward reads an 8- or 4-bit copy of its input.

Y = conv(X, W) saves X for one thing only, dW: dX (the transposed conv of dY) and db (the sum of
dY) need W and dY. :func:`quant_conv` computes Y with torch's own conv (the same bits as eager)
and saves X as the codes of :mod:`fxsketch.ops.quant` instead: ``bits`` bits per element, one
fp32 scale and zero point per sample and channel, stochastic rounding from a seeded local
generator, packed in X's memory order (a channels_last X without a copy). The backward
dequantizes X a batch chunk at a time (:func:`fxsketch.ops.quant.backward_chunks`) and runs
torch's own convolution backward on each chunk:

* dX and db are eager's: dX of a sample reads W and that sample's dY, never X's values;
* dW = sum over chunks of wgrad(dequantized chunk, dY chunk) is unbiased (linear in X) with
  E||d dW||^2 = sum of wgrad(v, dY**2) over dW's elements, v the per-element rounding
  variances (:func:`quant_conv_noise_sq`; :mod:`fxsketch.calibrate` states it against the
  layer's SGD noise for a plan).

Beside dY and dX the backward holds one chunk of the dequantized X (and that chunk's dX, and a
dW, before they are added in): :func:`backward_workspace_nbytes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from ._args import from_order, in_order, layout_order, memory_order, per_axis, traceable
from .conv import _autocast_dtype, check_conv_args, draw_seed
from .probed import _input_and_bias_grad, conv_geometry, exact_weight_grad
from .quant import (_check_bits, _range, backward_chunks, pack_workspace_nbytes, quant_groups, quant_nbytes,
                    quant_pack, unpack_slice, unpack_workspace_nbytes)

__all__ = ["quant_conv", "quant_conv_transpose", "conv_pack_order", "conv_quant_nbytes", "backward_workspace_nbytes",
           "forward_workspace_nbytes", "quant_conv_noise_sq"]

aten = torch.ops.aten
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_pack_order(shape: Sequence[int], stride: Sequence[int] | None) -> list[int]:
    """The dim order X is packed in: as it lies in memory where its batch dim is outermost (a
    channels_last X: no copy), else logical."""
    lay = layout_order(shape, stride)
    return lay if lay[0] == 0 else list(range(len(shape)))


def conv_quant_nbytes(shape: Sequence[int], bits: int) -> int:
    """Bytes saved instead of X (codes, and a scale and zero point per sample and channel)."""
    return quant_nbytes(shape, bits, quant_groups(shape, "batch"))


def forward_workspace_nbytes(shape: Sequence[int], stride: Sequence[int] | None, bits: int,
                             dtype=torch.float32, device="cpu") -> int:
    """What the forward allocates besides Y and the codes: the packing's buffers (and a copy of X
    where it is not dense in its packing order, i.e. a strided slice)."""
    order = conv_pack_order(shape, stride)
    groups = quant_groups(shape, "batch")
    return pack_workspace_nbytes([shape[d] for d in order], bits, [groups[d] for d in order], device, dtype)


def backward_workspace_nbytes(shape: Sequence[int], weight_shape: Sequence[int], bits: int,
                              dtype=torch.float32, device="cpu", symmetric: bool = True) -> int:
    """What the backward allocates besides dX and dW: one chunk's dequantized X and its unpacking's
    buffers and one chunk's dW before it is added in (dX comes from one transposed conv of dY, no
    X needed); with asymmetric padding (``symmetric`` False: 'same' with an even kernel) also the
    chunk's dX before it is copied into dX; all of X where it is read whole."""
    size = torch.empty((), dtype=dtype).element_size()
    plan = backward_chunks("conv", shape, bits)
    n = math.prod(shape)
    w = math.prod(weight_shape) * size
    if plan is None:
        return n * size + unpack_workspace_nbytes(shape, bits, quant_groups(shape, "batch"), dtype, device)
    a, b = plan[1][0]
    cshape = [b - a, *shape[1:]]
    chunk = math.prod(cshape) * size
    return (1 if symmetric else 2) * chunk + unpack_workspace_nbytes(cshape, bits, quant_groups(cshape, "batch"),
                                                                      dtype, device) + w


def quant_conv_noise_sq(x: torch.Tensor, dy: torch.Tensor, weight_shape, geo, bits: int) -> float:
    """E||d dW||^2 of quantizing x (per sample and channel, ``bits`` bits, stochastic rounding) for
    the output gradient dy: sum of wgrad(v, dy**2), v = step**2 f (1 - f) per element, one sample
    at a time (fp32 temporaries of one sample)."""
    levels = (1 << int(bits)) - 1
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i:i + 1].float()
        lo, step = _range(xi, quant_groups(xi.shape, "batch"), levels)
        t = (xi - lo) / step
        f = t - t.floor()
        v = step * step * f * (1 - f)
        total += float(exact_weight_grad(dy[i:i + 1].float().square(), v, tuple(weight_shape), geo).double().sum())
    return total


class _QuantConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seed, stride, padding, dilation, groups, bits, output_padding=None):
        d = weight.dim() - 2
        ctx.transposed = output_padding is not None
        if ctx.transposed:  # output_padding given: a transposed conv (its own geometry, below)
            y = _CONV_T_FN[d](x, weight, bias, stride, padding, output_padding, groups, dilation)
            ctx.geo = _TransposedGeometry(*(per_axis(v, d, k, " for a transposed conv") for k, v in (
                ("stride", stride), ("padding", padding), ("dilation", dilation), ("output_padding", output_padding))),
                groups)
        else:
            y = _CONV_FN[d](x, weight, bias, stride, padding, dilation, groups)
            ctx.geo = conv_geometry(tuple(weight.shape), stride, padding, dilation, groups)
        ctx.bits, ctx.has_bias, ctx.x_dtype = bits, bias is not None, x.dtype
        # under autocast the conv ran on x cast to the low dtype: quantize that (as eager saves it)
        ctx.amp = _autocast_dtype(x)
        xs = x.to(ctx.amp) if ctx.amp is not None else x
        ctx.shape, ctx.dtype = tuple(xs.shape), xs.dtype
        if seed is None:  # no dW wanted: nothing of X is needed
            ctx.order = None
            ctx.save_for_backward(weight)
            return y
        order = conv_pack_order(xs.shape, xs.stride())
        g = quant_groups(xs.shape, "batch")
        codes, lo, step = quant_pack(in_order(xs, order), seed, bits, [g[d] for d in order])
        ctx.order = order
        ctx.save_for_backward(codes, lo, step, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise UnsupportedError(
                "fxsketch.ops.quant_conv does not support double backward (create_graph=True, e.g. a "
                "gradient penalty): its backward reads a quantized copy of the input. Plan without "
                "it: optimize(..., methods=('probe', 'lean', 'recompute')).")
        *packed, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and ctx.has_bias
        geo = ctx.geo
        w = weight.to(ctx.amp) if ctx.amp is not None else weight
        dy = dy.to(w.dtype)
        if ctx.transposed:
            return _transposed_backward(ctx, dy, packed, w, weight, need_dx, need_dw, need_db)
        if not packed:
            dx, db = _input_and_bias_grad(dy, ctx.shape, w, ctx.has_bias, need_dx, need_db, geo)
            return _grads(ctx, dx, None, db, weight)
        shape, d = list(ctx.shape), weight.dim() - 2
        plan = backward_chunks("conv", shape, ctx.bits)
        ranges = [(0, shape[0])] if plan is None else plan[1]
        pads = None if geo.symmetric else [p for a in reversed(range(d)) for p in (geo.pad_left[a], geo.pad_right[a])]
        padding = list(geo.pad_left) if pads is None else [0] * d
        crop = None if pads is None else (slice(None), slice(None)) + tuple(
            slice(lft, lft + s) for lft, s in zip(geo.pad_left, shape[2:]))
        mask = [need_dx, need_dw, need_db]
        dx = dw = db = None
        if len(ranges) > 1 and geo.symmetric and (need_dx or need_db):
            # dX and db need no X: one transposed conv of all of dY (not a chunk's dX copied into dX
            # chunk after chunk), the chunks below compute dW only
            dx, db = _input_and_bias_grad(dy, tuple(shape), w, need_db, need_dx, need_db, geo)
            if dx is not None and memory_order(dx) != list(ctx.order):
                dx = _empty_in(list(shape), ctx.order, dx).copy_(dx)
            db = db.float() if db is not None else None
            mask, need_dx, need_db = [False, need_dw, False], False, False
        for a, b in ranges if any(mask) else ():
            xc = unpack_slice(packed, ctx.bits, shape, ctx.dtype, ctx.order, 0, a, b)
            if pads is not None:
                xc = F.pad(xc, pads)
            gx, gw, gb = aten.convolution_backward(dy[a:b], xc, w, [w.shape[0]] if need_db else None,
                                                   list(geo.stride), padding, list(geo.dilation), False,
                                                   [0] * d, geo.groups, mask)
            del xc
            if need_dx:
                if crop is not None:  # as eager's: the padded copy's dX cropped, in X's layout
                    gx = _empty_in(gx[crop].shape, ctx.order, gx).copy_(gx[crop])
                if len(ranges) == 1:
                    dx = gx
                else:
                    if dx is None:
                        dx = _empty_in([shape[0], *gx.shape[1:]], ctx.order, gx, ctx.x_dtype)
                    dx[a:b].copy_(gx)
            if need_dw:
                dw = gw.float() if dw is None else dw.add_(gw)
            if need_db:
                db = gb.float() if db is None else db.add_(gb)
            del gx, gw, gb
        return _grads(ctx, dx, dw, db, weight)


@dataclass(frozen=True)
class _TransposedGeometry:
    """A transposed conv's arguments, one entry per spatial dim."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int


def _transposed_backward(ctx, dy, packed, w, weight, need_dx, need_dw, need_db):
    """A transposed conv's backward: dX = conv(dY, W) needs no X (one conv of all of dY, in X's
    layout); dW (and db) from the dequantized X a batch chunk at a time."""
    geo, shape = ctx.geo, list(ctx.shape)
    dx = db = dw = None
    if need_dx:
        dx = _CONV_FN[w.dim() - 2](dy, w, None, geo.stride, geo.padding, geo.dilation, geo.groups)
        if ctx.order is not None and memory_order(dx) != list(ctx.order):
            dx = _empty_in(shape, ctx.order, dx).copy_(dx)
    if not packed:  # no dW wanted
        if need_db:
            db = dy.float().sum([0, *range(2, dy.dim())])
        return _grads(ctx, dx, None, db, weight)
    plan = backward_chunks("conv", shape, ctx.bits)
    for a, b in [(0, shape[0])] if plan is None else plan[1]:
        xc = unpack_slice(packed, ctx.bits, shape, ctx.dtype, ctx.order, 0, a, b)
        _, gw, gb = aten.convolution_backward(
            dy[a:b], xc, w, [w.shape[1] * geo.groups] if need_db else None, list(geo.stride), list(geo.padding),
            list(geo.dilation), True, list(geo.output_padding), geo.groups, [False, need_dw, need_db])
        del xc
        if need_dw:
            dw = gw.float() if dw is None else dw.add_(gw)
        if need_db:
            db = gb.float() if db is None else db.add_(gb)
        del gw, gb
    return _grads(ctx, dx, dw, db, weight)


def _empty_in(shape, order, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` laid out in ``order`` (X's layout), on like's device."""
    t = torch.empty([shape[k] for k in order], dtype=dtype or like.dtype, device=like.device)
    return from_order(t, order)


def _grads(ctx, dx, dw, db, weight):
    dx = dx.to(ctx.x_dtype) if dx is not None else None
    dw = dw.to(weight.dtype) if dw is not None else None
    db = db.to(weight.dtype) if db is not None else None
    return dx, dw, db, None, None, None, None, None, None, None


def _apply(name: str, input, weight, bias, generator, args: tuple):
    """The quantized conv's checks and call: ``args`` are _QuantConv's after the seed, ``bits`` checked."""
    args = (*args[:4], _check_bits(args[4]), *args[5:])
    unbatched = check_conv_args(input, weight)
    if not input.is_floating_point():
        raise TypeError(f"{name} needs a floating-point input, got {input.dtype}")
    x = input.unsqueeze(0) if unbatched else input
    seed = draw_seed(generator, x) if weight.requires_grad and torch.is_grad_enabled() else None
    y = _QuantConv.apply(x, weight, bias, seed, *args)
    return y.squeeze(0) if unbatched else y


@traceable
def quant_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, bits: int = 8,
               generator: Optional[torch.Generator] = None):
    """A 1d/2d/3d convolution (from ``weight.dim()``) that saves its input in ``bits`` bits (8 or 4).

    Takes every argument ``F.convNd`` takes; output, dX and db are torch's own, dW is computed
    from a stochastically rounded copy of the input (unbiased). Each call draws one seed from
    torch's default RNG (or ``generator``) when the weight needs a gradient.

    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    >>> torch.equal(quant_conv(x, w, padding=1), F.conv2d(x, w, padding=1))
    True
    """
    return _apply("quant_conv", input, weight, bias, generator, (stride, padding, dilation, groups, bits))


@traceable
def quant_conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                         bits: int = 8, generator: Optional[torch.Generator] = None):
    """A 1d/2d/3d transposed convolution (``F.conv_transposeNd``'s arguments, in its order) that
    saves its input in ``bits`` bits (8 or 4): output, dX (a conv of dY) and db are torch's own,
    dW is computed from a stochastically rounded copy of the input (unbiased, as :func:`quant_conv`).

    >>> x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 2, 2, requires_grad=True)
    >>> torch.equal(quant_conv_transpose(x, w, stride=2), F.conv_transpose2d(x, w, stride=2))
    True
    """
    return _apply("quant_conv_transpose", input, weight, bias, generator,
                  (stride, padding, dilation, groups, bits, output_padding))
