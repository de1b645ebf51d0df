"""Compressed norm inputs: a norm whose backward reads an 8- or 4-bit copy of its input.

BatchNorm, GroupNorm, InstanceNorm and LayerNorm save their input X for backward (and their
statistics mean / rstd). These ops compute the output exactly with torch's own kernel (the same
bits as eager), save the statistics exactly, and save X as codes of ``bits`` bits with one scale
and one zero point per group (per sample and channel for inputs of 3 or more dims, per row of a
LayerNorm, per channel for 2-dim BatchNorm input):

    q = floor((X - lo) / step + u),  u ~ U[0, 1),   step = (hi - lo) / (2**bits - 1),

stochastic rounding (u on 2**16 points: :data:`RNG_LEVELS`): E[lo + q step] = X, per element variance step**2 f (1 - f) <= step**2 / 4,
f the fractional part of (X - lo) / step. The backward dequantizes and runs torch's own norm
backward on that copy with the exact statistics: dgamma is unbiased (linear in X); dX carries a
second-order bias of relative size O(step**2 rstd**2 / M), M the elements a statistic runs over
(:mod:`fxsketch.quant_noise` states the error for a plan). dbeta is exact.

The packing and unpacking are torch custom ops (``fxsketch::quant_pack``, ``fxsketch::quant_unpack``)
that are their own fake implementation (plain tensor ops reading no values but the seed), so a
plan on fake tensors sees their temporaries and torch.compile one opaque op each. On CPU (fp32)
they run fused C loops (:mod:`fxsketch.ops.cpu_kernels`: uniforms from a counter-based hash of
each element's position), elsewhere block by block in torch (uniforms from a local generator).
Either is seeded by one draw (:func:`fxsketch.ops.conv.draw_seed`) from torch's RNG or the plan's
private generator (``optimize(..., seed=)``): reproducible like the probes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import UnsupportedError
from ._args import fake_or_meta, from_order, in_order, layout_order, traceable
from . import cpu_kernels
from .conv import draw_seed

__all__ = ["QUANT_BITS", "quant_batch_norm", "quant_group_norm", "quant_layer_norm", "quant_instance_norm",
           "quant_norm_module", "quant_groups", "quant_nbytes", "quantize", "dequantize"]

QUANT_BITS = (8, 4)
"""The code widths the ops take."""

aten = torch.ops.aten


def _check_bits(bits) -> int:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS} (codes per element), got {bits!r}")
    return int(bits)


def quant_groups(shape: Sequence[int], kind: str, normalized_dims: int = 0) -> list[int]:
    """The shape of the scale and zero point for an input of ``shape``: a size where the group
    varies, 1 where it spans. LayerNorm (``normalized_dims`` trailing dims): per row; others: per
    sample and channel from 3 dims on, per channel over the batch for (N, C).

    >>> quant_groups((8, 16, 4, 4), "batch"), quant_groups((8, 16), "batch"), quant_groups((2, 5, 32), "layer", 1)
    ([8, 16, 1, 1], [1, 16], [2, 5, 1])
    """
    shape = list(shape)
    if kind == "layer":
        k = max(1, min(normalized_dims, len(shape)))
        return shape[:len(shape) - k] + [1] * k
    if len(shape) >= 3:
        return shape[:2] + [1] * (len(shape) - 2)
    return [1] + shape[1:] if len(shape) == 2 else [1] * len(shape)


def quant_nbytes(shape: Sequence[int], bits: int, groups: Sequence[int]) -> int:
    """Bytes saved instead of X: the codes (``bits`` per element, rounded up to a byte) and an
    fp32 scale and zero point per group."""
    return (math.prod(shape) * bits + 7) // 8 + 8 * math.prod(groups)


BLOCK = 1 << 20
"""The most elements per block of the packing loops (a quarter of the tensor, at least 2**16, up to
this). Their buffers (4 MiB of fp32 at most) are allocated once per call, below glibc's mmap
threshold, so they are reused from the heap rather than faulted in fresh: on a 2-core CPU an
in-place pass over a 51 MB tensor took 1.4 ms, a new 51 MB result 15 ms (page faults;
``tools/bench_quant_pack.py``). Smaller blocks (2**17) ran slower on the per-op overhead."""

RNG_LEVELS = 1 << 16
"""The uniforms of stochastic rounding take this many values, (k + 1/2) / RNG_LEVELS: 16 random bits
per element (a quarter of a 64-bit draw), so E[q] is X's position on the grid within
1 / (2 RNG_LEVELS) of a step."""


def _layout(shape: Sequence[int], groups: Sequence[int], bits: int):
    """(L, M, T, blocks, whole) of x viewed as (L, M, T): L over the leading dims the groups vary over
    (or of size 1), T over the trailing ones (e.g. the channels of a channels_last BatchNorm input,
    packed in memory order), M over the dims between, which every group spans; the statistics
    broadcast as (L, 1, T). Blocks are (L slice, M slice or None) of about a quarter of x (at
    least 2**16 elements, at most BLOCK): whole rows of L, or pieces of one; with 4 bits each
    starts at an even element. One block of the whole tensor (L = M = 1, T = 1 or x's size) where
    the groups vary over a dim between dims they span (a 2-dim BatchNorm input: per channel over
    the batch), or 4-bit pieces cannot start at even elements."""
    d = len(shape)
    lead = 0
    while lead < d and (groups[lead] == shape[lead] or shape[lead] == 1):
        lead += 1
    tail = d
    while tail > lead and groups[tail - 1] == shape[tail - 1]:
        tail -= 1
    n = math.prod(shape)
    whole = (1, 1, n, [(slice(0, 1), None)], True)
    if any(g != 1 for g in groups[lead:tail]):
        return whole
    rows, mid, t = math.prod(shape[:lead]), math.prod(shape[lead:tail]), math.prod(shape[tail:])
    per = mid * t
    block = min(BLOCK, max(1 << 16, n // 4))
    if per <= block:
        k = max(1, block // per)
        k += bits == 4 and per % 2 and k % 2
        return rows, mid, t, [(slice(r, min(rows, r + k)), None) for r in range(0, rows, k)], False
    m = block // t
    m -= bits == 4 and t % 2 and m % 2
    if m < 1 or bits == 4 and per % 2:
        return whole
    return rows, mid, t, [(slice(r, r + 1), slice(c, min(mid, c + m)))
                          for r in range(rows) for c in range(0, mid, m)], False


def _block_elems(shape: Sequence[int], groups: Sequence[int], bits: int) -> int:
    """Elements of the largest block (what the loops' buffers hold)."""
    rows, mid, t, blocks, _ = _layout(shape, groups, bits)
    rs, ms = blocks[0]
    return (min(rs.stop, rows) * mid if ms is None else ms.stop - ms.start) * t


def _views(t: torch.Tensor, shape, groups, bits, *stats):
    """(t viewed as (L, M, T), the group statistics shaped (L, 1, T), the blocks); the whole-tensor
    layout views t as (1, *shape) and the statistics as (1, *groups)."""
    rows, mid, tail, blocks, whole = _layout(list(shape), list(groups), bits)
    if whole:
        return t.reshape(1, *shape), [s.unsqueeze(0) for s in stats], blocks
    return t.reshape(rows, mid, tail), [s.reshape(rows, 1, tail) for s in stats], blocks


def _part(xs: torch.Tensor, block):
    """A block's view of ``xs`` (contiguous), its statistics' L slice, its first flat element."""
    rs, ms = block
    if ms is None:
        return xs[rs], rs, rs.start * math.prod(xs.shape[1:])
    return xs[rs, ms], rs, (rs.start * xs.shape[1] + ms.start) * xs.shape[2]


def fused(device, dtype) -> bool:
    """Whether :mod:`fxsketch.ops.cpu_kernels`' loops pack or unpack (fp32 ``dtype``) on ``device``."""
    return cpu_kernels.serves(device, dtype)


def _fused_layout(shape, groups, bits, device, dtype):
    """(rows, mid, tail) of the (L, M, T) view the fused loops run on, or None where they do not
    serve (the whole-tensor layout, another device or dtype, no compiled library)."""
    rows, mid, tail, _, whole = _layout(list(shape), list(groups), bits)
    return None if whole or not fused(device, dtype) else (rows, mid, tail)


def pack_workspace_nbytes(shape: Sequence[int], bits: int, groups: Sequence[int], device="cpu",
                          dtype=torch.float32) -> int:
    """Bytes the packing allocates besides its outputs. The fused CPU loops: the offset minimum and
    1 / step per group. The torch path: one block's fp32 values and 16-bit uniforms (and its 8-bit
    codes, for 4 bits), and fp32 statistics per group (max, 1 / step, the offset minimum)."""
    if _fused_layout(shape, groups, bits, device, dtype):
        return 8 * math.prod(groups)
    b = _block_elems(shape, groups, bits)
    return 4 * b + 8 * ((b + 3) // 4) + (b + b % 2 if bits == 4 else 0) + 12 * math.prod(groups)


def unpack_workspace_nbytes(shape: Sequence[int], bits: int, groups: Sequence[int], dtype=torch.float32,
                            device="cpu") -> int:
    """Bytes the unpacking allocates besides the dequantized X: none in the fused CPU loops; in the
    torch path one block's 8-bit codes (4 bits), and its fp32 values where X is not fp32."""
    if _fused_layout(shape, groups, bits, device, dtype):
        return 0
    b = _block_elems(shape, groups, bits)
    return (b + b % 2 if bits == 4 else 0) + (4 * b if dtype != torch.float32 else 0)


def _range(x: torch.Tensor, groups: Sequence[int], levels: int):
    """(lo, step) per group, fp32: the group's minimum and (max - min) / levels (1 where constant)."""
    dims = [d for d, g in enumerate(groups) if g == 1 and x.shape[d] != 1] if x.dim() else []
    if dims:
        lo, hi = x.amin(dim=dims, keepdim=True).float(), x.amax(dim=dims, keepdim=True).float()
    else:
        lo, hi = x.float().clone(), x.float().clone()
    step = hi.sub_(lo).div_(levels)
    step = torch.where(step > 0, step, 1.0)  # a constant group: codes 0, lo exact
    return lo.reshape(groups), step.reshape(groups)


def _pack_impl(x: torch.Tensor, seed: torch.Tensor, bits: int, groups: Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as flat uint8, lo, step) of x with stochastic rounding from ``seed`` (0-d int64):
    q = floor((x - lo) / step + u), u = (r + 1/2) / 2**16 with r 16 random bits per element. The
    fused CPU loops take r from a hash of the element's position (one pass for the range, one for
    the codes); the torch path, block by block, from a generator seeded by ``seed``. On fake
    tensors the buffers are allocated and the loops, which allocate nothing, are skipped."""
    levels = (1 << bits) - 1
    shape, n = list(x.shape), x.numel()
    out = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=x.device)
    view = _fused_layout(shape, groups, bits, x.device, x.dtype)
    if view:
        rows, mid, tail = view
        x3 = x.reshape(view).contiguous()
        if fake_or_meta(x):
            lo, step = (torch.empty(rows, tail, dtype=torch.float32, device=x.device) for _ in range(2))
        else:
            lo, step = cpu_kernels.group_range(x3, levels)
        offset = lo - (0.5 / RNG_LEVELS) * step  # u's half level goes into lo, once per group
        inv = step.reciprocal()
        if not fake_or_meta(x):
            cpu_kernels.pack(x3, offset, inv, out, cpu_kernels.mix32_key(int(seed)), bits)
        return out, lo.reshape(groups), step.reshape(groups)
    lo, step = _range(x, groups, levels)
    # u = 1/2 + 1/(2 K) + r / K, r a signed 16-bit draw: the constant goes into lo, once per group
    offset = lo - (0.5 + 0.5 / RNG_LEVELS) * step
    xs, (offset, inv), blocks = _views(x, shape, groups, bits, offset, step.reciprocal())
    b = _block_elems(shape, groups, bits)
    buf = torch.empty(b, dtype=torch.float32, device=x.device)
    draws = torch.empty((b + 3) // 4, dtype=torch.int64, device=x.device)
    codes8 = torch.empty(b + b % 2, dtype=torch.uint8, device=x.device) if bits == 4 else None
    if fake_or_meta(x):
        return out, lo, step
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    for block in blocks:
        part, rs, a = _part(xs, block)
        count = part.numel()
        t = buf[:count].view(part.shape)
        torch.sub(part, offset[rs], out=t)
        t.mul_(inv[rs])
        r = draws[:(count + 3) // 4].random_(-2 ** 63, None, generator=gen).view(torch.int16)[:count]
        t.add_(r.view(part.shape), alpha=1.0 / RNG_LEVELS).clamp_(0, levels)
        if bits == 8:
            out[a:a + count].view(part.shape).copy_(t)  # float -> uint8 truncates: the floor, t >= 0
        else:  # two codes per byte, element 2i in the low nibble
            q = codes8[:count + count % 2]
            q[count:] = 0
            q[:count].view(part.shape).copy_(t)
            pairs = q.view(-1, 2)
            out[a // 2:a // 2 + pairs.shape[0]].copy_(pairs[:, 1]).bitwise_left_shift_(4).bitwise_or_(pairs[:, 0])
    return out, lo, step


quant_pack = torch.library.custom_op("fxsketch::quant_pack", _pack_impl, mutates_args=())
quant_pack.register_fake(_pack_impl)


def _unpack_impl(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int,
                 shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """lo + q step, of ``shape`` in ``dtype``, block by block, written into the result."""
    shape, groups = list(shape), list(lo.shape)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    view = _fused_layout(shape, groups, bits, codes.device, dtype)
    if view:
        lo, step = lo.contiguous(), step.contiguous()
        if not fake_or_meta(codes):
            cpu_kernels.unpack(codes, lo, step, out.view(view), bits)
        return out
    xs, (lo, step), blocks = _views(out, shape, groups, bits, lo, step)
    b = _block_elems(shape, groups, bits)
    codes8 = torch.empty(b + b % 2, dtype=torch.uint8, device=codes.device) if bits == 4 else None
    buf = torch.empty(b, dtype=torch.float32, device=codes.device) if dtype != torch.float32 else None
    if fake_or_meta(codes):
        return out
    for block in blocks:
        part, rs, a = _part(xs, block)
        count = part.numel()
        if bits == 8:
            q = codes[a:a + count]
        else:
            src = codes[a // 2:a // 2 + (count + 1) // 2]
            pairs = codes8[:2 * src.numel()].view(-1, 2)
            torch.bitwise_and(src, 15, out=pairs[:, 0])
            torch.bitwise_right_shift(src, 4, out=pairs[:, 1])
            q = codes8[:count]
        t = part if buf is None else buf[:count].view(part.shape)
        t.copy_(q.view(part.shape)).mul_(step[rs]).add_(lo[rs])
        if buf is not None:
            part.copy_(t)
    return out


quant_unpack = torch.library.custom_op("fxsketch::quant_unpack", _unpack_impl, mutates_args=())
quant_unpack.register_fake(_unpack_impl)


def quantize(x: torch.Tensor, bits: int = 8, groups: Sequence[int] | None = None, *,
             generator: torch.Generator | None = None):
    """(codes, lo, step) of x: what the norms save (groups: :func:`quant_groups` of a BatchNorm input)."""
    groups = quant_groups(x.shape, "batch") if groups is None else list(groups)
    return quant_pack(x.detach(), draw_seed(generator, x), _check_bits(bits), groups)


def dequantize(codes, lo, step, bits: int, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """The copy the backward reads: ``lo + q * step``."""
    return quant_unpack(codes, lo, step, _check_bits(bits), list(shape), dtype)


class _QuantNorm(torch.autograd.Function):
    """Exact forward by torch's kernel; saves the codes and the exact statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, seed, kind, args, bits, groups, inplace=False):
        if inplace and kind == "batch" and args[2]:
            return _QuantNorm._batch_in_place(ctx, x, weight, bias, seed, args, bits, groups)
        if kind == "batch":
            rm, rv, training, momentum, eps = args
            out, mean, rstd, reserve, impl = torch._batch_norm_impl_index(
                x, weight, bias, rm, rv, training, momentum, eps, torch.backends.cudnn.enabled)
            ctx.extra = (impl, training, eps)
            stats = (mean, rstd, reserve) + ((rm, rv) if not training else ())
        elif kind == "group":
            n, c, hw, g, eps = args
            out, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, hw, g, eps)
            ctx.extra, stats = (n, c, hw, g), (mean, rstd)
        else:
            normalized, eps = args
            out, mean, rstd = aten.native_layer_norm(x, normalized, weight, bias, eps)
            ctx.extra, stats = (normalized,), (mean, rstd)
        _QuantNorm._pack(ctx, x, weight, bias, seed, kind, bits, groups, stats)
        return out

    @staticmethod
    def _pack(ctx, x, weight, bias, seed, kind, bits, groups, stats):
        """Save the codes of X (packed in its memory order), the weight, bias and statistics."""
        order = pack_order(kind, x.shape, x.stride())
        codes, lo, step = quant_pack(in_order(x, order), seed, bits, [groups[d] for d in order])
        ctx.kind, ctx.bits, ctx.shape, ctx.dtype, ctx.order = kind, bits, tuple(x.shape), x.dtype, order
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(codes, lo, step, weight, bias, *stats)

    @staticmethod
    def _batch_in_place(ctx, x, weight, bias, seed, args, bits, groups):
        """A batch-statistics BatchNorm written over its input: the statistics (and the running
        ones' update) by torch's ``batch_norm_update_stats``, the codes packed from X, then X
        scaled and shifted in place as torch's kernel does it (``x * alpha + beta``); no output
        beside X. Equal to torch's output within fp32 rounding (rstd from the fp32 variance)."""
        rm, rv, training, momentum, eps = args
        mean, var = aten.batch_norm_update_stats(x, rm, rv, momentum)
        rstd = var.add(eps).rsqrt_()
        # no reserve: torch's native backward
        _QuantNorm._pack(ctx, x, weight, bias, seed, "batch", bits, groups, (mean, rstd, None))
        view = [1, -1] + [1] * (x.dim() - 2)
        alpha = rstd if weight is None else rstd * weight
        beta = -mean * alpha if bias is None else bias - mean * alpha
        x.mul_(alpha.view(view)).add_(beta.view(view))
        ctx.mark_dirty(x)
        ctx.extra = (None, training, eps)
        return x

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise UnsupportedError(
                "fxsketch.ops.quant norms do not support double backward (create_graph=True, e.g. a "
                "gradient penalty): their backward reads a quantized copy of the input. Plan without "
                "them: optimize(..., methods=('probe', 'lean', 'recompute')).")
        codes, lo, step, weight, bias, *stats = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.has_weight and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        dy = from_order(in_order(dy, ctx.order), ctx.order)  # laid out as X was (a view where it is)
        dx, dw, db = _norm_backward(ctx.kind, ctx.extra, dy, (codes, lo, step), ctx.bits,
                                    list(ctx.shape), ctx.dtype, weight, bias, stats, mask, ctx.order)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None, None)


