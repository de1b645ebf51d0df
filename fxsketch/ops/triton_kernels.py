"""Fused Triton kernels for the probed convolution: the sketch (forward) and the dW estimate (backward).

Drop-in replacements for the torch reference in :mod:`fxsketch.ops.probed` (same arguments,
same results within float tolerance for the same seed):

* :func:`sketch_triton` ~ ``probed.sketch``: Xbar = Z^T X, one read of X. Each program
  loads a tile of rows x positions, hashes each position to (bucket, value) *in the kernel*
  (no probe tensor exists in memory) and atomically adds x * value into out[row, bucket] (fp32).
* :func:`dw_spatial_triton` ~ ``probed.dw_spatial``: one kernel reads dY once; for every
  output position p and kernel tap k it forms the unpadded input position q = stride*p +
  dilation*k - pad_left per axis (skipped where it falls in the padding), hashes q and atomically
  adds dY * value into B[o, k, n, bucket]. Then dW[o, c, k] = sum_{n, j} B[o, k, n, j] Xbar[n, c, j]
  is one batched matmul per group (torch.matmul).
* :func:`reconstruct_triton` / :func:`dw_channel_triton` ~ ``reconstruct`` / ``dw_channel``:
  Xhat = Z Z^T X generated in-kernel from the sketch, then torch's exact weight gradient on it.

The hash is the lowbias32 mix of :mod:`fxsketch.ops.probes`, here in uint32 arithmetic (products
wrap mod 2**32), so buckets are bit-identical to the reference and values agree to float rounding.
The per-stream keys are computed on the host with ``probes.stream_key``.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
read when the first kernel is launched); that is how CI tests them.
"""
from __future__ import annotations

import math
import os

import torch

from .probed import _chunk, exact_weight_grad
from .probes import _S_BUCKET, _S_SHIFT, _S_VALUE, _S_VALUE2, check_rank_mode_probe, stream_key

__all__ = [
    "HAS_TRITON",
    "triton_available",
    "use_triton",
    "sketch_triton",
    "dw_spatial_triton",
    "reconstruct_triton",
    "dw_channel_triton",
]

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # ImportError, or a triton that fails to load its backend
    triton = tl = None
    HAS_TRITON = False

# triton.jit picks interpreter or compiler when a kernel is decorated. The kernels below are
# decorated on first use (see _build), so importing this module early (e.g. from ops.conv)
# does not fix the mode before a test sets TRITON_INTERPRET; once built, the mode is fixed.
_BUILT_INTERPRET: bool | None = None
_KERNELS = ("_mix32", "_probe", "_tile", "_sketch_kernel", "_dw_scatter_kernel", "_reconstruct_kernel")


def _stdlib_interpreted() -> bool:
    """Whether triton's own jit functions (tl.cdiv, ...) were built for the interpreter: triton
    fixes that when triton.language is first imported, so TRITON_INTERPRET=1 set later leaves
    them compiled-only and an interpreted kernel that calls them fails."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction)


def _interpret() -> bool:
    """Whether the kernels run (or, not built yet, will run) under Triton's interpreter: needs
    TRITON_INTERPRET=1 both when triton was imported and at the first kernel launch."""
    if _BUILT_INTERPRET is not None:
        return _BUILT_INTERPRET
    return (HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
            and _stdlib_interpreted())


def _build() -> None:
    """Decorate the kernel functions with triton.jit, once (they call each other by global name)."""
    global _BUILT_INTERPRET
    if _BUILT_INTERPRET is None:
        mode = _interpret()
        for name in _KERNELS:
            globals()[name] = triton.jit(globals()[name])
        _BUILT_INTERPRET = mode

# Transient fp32 elements of B in one dw_spatial_triton chunk (64 MiB); at least one sample-tap.
B_CHUNK_ELEMS = 1 << 24
_PROBE_ID = {"rademacher": 0, "gaussian": 1, "orthogonal": 2}
_MAX_POS = 1 << 32


def triton_available(device) -> bool:
    """Whether the Triton kernels can run on ``device`` (a torch.device, str or tensor).

    True when triton imports and the device is CUDA, or the device is CPU and this process runs
    Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported, e.g. by
    ``import fxsketch``).

    >>> triton_available("meta")
    False
    """
    if not HAS_TRITON:
        return False
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if device.type == "cuda":
        return _interpret() or torch.cuda.is_available()
    return device.type == "cpu" and _interpret()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether probed_conv should send ``tensor``'s work to the kernels: a real CUDA tensor (not a
    fake or meta tensor, as while fxsketch plans) and the kernels available. CPU tensors keep the
    torch path even under the interpreter, which is far slower.

    >>> use_triton(torch.zeros(1))
    False
    """
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "cuda" and not is_fake(tensor) and triton_available(tensor)


