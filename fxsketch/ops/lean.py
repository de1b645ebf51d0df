"""Lean companions with exact gradients: they save a bit mask or small window offsets, not tensors.

* ``lean_relu`` / ``lean_leaky_relu`` save a packed 1-bit-per-element mask (uint8, 8 per byte)
  instead of their output or input: 1/32 of an fp32 activation.
* ``lean_max_pool`` saves the argmax as the offset inside its window in the smallest integer
  dtype that holds the window size (uint8 up to 256 window elements), not int64 flat indices.

Freeing the activation is the point: a probed conv after a lean ReLU lets the ReLU output die.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lean_relu", "lean_leaky_relu", "lean_max_pool", "pack_bits", "unpack_bits"]

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (element i -> bit i % 8 of byte i // 8).

    >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True]))
    tensor([13,  1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    # OR of shifted columns in uint8: no int64 transient (a weighted sum would promote to int64).
    out = bits[:, 0].clone()
    for i in range(1, 8):
        out |= bits[:, i] << i
    return out


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.view(-1)[:numel].bool()


class _LeanReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, negative_slope, inplace):
        # Mask from the input before any in-place write; matches torch's rules at 0 and NaN:
        # relu passes the gradient where not (out <= 0), leaky_relu where x > 0.
        if negative_slope is None:
            keep = ~(x <= 0)
            out = x.relu_() if inplace else torch.relu(x)
        else:
            keep = x > 0
            out = F.leaky_relu(x, negative_slope, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.shape, ctx.slope = x.shape, negative_slope
        ctx.save_for_backward(pack_bits(keep))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        keep = unpack_bits(packed, math.prod(ctx.shape)).view(ctx.shape)
        if ctx.slope is None:
            return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None, None
        return torch.where(keep, grad, grad * ctx.slope), None, None


def lean_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu`` that saves a 1-bit mask (x.numel() / 8 bytes) for backward.

    >>> lean_relu(torch.tensor([-1.0, 2.0]))
    tensor([0., 2.])
    """
    return _LeanReLU.apply(x, None, bool(inplace))


def lean_leaky_relu(x: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """``F.leaky_relu`` that saves a 1-bit mask; any slope works in place (the mask comes from x)."""
    return _LeanReLU.apply(x, float(negative_slope), bool(inplace))


def _offset_dtype(window: int) -> torch.dtype:
    """Smallest integer dtype whose values cover offsets 0..window-1."""
    if window <= 256:
        return torch.uint8
    return torch.int16 if window <= 2**15 else torch.int32


def _axes(out_shape, geo):
    """Per-axis window starts (broadcastable over the output spatial shape)."""
    d = len(out_shape)
    starts = []
    for a in range(d):
        shape = [1] * d
        shape[a] = out_shape[a]
        starts.append((torch.arange(out_shape[a]) * geo["stride"][a] - geo["padding"][a]).view(shape))
    return starts


_CHUNK = 1 << 14  # at least this many elements per chunk (fewer Python steps on small tensors)


def _batch_chunks(n: int, per_sample: int):
    """Up to 16 batch chunks: the int64 index temporaries stay ~1/16 of an int64 copy of the tensor."""
    step = max(1, max(_CHUNK, n * per_sample // 16) // max(1, per_sample))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class _LeanMaxPool(torch.autograd.Function):
    """Max-pool that saves, per output, the argmax's offset inside its window (uint8 for windows
    of up to 256 elements) instead of the input and int64 indices. Works in batch chunks so the
    int64 temporaries stay small."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        d = len(kernel)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
        geo = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation}
        in_sp = x.shape[2:]
        out = offset = None
        for sl in _batch_chunks(x.shape[0], math.prod(x.shape[1:])):
            o, idx = fn(x[sl], kernel, stride, padding, dilation, ceil_mode, return_indices=True)
            if out is None:
                out = x.new_empty((x.shape[0],) + o.shape[1:])
                offset = torch.empty(out.shape, dtype=_offset_dtype(math.prod(kernel)), device=x.device)
            out[sl] = o
            # flat plane index -> per-axis coordinate -> offset inside the window, ravelled
            off = torch.zeros_like(idx)
            rest = idx
            coords = []
            for a in reversed(range(d)):
                coords.append(rest % in_sp[a])
                rest = rest // in_sp[a]
            coords.reverse()
            for a, start in enumerate(_axes(out.shape[2:], geo)):
                off = off * kernel[a] + (coords[a] - start.to(idx.device)) // dilation[a]
            offset[sl] = off
        ctx.geo, ctx.in_shape = geo, x.shape
        ctx.save_for_backward(offset)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (offset,) = ctx.saved_tensors
        geo, in_shape = ctx.geo, ctx.in_shape
        in_sp, out_sp, kernel = in_shape[2:], grad.shape[2:], geo["kernel"]
        n, c = in_shape[:2]
        dx = torch.zeros(n, c, math.prod(in_sp), dtype=grad.dtype, device=grad.device)
        starts = [s.to(grad.device) for s in _axes(out_sp, geo)]
        for sl in _batch_chunks(n, math.prod(grad.shape[1:])):
            rest = offset[sl].long()
            offs = []
            for a in reversed(range(len(kernel))):
                offs.append(rest % kernel[a])
                rest = rest // kernel[a]
            offs.reverse()
            flat = torch.zeros((), dtype=torch.int64, device=grad.device)
            for a, start in enumerate(starts):
                flat = flat * in_sp[a] + start + offs[a] * geo["dilation"][a]
            m = flat.shape[0]
            dx[sl].scatter_add_(2, flat.reshape(m, c, -1), grad[sl].reshape(m, c, -1))
        return dx.view(in_shape), None, None, None, None, None


def _tuple(v, d, name):
    if isinstance(v, int):
        return (v,) * d
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return v * d
    if len(v) != d:
        raise ValueError(f"{name} must be an int or a tuple of {d} ints, got {v}")
    return v


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
    kernel = _tuple(kernel_size, d, "kernel_size")
    stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, d, "stride")
    unbatched = x.dim() == d + 1
    xb = x.unsqueeze(0) if unbatched else x
    out = _LeanMaxPool.apply(xb, kernel, stride, _tuple(padding, d, "padding"),
                             _tuple(dilation, d, "dilation"), bool(ceil_mode))
    return out.squeeze(0) if unbatched else out