def pack_order(kind: str, shape: Sequence[int], stride: Sequence[int] | None) -> list[int]:
    """The dim order X is packed in: a BatchNorm input over a batch laid out channels_last (batch
    dim outermost) as it lies in memory (:func:`fxsketch.ops._args.layout_order`; its scales are
    then per sample and channel over (H, W) rows), no copy into logical order; otherwise logical."""
    order = list(range(len(shape)))
    if kind == "batch" and len(shape) > 2 and shape[0] > 1:
        lay = layout_order(shape, stride)
        if lay[0] == 0:
            return lay
    return order


BACKWARD_CHUNKS = 8
"""The norm backward dequantizes X in this many chunks (of the batch, or of the channels of a
batch-1 BatchNorm input such as InstanceNorm's view), so it holds one chunk of X, not all of it,
beside the gradients dY and dX."""


BACKWARD_MIN_ELEMENTS = 1 << 22
"""Below this many elements of X (16 MiB of fp32) the backward reads X whole: what chunks would
save is small there, and their calls are overhead (``tools/bench_quant_pack.py --shape 1 256 56 56``;
at 16x256x56x56 the chunks are faster than one call)."""


def _native_backward(kind, extra, dy, x, weight, bias, stats, mask):
    """torch's own norm backward of one (chunk of a) norm: (dX, dW, dB), None where not asked."""
    if kind == "batch":
        impl, training, eps = extra
        mean, rstd, reserve, *running = stats
        rm, rv = running if running else (None, None)
        if reserve is None:  # a chunk: cuDNN's reserve space is of the whole input
            return aten.native_batch_norm_backward(dy, x, weight, rm, rv, mean, rstd, training, eps, mask)
        return aten._batch_norm_impl_index_backward(impl, x, dy, weight, rm, rv, mean, rstd, training, eps, mask, reserve)
    if kind == "group":
        return aten.native_group_norm_backward(dy, x, *stats, weight, *extra, mask)
    return aten.native_layer_norm_backward(dy, x, extra[0], *stats, weight, bias, mask)


