"""Lean companions with exact gradients: they save a bit mask or small window offsets, not tensors.

* ``lean_relu`` / ``lean_leaky_relu`` save a packed 1-bit-per-element mask (uint8, 8 per byte)
  instead of their output or input: 1/32 of an fp32 activation.
* ``lean_max_pool`` saves the argmax as the offset inside its window in the smallest integer
  dtype that holds the window size (uint8 up to 256 window elements), not int64 flat indices.

Freeing the activation is the point: a probed conv after a lean ReLU lets the ReLU output die.

The work of each direction is a torch custom op (``fxsketch::lean_relu``, ``lean_relu_inplace``,
``lean_relu_backward``, ``lean_max_pool``, ``lean_max_pool_backward``), so fake tensors and
``torch.compile`` see one op with a shape function instead of the packing and index arithmetic;
the backward ops are attached with ``register_autograd`` (an autograd.Function for in place).

On CPU in fp32 the ReLU ops run :mod:`fxsketch.ops.cpu_kernels`' fused loops: the output and the
mask in one pass (the torch path: relu, a comparison, the packing multiply and shift) and the
gradient from the mask in one pass (the torch path unpacks the mask chunk by chunk first), with
no temporaries; the values are bit for bit torch's (``tests/test_lean_ops.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

from . import cpu_kernels
from ._args import dense_in, fake_or_meta, from_order, in_order, memory_order, traceable, per_axis

__all__ = ["lean_relu", "lean_leaky_relu", "lean_max_pool", "pack_bits", "unpack_bits", "relu_workspace"]


_GATHER = 0x0102040810204080
"""Multiplying 8 bytes of 0/1 (element i in byte i, little-endian) by this puts element i at bit
56 + i and nothing else in bits 56-63 (every partial product lands on its own bit: no carries)."""


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (element i -> bit i % 8 of byte i // 8).

    One multiply and one shift per 8 elements (the bool bytes read as int64), not 8 shifted ORs.

    >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True]))
    tensor([13,  1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(-1, 8).view(torch.int64).view(-1)
    gathered = words * _GATHER  # int64 wraps; bits 56-63 are the byte
    gathered.bitwise_right_shift_(56)  # in place: one int64 temporary (the mask's own size), not two
    return gathered.to(torch.uint8)


_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8)
"""uint8[256, 8]: row p holds the 8 bits of p."""
_BITS_AS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _unpack_as(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask as ``numel`` 0/1 values of ``dtype`` (one row lookup per packed byte): the
    gradient's own dtype, so that torch's backward kernels take it without a hidden cast copy."""
    index = packed.reshape(-1).int()
    if fake_or_meta(packed):
        rows = torch.empty((index.numel(), 8), dtype=dtype, device=packed.device)
    else:
        key = (packed.device, dtype)
        if key not in _BITS_AS:
            _BITS_AS[key] = _BITS.to(device=packed.device, dtype=dtype)
        rows = _BITS_AS[key].index_select(0, index)
    return rows.view(-1)[:numel]


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    return _unpack_as(packed, numel, torch.uint8).view(torch.bool)


