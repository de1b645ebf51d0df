"""The probed convolution's math, in plain torch: the sketch, the dW estimates, the geometry.

Y = conv(X, W) needs X only for dW. The forward pass computes Y exactly with ``F.convNd``, and
stores the sketch Xbar = Z^T X (see :mod:`fxsketch.ops.probes`) instead of X, plus an integer seed.
The backward pass computes dX and db exactly with torch's own convolution backward (they need
only W and dY) and regenerates Z from the seed to estimate

    dW[o, c, k] = sum_{n, p} dY[n, o, p] * Xhat[n, c, q(p, k)],   Xhat = Z Z^T X,

with q(p, k) = stride * p + dilation * k - pad_left per axis, and Xhat = 0 where q falls in the
padding. E[Z Z^T] = I makes E[Xhat] = X, and dW is linear in Xhat, so the estimate is unbiased.

Spatial mode sums in the sketch domain: for each tap k, B_k[j, n, o] = sum_p dY[n, o, p] *
Z[q(p, k), j] (a scatter of dY into r buckets), then dW[:, :, k] = sum_{n, j} B_k * Xbar (a small
matmul) — no tensor of X's size is ever rebuilt. Channel mode rebuilds Xhat in batch chunks and
calls torch's exact weight gradient on it. Both keep transients to a few MiB per chunk.

This module is the reference the Triton kernels are tested against and what the calibrator
calls directly; the op itself, :func:`fxsketch.ops.probed_conv`, wraps these functions in torch
custom ops (:mod:`fxsketch.ops.conv`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._args import per_axis
from .probes import probe_buckets_and_values

__all__ = ["ConvGeometry", "conv_geometry", "sketch", "dw_spatial", "dw_channel", "reconstruct",
           "exact_weight_grad", "tap_indices", "sketch_workspace_nbytes", "weight_grad_workspace_nbytes"]

# Target transient size (elements) of one chunk in forward and backward; at least one sample.
CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class ConvGeometry:
    """Per-axis conv arguments in explicit form (padding resolved to left/right amounts)."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    groups: int

    @property
    def symmetric(self) -> bool:
        return self.pad_left == self.pad_right