def backward_chunks(kind: str, shape: Sequence[int], bits: int, normalized_dims: int = 0):
    """(dim, [(start, stop), ...]): the chunks the backward dequantizes X in, along the batch (dim
    0) or, for a batch-1 BatchNorm input, the channels (dim 1); None where X is read whole (a
    dim of size 1, a LayerNorm over every dim, 4-bit chunks that would start inside a byte, fewer
    than BACKWARD_MIN_ELEMENTS elements)."""
    shape = list(shape)
    dim = 1 if kind == "batch" and len(shape) >= 2 and shape[0] == 1 else 0
    if kind == "layer" and len(shape) - max(1, normalized_dims) < 1 or shape[dim] < 2 \
            or math.prod(shape) < BACKWARD_MIN_ELEMENTS:
        return None
    per = -(-shape[dim] // BACKWARD_CHUNKS)
    if bits == 4 and per * math.prod(shape[dim + 1:]) % 2:
        return None
    return dim, [(a, min(shape[dim], a + per)) for a in range(0, shape[dim], per)]


def fused_bn_layout(shape: Sequence[int], order: Sequence[int], bits: int, device, dtype):
    """(L, M, T) of the packing where the fused CPU loops run a batch-statistics BatchNorm's
    backward from the codes (:func:`fxsketch.ops.cpu_kernels.bn_sums`, ``bn_dx``): X of ``shape``
    packed in ``order`` (:func:`pack_order`), fp32 on the CPU, the channels as T (channels_last)
    or one channel per row of L (logical order, T = 1); else None (the torch path)."""
    shape, order = list(shape), list(order)
    if len(shape) < 3:
        return None
    groups = quant_groups(shape, "batch")
    view = _fused_layout([shape[d] for d in order], [groups[d] for d in order], bits, device, dtype)
    if view is None:
        return None
    rows, _, tail = view
    c = shape[1]
    if tail == c and order[-1] == 1 or tail == 1 and order[:2] == [0, 1] and rows % c == 0:
        return view
    return None


def backward_workspace_nbytes(kind: str, shape: Sequence[int], bits: int, groups: Sequence[int],
                              dtype=torch.float32, normalized_dims: int = 0, device="cpu",
                              order: Sequence[int] | None = None, batch_stats: bool = True) -> int:
    """Bytes the norm backward allocates besides dX: the dequantized chunk of X and its unpacking's
    buffers, and the chunk of dX torch's kernel returns before it is copied into dX (a training
    BatchNorm over a batch writes dX in place); the whole X where it is read whole. A
    batch-statistics BatchNorm in the fused CPU loops (:func:`fused_bn_layout`; X packed in
    ``order``, logical by default) reads the codes as it goes: per-channel sums and coefficients."""
    if kind == "batch" and batch_stats:
        view = fused_bn_layout(shape, order or range(len(shape)), bits, device, dtype)
        if view:
            return cpu_kernels.bn_workspace_nbytes(shape[1], view[2])
    size = torch.empty((), dtype=dtype).element_size()
    plan = backward_chunks(kind, shape, bits, normalized_dims)
    if plan is None:
        return math.prod(shape) * size + unpack_workspace_nbytes(shape, bits, groups, dtype, device)
    dim, ranges = plan
    a, b = ranges[0]
    cshape = list(shape)
    cshape[dim] = b - a
    cgroups = list(groups)
    if cgroups[dim] != 1:
        cgroups[dim] = b - a
    chunk = math.prod(cshape) * size
    in_place = kind == "batch" and dim == 0
    return chunk + unpack_workspace_nbytes(cshape, bits, cgroups, dtype, device) + (0 if in_place else chunk)


def unpack_slice(packed, bits: int, shape: Sequence[int], dtype, order: Sequence[int] | None = None,
                 dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The dequantized X[start:stop] along ``dim`` (all of X by default) from ``packed`` = (codes,
    lo, step) of X of ``shape`` packed in ``order`` (:func:`fxsketch.ops._args.memory_order`), in
    X's layout. The slice must be contiguous in the packing (every dim before ``dim`` in ``order``
    of size 1, as the batch dim of a channels_last tensor is outermost) and, with 4 bits, start at
    a whole byte."""
    codes, lo, step = packed
    shape = list(shape)
    order = list(range(len(shape))) if order is None else list(order)
    stop = shape[dim] if stop is None else stop
    pos = order.index(dim)
    if any(shape[d] != 1 for d in order[:pos]):
        raise ValueError(f"dim {dim} is not outermost in the packing order {order} of shape {shape}")
    inner = math.prod(shape[d] for d in order[pos + 1:])
    if bits == 4 and start * inner % 2:
        raise ValueError(f"a 4-bit slice must start at a whole byte: element {start * inner}")
    cshape = list(shape)
    cshape[dim] = stop - start
    if (start, stop) != (0, shape[dim]):
        codes = codes[start * inner * bits // 8:(stop * inner * bits + 7) // 8]
        if lo.shape[pos] != 1:
            lo, step = lo.narrow(pos, start, stop - start).contiguous(), step.narrow(pos, start, stop - start).contiguous()
    return from_order(quant_unpack(codes, lo, step, bits, [cshape[d] for d in order], dtype), order)


def _norm_backward(kind, extra, dy, packed, bits, shape, dtype, weight, bias, stats, mask, order=None):
    """(dX, dW, dB) of a quantized norm, X dequantized chunk by chunk (:func:`backward_chunks`).

    A BatchNorm over the batch needs sums over every sample: a first pass adds up dB = sum dY and
    dW = sum dY X^ chunk by chunk (torch's kernel), a second writes dX = w rstd (dY - dB / M - X^ dW / M)
    into dX chunk by chunk (in eval mode dX = w rstd dY, running statistics, X not read). Every other norm's chunks are
    independent (per-sample statistics, or per channel of a batch-1 input): torch's kernel on
    each, dW and dB added up (or placed, per channel). ``order``: the memory order X was packed in
    (:func:`fxsketch.ops._args.memory_order`; its batch dim first), which dY is laid out in."""
    order = list(range(len(shape))) if order is None else list(order)
    if kind == "batch" and extra[1]:
        view = fused_bn_layout(shape, order, bits, dy.device, dtype)
        if view and dy.dtype == torch.float32:
            return _fused_bn_backward(extra, dy, packed, bits, shape, weight, bias, stats, mask, order, view)
    normalized = len(extra[0]) if kind == "layer" else 0
    plan = backward_chunks(kind, shape, bits, normalized)
    if plan is None:
        x = unpack_slice(packed, bits, shape, dtype, order)
        return _native_backward(kind, extra, dy, x, weight, bias, stats, mask)
    dim, ranges = plan

    def chunk_x(a, b):
        return unpack_slice(packed, bits, shape, dtype, order, dim, a, b)

    dx = torch.empty_like(dy) if mask[0] else None
    sums: list = [None, None]  # dW, dB over the chunks

    def add(k, t):
        sums[k] = t.float() if sums[k] is None else sums[k].add_(t)
    if kind == "batch" and dim == 0:  # statistics over the batch: dW, dB first, then dX in place
        _, training, eps = extra
        mean, rstd, _, *running = stats
        rm, rv = running if running else (None, None)
        for a, b in ranges:
            _, gw, gb = aten.native_batch_norm_backward(dy[a:b], chunk_x(a, b), weight, rm, rv, mean, rstd,
                                                        training, eps, [False, True, True])
            add(0, gw), add(1, gb)
        gw, gb = sums
        if mask[0]:
            view = [1, shape[1]] + [1] * (len(shape) - 2)
            r = rstd.float() if training else rv.float().add(eps).rsqrt()
            k = r if weight is None else r * weight.float()
            if not training:  # running statistics: dX = w rstd dY
                torch.mul(dy, k.to(dy.dtype).view(view), out=dx)
            else:
                coef_x = -k * r * gw / (math.prod(shape) // shape[1])
                const = -k * gb / (math.prod(shape) // shape[1]) - coef_x * mean.float()
                k, coef_x, const = (t.to(dy.dtype).view(view) for t in (k, coef_x, const))
                for a, b in ranges:
                    out = dx[a:b]
                    torch.mul(dy[a:b], k, out=out)
                    out.addcmul_(chunk_x(a, b), coef_x).add_(const)
        return dx, gw.to(weight.dtype) if mask[1] else None, gb.to(bias.dtype) if mask[2] else None
    per_channel = kind == "batch" and dim == 1
    dw = torch.empty_like(weight) if mask[1] and per_channel else None
    db = torch.empty_like(bias) if mask[2] and per_channel else None
    for a, b in ranges:
        if kind == "batch":
            mean, rstd, _, *running = stats
            if per_channel:
                cut = [t[a:b] if t is not None else None for t in (weight, mean, rstd, *running)]
                w, cstats = cut[0], (cut[1], cut[2], None, *cut[3:])
            else:
                w, cstats = weight, (mean, rstd, None, *running)
        else:
            w, cstats = weight, tuple(t[a:b] for t in stats)
        cextra = (b - a, *extra[1:]) if kind == "group" else extra
        gx, gw, gb = _native_backward(kind, cextra, dy.narrow(dim, a, b - a), chunk_x(a, b), w, bias, cstats, mask)
        if mask[0]:
            dx.narrow(dim, a, b - a).copy_(gx)
        del gx
        if per_channel:
            if mask[1]:
                dw[a:b] = gw
            if mask[2]:
                db[a:b] = gb
        else:
            if mask[1]:
                add(0, gw)
            if mask[2]:
                add(1, gb)
    if not per_channel:
        dw = sums[0].to(weight.dtype) if mask[1] else None
        db = sums[1].to(bias.dtype) if mask[2] else None
    return dx, dw, db


def _fused_bn_backward(extra, dy, packed, bits, shape, weight, bias, stats, mask, order, view):
    """(dX, dW, dB) of a batch-statistics BatchNorm from the codes by the fused CPU loops, X never
    dequantized into memory: a pass for dB = sum dY and dW = rstd sum dY (X - mean) per channel,
    a pass writing dX = w rstd (dY - dB / M - X^ dW / M) as (dY k + X a) + b (the coefficients per
    channel in fp64, as the torch path's formula). On fake tensors only the results are allocated."""
    codes, lo, step = packed
    rows, mid, tail = view
    c = shape[1]
    mean, rstd = stats[0], stats[1]
    dy3 = in_order(dy, order).view(rows, mid, tail)  # a view: dY is laid out as X was packed
    lo2, step2 = lo.reshape(rows, tail).contiguous(), step.reshape(rows, tail).contiguous()
    fake = fake_or_meta(dy)
    if fake:
        sdy, sdx = (torch.empty(c, dtype=torch.float64, device=dy.device) for _ in range(2))
    else:
        sdy, sdx = cpu_kernels.bn_sums(codes, lo2, step2, dy3, mean.float().contiguous(), bits)
    r = rstd.double()
    gw, gb = sdx * r, sdy
    dx = None
    if mask[0]:
        m = math.prod(shape) // c
        k = r if weight is None else r * weight.double()
        a = -k * r * gw / m
        b = -k * gb / m - a * mean.double()
        out3 = torch.empty(rows, mid, tail, dtype=torch.float32, device=dy.device)
        if not fake:
            cpu_kernels.bn_dx(codes, lo2, step2, dy3, k.float(), a.float(), b.float(), out3, bits)
        dx = from_order(out3.view([shape[d] for d in order]), order)
    return dx, gw.to(weight.dtype) if mask[1] else None, gb.to(bias.dtype) if mask[2] else None


def _apply(x, weight, bias, kind, args, bits, generator, normalized_dims=0, inplace=False):
    bits = _check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"a quantized norm needs a floating-point tensor input, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    groups = quant_groups(x.shape, "layer" if kind == "layer" else kind, normalized_dims)
    # in place: fp32 throughout (autocast's casts and mixed dtypes take torch's kernel)
    inplace = bool(inplace) and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type) \
        and all(t is None or t.dtype == torch.float32 for t in (weight, bias))
    return _QuantNorm.apply(x, weight, bias, draw_seed(generator, x), kind, args, bits, groups, inplace)


@traceable
def quant_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5, *, bits: int = 8, generator: Optional[torch.Generator] = None, inplace: bool = False):
    """``F.batch_norm`` (same arguments, same output bits) saving its input in ``bits`` bits.
    ``inplace``: with batch statistics, an fp32 input is normalized in place and returned (no
    output beside it; equal to torch's within fp32 rounding): for an input nothing else reads.

    >>> x = torch.randn(4, 3, 5)
    >>> torch.equal(quant_batch_norm(x, None, None, training=True, bits=4), torch.nn.functional.batch_norm(x, None, None, training=True))
    True
    """
    if training:
        size = input.shape
        if math.prod(size[:1] + size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(size)}")
    return _apply(input, weight, bias, "batch", (running_mean, running_var, bool(training), momentum, eps),
                  bits, generator, inplace=inplace)


def _low_precision_norm(input, weight, bias):
    """Autocast runs group_norm and layer_norm in fp32: cast as it would (the ops below are native
    ones autocast does not know)."""
    dev = input.device.type
    if not torch.is_autocast_enabled(dev):
        return input, weight, bias
    cast = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (input, weight, bias)]
    return tuple(cast)