def _packed_keep(x: torch.Tensor, negative_slope: Optional[float]) -> torch.Tensor:
    """The packed mask of where the gradient passes, by torch's rules at 0 and NaN: relu passes
    it where not (out <= 0), leaky_relu where x > 0; taken from the input before any in-place
    write. For relu the negation is done on the packed bytes (8x fewer); pad bits are ignored.
    The mask is in x's memory order (:func:`memory_order`: a channels_last x is read as it lies,
    not copied into logical order)."""
    flat = in_order(x, memory_order(x)).view(-1)
    n = flat.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    step = mask_chunk(n)  # a multiple of 8: each chunk packs into whole bytes
    for a in range(0, n, step):
        part = flat[a:a + step]
        out[a // 8:(a + part.numel() + 7) // 8] = pack_bits(part <= 0).bitwise_not_() \
            if negative_slope is None else pack_bits(part > 0)
    return out


def _op(name: str, impl, mutates_args=()):
    """Register ``impl`` as the custom op ``fxsketch::name`` and as its own fake implementation:
    it is plain tensor ops reading no values (the fused loops, which allocate nothing, are skipped
    on fake tensors), so on fake tensors it allocates exactly what the real op does."""
    op = torch.library.custom_op(f"fxsketch::{name}", impl, mutates_args=mutates_args)
    op.register_fake(impl)
    return op


def _fused(t: torch.Tensor) -> bool:
    """Whether the fused CPU loops serve ``t`` (real or fake): fp32 on the CPU (or meta, planned as
    the CPU), the library built, ``t`` dense in its memory order (a flat view walks it as it lies)."""
    return cpu_kernels.serves(t.device, t.dtype) and dense_in(t.shape, t.stride(), memory_order(t))


def _flat(t: torch.Tensor, order) -> torch.Tensor:
    """The flat view of ``t`` in memory order ``order`` (t dense in it: no copy)."""
    return in_order(t, order).view(-1)


def relu_workspace(numel: int, dtype: torch.dtype, device) -> tuple[int, int]:
    """(forward, backward) bytes a lean ReLU of ``numel`` elements allocates besides its output,
    mask and input gradient: none in the fused CPU loops; in the torch path one chunk's bool mask
    and int64 packing words in forward, one chunk's unpacked mask in ``dtype`` and its int32 row
    indices in backward (:func:`mask_chunk`)."""
    if cpu_kernels.serves(device, dtype):
        return 0, 0
    chunk = min(numel, mask_chunk(numel))
    return 2 * chunk, chunk * torch.empty((), dtype=dtype).element_size() + chunk // 2


def _relu_op_impl(x: torch.Tensor, negative_slope: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu or leaky_relu of x, its packed gradient mask); ``negative_slope`` None means relu. The
    fused loops write both into their results (on fake tensors only the results are allocated)."""
    if _fused(x):
        out = torch.empty_like(x)  # x's dense layout: the same memory order
        mask = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
        if not fake_or_meta(x):
            order = memory_order(x)
            cpu_kernels.relu_mask(_flat(x, order), _flat(out, order), mask, negative_slope)
        return out, mask
    out = torch.relu(x) if negative_slope is None else F.leaky_relu(x, negative_slope)
    return out, _packed_keep(x, negative_slope)


_relu_op = _op("lean_relu", _relu_op_impl)


def _relu_inplace_op_impl(x: torch.Tensor, negative_slope: Optional[float]) -> torch.Tensor:
    """Applies relu or leaky_relu to x in place; returns only the packed gradient mask."""
    if _fused(x):
        mask = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
        if not fake_or_meta(x):
            flat = _flat(x, memory_order(x))
            cpu_kernels.relu_mask(flat, flat, mask, negative_slope)
        return mask
    mask = _packed_keep(x, negative_slope)
    if negative_slope is None:
        x.relu_()
    else:
        F.leaky_relu_(x, negative_slope)
    return mask


_relu_inplace_op = _op("lean_relu_inplace", _relu_inplace_op_impl, mutates_args=("x",))


def mask_chunk(numel: int) -> int:
    """Elements packed (forward) and unpacked (backward) at a time: a quarter of the tensor (at
    least 512, a multiple of 8), so the mask's temporaries (in backward, the unpacked mask in the
    gradient's dtype) stay a fraction of the activation, in at most 4 Python steps."""
    return max(512, (numel // 4 + 7) // 8 * 8)


def _relu_backward_op_impl(grad: torch.Tensor, mask: torch.Tensor, negative_slope: Optional[float],
                           order: Sequence[int]) -> torch.Tensor:
    """grad where the mask is set, else 0 (relu) or negative_slope * grad (leaky_relu), chunk by
    chunk with torch's own backward kernels and the 0/1 mask as "self" (in grad's dtype, so no
    cast copy inside the kernel): the same rules at 0 and NaN as relu's and leaky_relu's backward.
    ``order``: the input's memory order, which the mask is in; the result is laid out in it."""
    g = in_order(grad, order)  # a view where grad is laid out as the input was
    shape = g.shape
    g = g.view(-1)
    out = torch.empty_like(g)
    if cpu_kernels.serves(g.device, g.dtype):
        if not fake_or_meta(g):
            cpu_kernels.relu_backward(g, mask.contiguous(), out, negative_slope)
        return from_order(out.view(shape), order)
    n = g.numel()
    step = mask_chunk(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        keep = _unpack_as(mask[a // 8:(b + 7) // 8], b - a, grad.dtype)
        if negative_slope is None:
            torch.ops.aten.threshold_backward.grad_input(g[a:b], keep, 0, grad_input=out[a:b])
        else:
            torch.ops.aten.leaky_relu_backward.grad_input(g[a:b], keep, negative_slope, False, grad_input=out[a:b])
        del keep  # before the next chunk's is unpacked: one chunk's mask alive at a time, not two
    return from_order(out.view(shape), order)


_relu_backward_op = _op("lean_relu_backward", _relu_backward_op_impl)


def _relu_setup(ctx, inputs, output):
    ctx.slope, ctx.order = inputs[1], memory_order(inputs[0])
    ctx.save_for_backward(output[1])


def _relu_backward(ctx, grad, *_):
    (mask,) = ctx.saved_tensors
    return _relu_backward_op(grad, mask, ctx.slope, ctx.order), None


_relu_op.register_autograd(_relu_backward, setup_context=_relu_setup)


def _relu_backward_setup(ctx, inputs, output):
    ctx.slope, ctx.order = inputs[2], list(inputs[3])
    ctx.save_for_backward(inputs[1])


def _relu_double_backward(ctx, gg):
    # the backward is linear in its incoming gradient, with the same mask: double backward works
    (mask,) = ctx.saved_tensors
    return _relu_backward_op(gg, mask, ctx.slope, ctx.order), None, None, None


_relu_backward_op.register_autograd(_relu_double_backward, setup_context=_relu_backward_setup)


class _LeanReLUInplace(torch.autograd.Function):
    """The in-place variant: a mutating custom op cannot take register_autograd, and
    mark_dirty gives torch's in-place rules (version counter, leaves refused)."""

    @staticmethod
    def forward(ctx, x, negative_slope):
        mask = _relu_inplace_op(x, negative_slope)
        ctx.mark_dirty(x)
        _relu_setup(ctx, (x, negative_slope), (x, mask))
        return x

    backward = staticmethod(_relu_backward)


def _lean_relu(x, negative_slope, inplace):
    if inplace:
        return _LeanReLUInplace.apply(x, negative_slope)
    return _relu_op(x, negative_slope)[0]


@traceable
def lean_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu`` that saves a 1-bit mask (x.numel() / 8 bytes) for backward.

    >>> lean_relu(torch.tensor([-1.0, 2.0]))
    tensor([0., 2.])
    """
    return _lean_relu(x, None, bool(inplace))


@traceable
def lean_leaky_relu(x: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """``F.leaky_relu`` that saves a 1-bit mask; any slope works in place (the mask comes from x)."""
    return _lean_relu(x, float(negative_slope), bool(inplace))


def _offset_dtype(window: int) -> torch.dtype:
    """Smallest integer dtype whose values cover offsets 0..window-1."""
    if window <= 256:
        return torch.uint8
    return torch.int16 if window <= 2**15 else torch.int32


def _window_tables(in_sp, out_sp, kernel, stride, padding, dilation, offset_dtype, device):
    """What maps torch's flat argmax to the offset inside its window and back, without integer
    division (slow on CPU): ``base``, each output's window start as a flat index into the input
    plane (broadcast over the output spatial shape); ``delta[o]``, window offset o (ravelled over
    the kernel axes) as a flat distance from the start; ``offset_of[d]``, the offset of distance d."""
    d = len(kernel)
    instride = [math.prod(in_sp[a + 1:]) for a in range(d)]
    base = torch.zeros((), dtype=torch.int64)
    delta = torch.zeros((), dtype=torch.int64)
    for a in range(d):
        shape = [1] * d
        shape[a] = out_sp[a]
        base = base + ((torch.arange(out_sp[a]) * stride[a] - padding[a]) * instride[a]).view(shape)
        delta = (delta[..., None] + torch.arange(kernel[a]) * dilation[a] * instride[a])
    delta = delta.reshape(-1)
    span = sum((k - 1) * dl * st for k, dl, st in zip(kernel, dilation, instride))  # delta's max, known without reading it
    offset_of = torch.zeros(span + 1, dtype=offset_dtype)
    offset_of[delta] = torch.arange(delta.numel()).to(offset_dtype)
    return base.to(device), delta.to(device), offset_of.to(device)


_CHUNK = 1 << 14  # at least this many elements per chunk (fewer Python steps on small tensors)
_POOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool_order(x: torch.Tensor) -> list[int]:
    """x's memory order where it is channels_last ([0, 2, .., 1]: the spatial dims of each channel
    still merge into one), else logical."""
    order = memory_order(x)
    return order if order == [0, *range(2, x.dim()), 1] else list(range(x.dim()))


def _empty_in(shape, order, dtype, device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` laid out in ``order``."""
    return from_order(torch.empty([shape[d] for d in order], dtype=dtype, device=device), order)


def _batch_chunks(n: int, per_sample: int):
    """Up to 16 batch chunks: the int64 index temporaries stay ~1/16 of an int64 copy of the tensor."""
    step = max(1, max(_CHUNK, n * per_sample // 16) // max(1, per_sample))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _pool_shape(x_shape, kernel, stride, padding, dilation, ceil_mode) -> list[int]:
    """Output shape by torch's rule: with ceil_mode the last window must start inside the input
    or its left padding. Shared by the real and the fake op, so the two always agree."""
    out = list(x_shape[:2])
    for size, k, s, p, dl in zip(x_shape[2:], kernel, stride, padding, dilation):
        n = (size + 2 * p - dl * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (n - 1) * s >= size + p:
            n -= 1
        out.append(n)
    return out


def _max_pool_op_impl(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(max-pool of a batched x, each output's argmax offset inside its window, ravelled), in
    batch chunks so that torch's int64 indices stay small."""
    d = len(kernel)
    order = _pool_order(x)  # out and offsets laid out as x is (channels_last stays channels_last)
    out = _empty_in(_pool_shape(x.shape, kernel, stride, padding, dilation, ceil_mode), order, x.dtype, x.device)
    offset = _empty_in(out.shape, order, _offset_dtype(math.prod(kernel)), x.device)
    base, _, offset_of = _window_tables(x.shape[2:], out.shape[2:], kernel, stride, padding, dilation,
                                        offset.dtype, x.device)
    for sl in _batch_chunks(x.shape[0], math.prod(x.shape[1:])):
        o, idx = _POOL_FN[d](x[sl], kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        out[sl] = o
        offset[sl] = torch.take(offset_of, idx - base)
    return out, offset


_max_pool_op = _op("lean_max_pool", _max_pool_op_impl)


def _max_pool_backward_op_impl(grad: torch.Tensor, offset: torch.Tensor, in_shape: Sequence[int],
                          kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], order: Sequence[int]) -> torch.Tensor:
    """The input gradient (``in_shape``, laid out in ``order``, the input's): each output's
    gradient added at its window offset."""
    in_sp, (n, c) = in_shape[2:], in_shape[:2]
    dx = _empty_in(in_shape, order, grad.dtype, grad.device).zero_().view(n, c, math.prod(in_sp))
    base, delta, _ = _window_tables(in_sp, grad.shape[2:], kernel, stride, padding, dilation,
                                    offset.dtype, grad.device)
    for sl in _batch_chunks(n, math.prod(grad.shape[1:])):
        flat = base + torch.take(delta, offset[sl].long())
        m = flat.shape[0]
        dx[sl].scatter_add_(2, flat.reshape(m, c, -1), grad[sl].reshape(m, c, -1))
    return dx.view(in_shape)


_max_pool_backward_op = _op("lean_max_pool_backward", _max_pool_backward_op_impl)


def _max_pool_setup(ctx, inputs, output):
    x, kernel, stride, padding, dilation, _ = inputs
    ctx.args, ctx.in_shape = (kernel, stride, padding, dilation, _pool_order(x)), tuple(x.shape)
    ctx.save_for_backward(output[1])


def _max_pool_backward(ctx, grad, _grad_offset):
    if torch.is_grad_enabled() and grad.requires_grad:
        raise UnsupportedError(
            "fxsketch.ops.lean_max_pool does not support double backward (create_graph=True, e.g. a "
            "gradient penalty). Plan without it: optimize(..., methods=('probe', 'recompute')), or "
            "keep the max-pool exact by passing its module type in leaf_modules.")
    (offset,) = ctx.saved_tensors
    return _max_pool_backward_op(grad, offset, ctx.in_shape, *ctx.args), None, None, None, None, None


_max_pool_op.register_autograd(_max_pool_backward, setup_context=_max_pool_setup)


@traceable
def lean_max_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """``F.max_poolNd`` (N from ``kernel_size`` if a tuple, else from x) saving uint8 window offsets.

    Accepts batched (N, C, *spatial) or unbatched (C, *spatial) input; 1d/2d/3d is read from
    ``kernel_size`` when it is a tuple, otherwise x is taken as batched.

    >>> lean_max_pool(torch.arange(8.0).view(1, 1, 8), 2)
    tensor([[[1., 3., 5., 7.]]])
    """
    if isinstance(kernel_size, int):
        if x.dim() not in (3, 4, 5):
            raise ValueError(f"lean_max_pool needs a (N, C, *spatial) input of 3-5 dims, got {tuple(x.shape)}; "
                             "pass kernel_size as a tuple to pool unbatched input")
        d = x.dim() - 2
    else:
        d = len(kernel_size)
    if d not in (1, 2, 3):
        raise ValueError(f"kernel_size must have 1, 2 or 3 entries (1d/2d/3d pooling), got {kernel_size}")
    if x.dim() not in (d + 1, d + 2):
        raise ValueError(f"a {d}d max pool needs input of {d + 2} dims (or {d + 1} unbatched), got {tuple(x.shape)}")
    kernel = per_axis(kernel_size, d, "kernel_size")
    stride = kernel if stride is None or stride == [] or stride == () else per_axis(stride, d, "stride")
    unbatched = x.dim() == d + 1
    xb = x.unsqueeze(0) if unbatched else x
    out, _ = _max_pool_op(xb, kernel, stride, per_axis(padding, d, "padding"),
                          per_axis(dilation, d, "dilation"), bool(ceil_mode))
    return out.squeeze(0) if unbatched else out