def conv_geometry(weight_shape, stride, padding, dilation, groups) -> ConvGeometry:
    """Resolve F.convNd's (stride, padding, dilation) forms into per-axis explicit amounts.

    >>> conv_geometry((8, 4, 3, 4), 1, "same", 1, 1).pad_left, conv_geometry((8, 4, 3, 4), 1, "same", 1, 1).pad_right
    ((1, 1), (1, 2))
    """
    d = len(weight_shape) - 2
    what = f" for a {d}d conv"
    stride, dilation = per_axis(stride, d, "stride", what), per_axis(dilation, d, "dilation", what)
    if isinstance(padding, str):
        if padding == "valid":
            left = right = (0,) * d
        elif padding == "same":
            # Same rule as torch: total = dilation * (k - 1), the extra one goes on the right.
            total = [dl * (k - 1) for dl, k in zip(dilation, weight_shape[2:])]
            left = tuple(t // 2 for t in total)
            right = tuple(t - t // 2 for t in total)
        else:
            raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
    else:
        left = right = per_axis(padding, d, "padding", what)
    return ConvGeometry(stride, dilation, left, right, int(groups))


def _transient_elems(numel: int) -> int:
    """Elements a temporary may hold: about 1/8 of the tensor it is made from, capped at
    CHUNK_ELEMS (and at least 2**16, so small tensors are not cut into many pieces)."""
    return max(1 << 16, min(CHUNK_ELEMS, numel // 8))


def _chunk(n: int, per_sample: int, budget: int = CHUNK_ELEMS) -> int:
    """Samples per chunk so that a chunk holds about ``budget`` elements (at least one sample)."""
    return max(1, min(n, budget // max(1, per_sample)))


def _csr_sorted(rows, cols, values, shape) -> torch.Tensor:
    """A CSR matrix from COO triplets already sorted by row; sparse @ dense is the fast scatter."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, shape)


def _sorted_probe(seed, pixels, rank, probe, device):
    """Pixel positions sorted by bucket, with their buckets and values: the one sort per pass,
    over pixels only (shared by all samples, channels and taps)."""
    bucket, value = probe_buckets_and_values(seed, torch.arange(pixels, device=device), rank, probe, device)
    order = torch.argsort(bucket, stable=True)
    return order, bucket[order], value[order]


def _bucket_sum(zt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[i, j] = sum_q Z[q, j] * rows[i, q] with Z^T given as CSR (rank x positions); fp32."""
    return torch.sparse.mm(zt, rows.float().t()).t()


def sketch(x: torch.Tensor, seed: int, rank: int, mode: str, probe: str) -> torch.Tensor:
    """Xbar = Z^T X: (N, C, rank) in spatial mode, (N, rank) in channel mode, in x's dtype."""
    n, c = x.shape[:2]
    pixels = math.prod(x.shape[2:])
    x3 = x.view(n, c, pixels) if x.is_contiguous() else x  # a channels_last x: each chunk reshaped (copied) alone
    if mode == "spatial":
        order, bucket, value = _sorted_probe(seed, pixels, rank, probe, x.device)
        zt = _csr_sorted(bucket, order, value, (rank, pixels))
        out = torch.empty(n, c, rank, dtype=x.dtype, device=x.device)
        step = _chunk(n, c * pixels, _transient_elems(x.numel()))
        for i in range(0, n, step):
            rows = x3[i:i + step].reshape(-1, pixels)  # (chunk * C, P)
            out[i:i + step] = _bucket_sum(zt, rows).reshape(-1, c, rank)
        return out
    out = torch.zeros(n, rank, dtype=torch.float32, device=x.device)
    step_c = max(1, min(c, CHUNK_ELEMS // max(1, pixels)))
    for c0 in range(0, c, step_c):
        pos = torch.arange(c0 * pixels, min(c, c0 + step_c) * pixels, device=x.device)
        bucket, value = probe_buckets_and_values(seed, pos, rank, probe, x.device)
        step = _chunk(n, pos.numel(), _transient_elems(x.numel()))
        for i in range(0, n, step):
            # Few rows, many positions: a plain scatter beats sorting C*P positions for a CSR.
            rows = x3[i:i + step, c0:c0 + step_c].reshape(-1, pos.numel()).float() * value  # (chunk, channels * P)
            out[i:i + step].scatter_add_(1, bucket.expand(rows.shape[0], -1), rows)
    return out.to(x.dtype)


def tap_indices(kernel, out_shape, in_shape, geo: ConvGeometry, device=None):
    """Flat unpadded input index q(p, k) for every tap k and output position p, shape (K, P_out),
    and whether it is a real input position (False where it falls in the zero padding).

    Per axis q = stride * p + dilation * k - pad_left: stride and dilation enter only here.
    """
    d = len(out_shape)
    flat = torch.zeros((), dtype=torch.int64, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    for a in range(d):
        # Axis a of a (k_0..k_{d-1}, p_0..p_{d-1}) grid, broadcast against the others.
        k_shape, p_shape = [1] * (2 * d), [1] * (2 * d)
        k_shape[a], p_shape[d + a] = kernel[a], out_shape[a]
        k = torch.arange(kernel[a], device=device).view(k_shape)
        p = torch.arange(out_shape[a], device=device).view(p_shape)
        q = p * geo.stride[a] + k * geo.dilation[a] - geo.pad_left[a]
        valid = valid & (q >= 0) & (q < in_shape[a])
        flat = flat * in_shape[a] + q.clamp(0, in_shape[a] - 1)
    taps, pixels_out = math.prod(kernel), math.prod(out_shape)
    return flat.reshape(taps, pixels_out), valid.reshape(taps, pixels_out)


def _tap_blocks(seed, rank, probe, in_spatial, out_spatial, kernel, geo, taps_per_block, device):
    """Yields (first tap, S_b), one block at a time: CSR matrices S_b (taps*rank x P_out) with S_b[t*rank + h(q), p] = s(q), q = q(p, t): the
    probe shifted per tap. Built from input pixels already sorted by bucket, inverting
    q = stride * p + dilation * k - pad_left per axis, so rows come out sorted without a sort;
    q with no output position p (stride gaps, borders) is simply absent."""
    order, bucket, value = _sorted_probe(seed, math.prod(in_spatial), rank, probe, device)
    coords, rest = [], order
    for size in reversed(in_spatial):
        coords.append(rest % size)
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.reverse()
    taps = torch.cartesian_prod(*[torch.arange(k, device=device) for k in kernel]).view(-1, len(kernel))
    for t0 in range(0, taps.shape[0], taps_per_block):
        k = taps[t0:t0 + taps_per_block]
        flat = torch.zeros((), dtype=torch.int64, device=device)
        ok = torch.ones((), dtype=torch.bool, device=device)
        for a, (size_out, q) in enumerate(zip(out_spatial, coords)):
            num = q[None, :] + geo.pad_left[a] - geo.dilation[a] * k[:, a:a + 1]
            p = torch.div(num, geo.stride[a], rounding_mode="floor")
            ok = ok & (num % geo.stride[a] == 0) & (p >= 0) & (p < size_out)
            flat = flat * size_out + p
        rows = bucket[None, :] + rank * torch.arange(k.shape[0], device=device)[:, None]
        yield t0, _csr_sorted(rows[ok], flat[ok], value.expand_as(ok)[ok],
                              (k.shape[0] * rank, math.prod(out_spatial)))


def dw_spatial(dy, xbar, seed, rank, probe, in_spatial, weight_shape, geo) -> torch.Tensor:
    """Estimate dW (fp32) in the sketch domain from dY and a spatial-mode sketch Xbar."""
    n, o = dy.shape[:2]
    out_spatial = dy.shape[2:]
    pixels_out = math.prod(out_spatial)
    c, g = xbar.shape[1], geo.groups
    n_taps = math.prod(weight_shape[2:])
    budget = _transient_elems(dy.numel())
    step = _chunk(n, o * max(pixels_out, rank), budget)
    # taps per block: B (taps * rank x chunk * o) and the block's int64 index temporaries
    # (taps x input pixels) stay within the transient budget too
    pixels_in = math.prod(in_spatial)
    # (building a block holds ~88 bytes, ~22 float elements, per tap and input pixel)
    per_block = max(1, min(n_taps, budget // max(1, rank * step * o, 22 * pixels_in)))
    dw = torch.zeros(n_taps, g, o // g, c // g, dtype=torch.float32, device=dy.device)
    # blocks outer, batch chunks inner: each block is built once and only one is alive at a time
    for t0, s_block in _tap_blocks(seed, rank, probe, in_spatial, out_spatial, weight_shape[2:], geo,
                                   per_block, dy.device):
        kb = s_block.shape[0] // rank
        for i in range(0, n, step):
            # dY^T for the chunk, (P_out, n*o), contiguous: B_k = S_k @ dY^T scatters dY into buckets.
            dyt = dy[i:i + step].reshape(-1, pixels_out).float().t().contiguous()
            xb = xbar[i:i + step].float().view(-1, g, c // g, rank)
            b = torch.sparse.mm(s_block, dyt).view(kb, rank, -1, g, o // g)
            dw[t0:t0 + kb] += torch.einsum("kjngo,ngcj->kgoc", b, xb)
            del dyt, b
    return dw.permute(1, 2, 3, 0).reshape(weight_shape)


def reconstruct(xbar, seed, rank, mode, probe, x_shape, n_slice=slice(None)) -> torch.Tensor:
    """Xhat = Z Z^T X for the samples in ``n_slice`` (fp32), from the sketch alone."""
    c = x_shape[1]
    pixels = math.prod(x_shape[2:])
    xb = xbar[n_slice].float()
    if mode == "spatial":
        bucket, value = probe_buckets_and_values(seed, torch.arange(pixels, device=xbar.device),
                                                 rank, probe, xbar.device)
        xhat = xb[:, :, bucket]
        return xhat.mul_(value).view(-1, *x_shape[1:])  # in place: one |Xhat| temporary, not two
    xhat = torch.empty(xb.shape[0], c * pixels, dtype=torch.float32, device=xbar.device)
    # Hash in channel blocks: the int64 hash temporaries would otherwise be several times |X|.
    step_c = max(1, min(c, CHUNK_ELEMS // max(1, pixels)))
    for lo in range(0, c * pixels, step_c * pixels):
        pos = torch.arange(lo, min(c * pixels, lo + step_c * pixels), device=xbar.device)
        bucket, value = probe_buckets_and_values(seed, pos, rank, probe, xbar.device)
        torch.mul(xb[:, bucket], value, out=xhat[:, lo:lo + pos.numel()])
    return xhat.view(-1, *x_shape[1:])


def exact_weight_grad(dy, x, weight_shape, geo: ConvGeometry) -> torch.Tensor:
    """torch's own dW of conv(x, W) for the output gradient dy (x padded explicitly if asymmetric)."""
    padding = list(geo.pad_left)
    if not geo.symmetric:
        pads = [p for a in reversed(range(len(padding))) for p in (geo.pad_left[a], geo.pad_right[a])]
        x, padding = F.pad(x, pads), [0] * len(padding)
    w = dy.new_empty(1).expand(weight_shape)
    return torch.ops.aten.convolution_backward(
        dy, x, w, None, list(geo.stride), padding, list(geo.dilation), False,
        [0] * len(padding), geo.groups, [False, True, False])[1]


def dw_channel(dy, xbar, seed, rank, probe, x_shape, weight_shape, geo) -> torch.Tensor:
    """Estimate dW (fp32) by rebuilding Xhat in batch chunks and calling torch's exact wgrad."""
    n = x_shape[0]
    dw = torch.zeros(weight_shape, dtype=torch.float32, device=dy.device)
    per_sample = math.prod(x_shape[1:])
    step = _chunk(n, per_sample, _transient_elems(n * per_sample))  # Xhat chunks ~1/8 of X
    for i in range(0, n, step):
        xhat = reconstruct(xbar, seed, rank, "channel", probe, x_shape, slice(i, i + step))
        dw += exact_weight_grad(dy[i:i + step].float(), xhat, weight_shape, geo)
    return dw


def _input_and_bias_grad(dy, x_shape, weight, has_bias, need_dx, need_db, geo):
    """Exact dX and db with torch's convolution backward (they need only W and dY)."""
    d = len(geo.stride)
    shape, padding = list(x_shape), list(geo.pad_left)
    if not geo.symmetric:
        # Asymmetric 'same': gradient of a padding-free conv on the padded input, then crop.
        shape = shape[:2] + [s + l + r for s, l, r in zip(shape[2:], geo.pad_left, geo.pad_right)]
        padding = [0] * d
    dx = db = None
    if need_dx:  # the transposed conv of dY: convolution_backward would copy an input-sized stub (oneDNN)
        k = weight.shape[2:]
        extra = [shape[2 + a] - ((dy.shape[2 + a] - 1) * geo.stride[a] - 2 * padding[a]
                                 + geo.dilation[a] * (k[a] - 1) + 1) for a in range(d)]
        dx = torch.ops.aten.convolution(dy, weight, None, list(geo.stride), padding, list(geo.dilation), True,
                                        extra, geo.groups)
    if need_db and has_bias:
        db = dy.sum(dim=[0, *range(2, dy.dim())])
    if need_dx and not geo.symmetric:
        dx = dx[(slice(None), slice(None)) + tuple(slice(l, l + s) for l, s in zip(geo.pad_left, x_shape[2:]))]
    return dx, db


def sketch_workspace_nbytes(x_shape, rank: int, mode: str) -> int:
    """Estimated peak bytes of the temporaries of :func:`sketch` (probe hashing, the CSR matrix,
    the chunk's products), following its chunking: what the fake ``probe_sketch`` allocates."""
    n, c = x_shape[:2]
    p_in = math.prod(x_shape[2:])
    if mode == "spatial":
        step = _chunk(n, c * p_in, _transient_elems(n * c * p_in))
        return max(48 * p_in, 12 * p_in + 8 * step * c * rank)
    # channel mode: probe hashing over one channel block (48 B per position) and, per batch
    # chunk, the fp32 rows x probe values
    block = max(1, min(c, CHUNK_ELEMS // max(1, p_in))) * p_in
    step = _chunk(n, block, _transient_elems(n * c * p_in))
    return 48 * block + 8 * step * block


def weight_grad_workspace_nbytes(x_shape, y_shape, weight_shape, rank: int, mode: str) -> int:
    """Estimated peak bytes of the temporaries of :func:`dw_spatial` / :func:`dw_channel`,
    following their chunking: what the fake ``probe_weight_grad`` allocates."""
    n, c = x_shape[:2]
    o = y_shape[1]
    p_in, p_out = math.prod(x_shape[2:]), math.prod(y_shape[2:])
    taps = math.prod(weight_shape[2:])
    if mode == "spatial":
        budget = _transient_elems(n * o * p_out)
        step = _chunk(n, o * max(p_out, rank), budget)
        kb = max(1, min(taps, budget // max(1, rank * step * o, 22 * p_in)))
        # B, and einsum's contiguous copies of B and of the Xbar chunk, its bmm output, and the
        # dW accumulator (fp32) beside dY^T of the chunk
        return 32 * p_in + max(88 * kb * p_in, 20 * kb * p_in + 4 * step * o * p_out
                               + 12 * kb * rank * step * o + 4 * step * c * rank
                               + 4 * (kb + taps) * math.prod(weight_shape[:2]))
    # channel mode: probe hashing over one channel block and, per batch chunk, Xhat, its
    # gathered block and dY in fp32
    block = max(1, min(c, CHUNK_ELEMS // max(1, p_in))) * p_in
    step = _chunk(n, c * p_in, _transient_elems(n * c * p_in))
    return 48 * block + 4 * step * (c * p_in + block + o * p_out) + 4 * math.prod(weight_shape)