@traceable
def quant_group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, bits: int = 8,
                     generator: Optional[torch.Generator] = None):
    """``F.group_norm`` saving its input in ``bits`` bits."""
    if input.dim() < 2 or input.shape[1] % num_groups:
        raise ValueError(f"group_norm: expected input (N, C, *) with C divisible by num_groups={num_groups}, "
                         f"got shape {tuple(input.shape)}")
    x, weight, bias = _low_precision_norm(input, weight, bias)
    n, c = x.shape[:2]
    with torch.autocast(x.device.type, enabled=False):
        return _apply(x.contiguous(), weight, bias, "group", (n, c, math.prod(x.shape[2:]), int(num_groups), eps),
                      bits, generator)


@traceable
def quant_layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5, *, bits: int = 8,
                     generator: Optional[torch.Generator] = None):
    """``F.layer_norm`` saving its input in ``bits`` bits (scale and zero point per normalized row)."""
    normalized = [normalized_shape] if isinstance(normalized_shape, int) else [int(s) for s in normalized_shape]
    if list(input.shape[input.dim() - len(normalized):]) != normalized:
        raise ValueError(f"layer_norm: normalized_shape {normalized} does not end input shape {tuple(input.shape)}")
    x, weight, bias = _low_precision_norm(input, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return _apply(x, weight, bias, "layer", (normalized, eps), bits, generator, len(normalized))


@traceable
def quant_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                        momentum=0.1, eps=1e-5, *, bits: int = 8, generator: Optional[torch.Generator] = None,
                        inplace: bool = False):
    """``F.instance_norm`` saving its input in ``bits`` bits: as torch does it, a batch norm of the
    (1, N*C, ...) view with weight, bias and running statistics repeated per sample (``inplace``:
    as :func:`quant_batch_norm`'s, over a contiguous input)."""
    if input.dim() < 3:
        raise ValueError(f"instance_norm: expected input (N, C, *spatial), got shape {tuple(input.shape)}")
    n, c = input.shape[:2]
    rep = (lambda t: t.repeat(n) if t is not None else None)
    rm, rv = rep(running_mean), rep(running_var)
    out = quant_batch_norm(input.contiguous().view(1, n * c, *input.shape[2:]), rm, rv, rep(weight), rep(bias),
                           use_input_stats, momentum, eps, bits=bits, generator=generator, inplace=inplace)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(rm.view(n, c).mean(0))
        if running_var is not None:
            running_var.copy_(rv.view(n, c).mean(0))
    return out.view_as(input)