def _require(device) -> None:
    if not triton_available(device):
        why = ("triton is not installed" if not HAS_TRITON else
               f"tensors are on {torch.device(device).type}; the kernels need CUDA, or CPU tensors "
               "with TRITON_INTERPRET=1 set before triton is first imported")
        raise RuntimeError(f"fxsketch Triton kernels unavailable: {why}; use the torch reference "
                           "in fxsketch.ops.probed instead")
    _build()


def _keys(seed: int) -> tuple[int, int, int, int]:
    return tuple(stream_key(seed, s) for s in (_S_BUCKET, _S_VALUE, _S_VALUE2, _S_SHIFT))


def _pow2(n: int, cap: int) -> int:
    return max(1, min(cap, triton.next_power_of_2(max(1, int(n)))))


def _launch(rows: int, cols: int, device) -> tuple[tuple[int], dict]:
    """Grid and tile sizes (the BLOCK_R, BLOCK_C keyword arguments) of a rows x cols problem;
    large tiles in the interpreter (fewer programs)."""
    block_c = _pow2(cols, 1024)
    block_r = _pow2(rows, max(1, (8192 if device.type == "cpu" else 4096) // block_c))
    return (triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c),), dict(BLOCK_R=block_r, BLOCK_C=block_c)


def _rows_cols(n: int, c: int, p: int, mode: str) -> tuple[bool, int, int]:
    """(channel mode?, rows, columns) of the sketch problem; the column is the hashed position."""
    channel = mode == "channel"
    rows, cols = (n, c * p) if channel else (n * c, p)
    _check_positions(cols)
    return channel, rows, cols


if HAS_TRITON:
    # Plain functions until _build() decorates them.

    def _mix32(x):
        # lowbias32 on uint32: the products wrap mod 2**32 exactly like probes.mix32.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x

    def _probe(q, rank, key_b, key_v, key_v2, key_s, PROBE: tl.constexpr):
        """(bucket int32, value fp32) of int64 positions q in [0, 2**32), as probes.probe_buckets_and_values."""
        qu = q.to(tl.uint32)
        r = rank.to(tl.uint32)
        if PROBE == 2:  # orthogonal: (q % r + shift(q // r)) % r, the shift reduced first (no overflow)
            shift = _mix32((qu // r) ^ key_s.to(tl.uint32))
            bucket = ((qu % r) + (shift % r)) % r
        else:
            bucket = _mix32(qu ^ key_b.to(tl.uint32)) % r
        u = _mix32(qu ^ key_v.to(tl.uint32))
        if PROBE == 1:  # gaussian, Box-Muller from the top 24 bits of two hashes
            u1 = ((u >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
            u2 = (_mix32(qu ^ key_v2.to(tl.uint32)) >> 8).to(tl.float32) * 5.9604644775390625e-08
            value = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        else:
            value = 1.0 - 2.0 * (u >> 31).to(tl.float32)
        return bucket.to(tl.int32), value

    def _tile(L, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # this program's rows and columns (int64) of a (rows x L) problem cut into BLOCK_R x BLOCK_C tiles
        pid = tl.program_id(0)
        n_col_blocks = tl.cdiv(L, BLOCK_C)
        rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        return rows, cols

    def _sketch_kernel(x_ptr, out_ptr, R, L, C, P, sN, sC, sP, rank,
                       key_b, key_v, key_v2, key_s,
                       PROBE: tl.constexpr, CHANNEL: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Rows x columns of the sketch problem: spatial mode rows = (n, c), columns = pixel p;
        # channel mode rows = n, columns = c * P + p. The column is the hashed position.
        rows, cols = _tile(L, BLOCK_R, BLOCK_C)
        rmask = rows < R
        cmask = cols < L
        if CHANNEL:
            off = rows[:, None] * sN + ((cols // P) * sC + (cols % P) * sP)[None, :]
        else:
            off = ((rows // C) * sN + (rows % C) * sC)[:, None] + (cols * sP)[None, :]
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        bucket, value = _probe(cols, rank, key_b, key_v, key_v2, key_s, PROBE)
        dst = out_ptr + rows[:, None] * rank + bucket[None, :]
        tl.atomic_add(dst, x * value[None, :], mask=mask)

    def _dw_scatter_kernel(dy_ptr, b_ptr, R, O, NB, P_out, K_lo, K_hi, rank,
                           OD1, OD2, ID0, ID1, ID2, KD1, KD2,
                           S0, S1, S2, D0, D1, D2, PL0, PL1, PL2,
                           key_b, key_v, key_v2, key_s,
                           PROBE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # dY viewed (NB * O, P_out) contiguous; B laid out (O, K_hi - K_lo, NB, rank) so the GEMM
        # reads it as (O * K, NB * rank) with no copy. Spatial axes padded to 3 (leading 1s).
        rows, p = _tile(P_out, BLOCK_R, BLOCK_C)
        rmask = rows < R
        pmask = p < P_out
        dy = tl.load(dy_ptr + rows[:, None] * P_out + p[None, :],
                     mask=rmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
        n = rows // O
        o = rows % O
        p0 = p // (OD1 * OD2)
        p1 = (p // OD2) % OD1
        p2 = p % OD2
        taps = K_hi - K_lo
        for k in range(K_lo, K_hi):
            k0 = k // (KD1 * KD2)
            k1 = (k // KD2) % KD1
            k2 = k % KD2
            q0 = p0 * S0 + k0 * D0 - PL0
            q1 = p1 * S1 + k1 * D1 - PL1
            q2 = p2 * S2 + k2 * D2 - PL2
            valid = pmask & (q0 >= 0) & (q0 < ID0) & (q1 >= 0) & (q1 < ID1) & (q2 >= 0) & (q2 < ID2)
            q = tl.where(valid, (q0 * ID1 + q1) * ID2 + q2, 0)
            bucket, value = _probe(q, rank, key_b, key_v, key_v2, key_s, PROBE)
            row_base = ((o * taps + (k - K_lo)) * NB + n) * rank
            dst = b_ptr + row_base[:, None] + bucket[None, :]
            tl.atomic_add(dst, dy * value[None, :], mask=rmask[:, None] & valid[None, :])

    def _reconstruct_kernel(xbar_ptr, out_ptr, R, L, C, P, rank,
                            key_b, key_v, key_v2, key_s,
                            PROBE: tl.constexpr, CHANNEL: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # out (R, L) fp32 = xbar[row, bucket(col)] * value(col); same row/column split as the sketch.
        rows, cols = _tile(L, BLOCK_R, BLOCK_C)
        mask = (rows < R)[:, None] & (cols < L)[None, :]
        bucket, value = _probe(cols, rank, key_b, key_v, key_v2, key_s, PROBE)
        xb = tl.load(xbar_ptr + rows[:, None] * rank + bucket[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + rows[:, None] * L + cols[None, :], xb.to(tl.float32) * value[None, :], mask=mask)


def _check_positions(count: int) -> None:
    if count > _MAX_POS:
        raise ValueError(f"probe positions must be below 2**32, got {count} per sample: "
                         "sketch fewer positions per sample (use mode='spatial')")


def _as_ncp(x: torch.Tensor) -> torch.Tensor:
    """x viewed (N, C, P) without a copy when its strides allow (contiguous, channels_last)."""
    n, c = x.shape[:2]
    try:
        return x.view(n, c, math.prod(x.shape[2:]))
    except RuntimeError:
        return x.reshape(n, c, -1)


def sketch_triton(x: torch.Tensor, seed: int, rank: int, mode: str, probe: str) -> torch.Tensor:
    """Xbar = Z^T X like ``probed.sketch`` (same seed, same result), fp32 accumulation.

    Returns (N, C, rank) in spatial mode, (N, rank) in channel mode, in x's dtype.
    """
    check_rank_mode_probe(rank, mode, probe)
    _require(x.device)
    x3 = _as_ncp(x)
    n, c, p = x3.shape
    channel, rows, cols = _rows_cols(n, c, p, mode)
    out = torch.zeros(rows, rank, dtype=torch.float32, device=x.device)
    if x.numel():
        grid, blocks = _launch(rows, cols, x.device)
        _sketch_kernel[grid](x3, out, rows, cols, c, p, *x3.stride(), rank, *_keys(seed),
                             PROBE=_PROBE_ID[probe], CHANNEL=channel, **blocks)
    out = out.view(n, rank) if channel else out.view(n, c, rank)
    return out.to(x.dtype)


def _pad3(values, fill) -> list[int]:
    values = [int(v) for v in values]
    return [fill] * (3 - len(values)) + values


def dw_spatial_triton(dy, xbar, seed, rank, probe, in_spatial, weight_shape, geo) -> torch.Tensor:
    """Estimate dW (fp32) from dY and a spatial-mode sketch, like ``probed.dw_spatial``.

    dY is read once per chunk of samples and taps (once in all when B for the whole batch fits
    in ``B_CHUNK_ELEMS`` fp32 elements); the probes are regenerated in the kernel.
    """
    check_rank_mode_probe(rank, "spatial", probe)
    _require(dy.device)
    n, o = dy.shape[:2]
    out_spatial, kernel = tuple(dy.shape[2:]), tuple(weight_shape[2:])
    if len(out_spatial) > 3:
        raise ValueError(f"dw_spatial_triton handles 1d/2d/3d convolutions, got {len(out_spatial)}d")
    pixels_out, taps = math.prod(out_spatial), math.prod(kernel)
    _check_positions(math.prod(in_spatial))
    c, g = xbar.shape[1], geo.groups
    og, cg = o // g, c // g
    dw = torch.zeros(g, og, cg, taps, dtype=torch.float32, device=dy.device)
    if dy.numel() == 0:
        return dw.reshape(weight_shape)
    dy3 = dy.reshape(n, o, pixels_out).contiguous()
    keys = _keys(seed)
    geom = (*_pad3(out_spatial, 1)[1:], *_pad3(in_spatial, 1), *_pad3(kernel, 1)[1:],
            *_pad3(geo.stride, 1), *_pad3(geo.dilation, 1), *_pad3(geo.pad_left, 0))
    per_sample_tap = o * rank
    step_n = max(1, min(n, B_CHUNK_ELEMS // (per_sample_tap * taps)))
    step_k = taps if step_n > 1 else max(1, min(taps, B_CHUNK_ELEMS // per_sample_tap))
    for i in range(0, n, step_n):
        nb = min(step_n, n - i)
        dy_chunk = dy3[i:i + nb]
        # Xbar as (g, nb * rank, c/g): the contraction runs over (sample, bucket).
        xb = xbar[i:i + nb].float().view(nb, g, cg, rank).permute(1, 0, 3, 2).reshape(g, nb * rank, cg)
        for k_lo in range(0, taps, step_k):
            k_hi = min(taps, k_lo + step_k)
            b = torch.zeros(o, k_hi - k_lo, nb, rank, dtype=torch.float32, device=dy.device)
            rows = nb * o
            grid, blocks = _launch(rows, pixels_out, dy.device)
            _dw_scatter_kernel[grid](dy_chunk, b, rows, o, nb, pixels_out, k_lo, k_hi, rank,
                                     *geom, *keys, PROBE=_PROBE_ID[probe], **blocks)
            # (g, og * taps_chunk, nb * rank) @ (g, nb * rank, cg) -> (g, og, taps_chunk, cg)
            part = torch.matmul(b.view(g, og * (k_hi - k_lo), nb * rank), xb)
            dw[..., k_lo:k_hi] += part.view(g, og, k_hi - k_lo, cg).transpose(2, 3)
    return dw.reshape(weight_shape)


def reconstruct_triton(xbar, seed, rank, mode, probe, x_shape, n_slice=slice(None)) -> torch.Tensor:
    """Xhat = Z Z^T X (fp32) for the samples in ``n_slice``, like ``probed.reconstruct``."""
    check_rank_mode_probe(rank, mode, probe)
    _require(xbar.device)
    xb = xbar[n_slice].contiguous()
    n, c = xb.shape[0], int(x_shape[1])
    p = math.prod(x_shape[2:])
    channel, rows, cols = _rows_cols(n, c, p, mode)
    out = torch.empty(rows, cols, dtype=torch.float32, device=xbar.device)
    if out.numel():
        grid, blocks = _launch(rows, cols, xbar.device)
        _reconstruct_kernel[grid](xb, out, rows, cols, c, p, rank, *_keys(seed),
                                  PROBE=_PROBE_ID[probe], CHANNEL=channel, **blocks)
    return out.view(n, *x_shape[1:])


def dw_channel_triton(dy, xbar, seed, rank, probe, x_shape, weight_shape, geo) -> torch.Tensor:
    """Estimate dW (fp32) in channel mode like ``probed.dw_channel``: Xhat is generated in
    batch chunks by :func:`reconstruct_triton` (no probe tensor) and fed to torch's exact wgrad."""
    n = x_shape[0]
    dw = torch.zeros(weight_shape, dtype=torch.float32, device=dy.device)
    step = _chunk(n, math.prod(x_shape[1:]))
    for i in range(0, n, step):
        xhat = reconstruct_triton(xbar, seed, rank, "channel", probe, x_shape, slice(i, i + step))
        dw += exact_weight_grad(dy[i:i + step].float(), xhat, weight_shape, geo)
    return dw