@traceable
def quant_norm_module(input, module: nn.Module, *, bits: int = 8, generator: Optional[torch.Generator] = None,
                      inplace: bool = False):
    """``module(input)`` for a BatchNorm, GroupNorm, InstanceNorm or LayerNorm module, saving its input
    in ``bits`` bits; reads the module's train/eval flag and statistics settings when called.
    ``inplace``: a BatchNorm or InstanceNorm with batch statistics normalizes its input in place
    (:func:`quant_batch_norm`)."""
    kw = dict(bits=bits, generator=generator)
    inplace_kw = dict(kw, inplace=inplace)
    m = module
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        factor = 0.0 if m.momentum is None else m.momentum
        if m.training and m.track_running_stats and m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        batch_stats = m.training or (m.running_mean is None and m.running_var is None)
        keep = not m.training or m.track_running_stats
        return quant_batch_norm(input, m.running_mean if keep else None, m.running_var if keep else None,
                                m.weight, m.bias, batch_stats, factor, m.eps, **inplace_kw)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        unbatched = input.dim() == m._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        out = quant_instance_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                  m.training or not m.track_running_stats,
                                  m.momentum if m.momentum is not None else 0.0, m.eps, **inplace_kw)
        return out.squeeze(0) if unbatched else out
    if isinstance(m, nn.GroupNorm):
        return quant_group_norm(input, m.num_groups, m.weight, m.bias, m.eps, **kw)
    if isinstance(m, nn.LayerNorm):
        return quant_layer_norm(input, m.normalized_shape, m.weight, m.bias, m.eps, **kw)
    raise TypeError(f"quant_norm_module takes a BatchNorm, InstanceNorm, GroupNorm or LayerNorm module, "
                    f"got {type(m).__name__}")
