"""Hashed count-sketch probes: the random matrices Z of the probed convolution.

A probe matrix Z has one row per sketched position q (spatial mode: a pixel of the unpadded
input; channel mode: a (channel, pixel) pair) and ``rank`` columns. Z is never materialised:
every position gets a bucket h(q) in [0, rank) and a value s(q), and Z[q, j] = s(q) * [h(q) == j].
Columns have disjoint supports, and the values are independent with mean 0 and E[s^2] = 1, so

    E[Z Z^T] = I     (diagonal: E[s(q)^2] = 1; off-diagonal: E[s(q) s(q')] = 0 for q != q')

whatever the bucket rule. That is all the unbiasedness of the gradient estimate needs. Memory and
compute are linear in the number of positions: a sketch Z^T X is a scatter-add into buckets.

Probe kinds (values and bucket rules):

* ``"rademacher"``: s = +-1 from one hash bit, h = hash mod rank.
* ``"gaussian"``:   s ~ N(0, 1) by Box-Muller from two hashed uniforms, h = hash mod rank.
* ``"orthogonal"``: s = +-1, buckets balanced: the positions of each block of ``rank``
  consecutive positions map bijectively onto the buckets, h(q) = (q + shift(q // rank)) mod rank
  with a hashed shift per block, so neighbours never share a bucket (lower variance on smooth
  images; the columns are orthogonal with exactly equal norms per block).

The hash is a 32-bit integer finaliser (the "lowbias32" mix) applied to (seed, stream, position).
It is computed here with int64 torch ops whose intermediates stay below 2**63 (32-bit products are
split in 16-bit halves), so a Triton or CUDA kernel computing the same mix in uint32 arithmetic
(where products wrap mod 2**32) gets bit-identical buckets and values. The reference for such a
kernel is :func:`probe_buckets_and_values`; the rules, in uint32 arithmetic, are::

    mix(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key(seed, stream) = mix((seed & 0xFFFFFFFF) ^ mix(stream * 0x9E3779B9 + 1))
    u(seed, stream, q) = mix(q ^ key(seed, stream))          # q < 2**32
    bucket (rademacher, gaussian) = u(seed, 0, q) % rank
    bucket (orthogonal) = (q % rank + u(seed, 3, q // rank)) % rank   # q % rank + shift < 2**33
    sign  = 1 - 2 * (u(seed, 1, q) >> 31)
    gauss = sqrt(-2 ln u1) * cos(2 pi u2),  u1 = ((u(seed,1,q) >> 8) + 0.5) * 2**-24,
                                             u2 = (u(seed,2,q) >> 8) * 2**-24     (float32)
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "PROBES",
    "MODES",
    "mix32",
    "stream_key",
    "hash_positions",
    "probe_buckets_and_values",
    "sketch_shape",
    "sketch_nbytes",
    "rank_for_ratio",
    "check_rank_mode_probe",
]

PROBES = ("gaussian", "rademacher", "orthogonal")
MODES = ("spatial", "channel")

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_GOLDEN = 0x9E3779B9
# Hash streams: independent hash functions drawn from the same seed.
_S_BUCKET, _S_VALUE, _S_VALUE2, _S_SHIFT = 0, 1, 2, 3


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow (works on ints and tensors)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """The lowbias32 finaliser on 32-bit values: a python int or an int64 tensor in [0, 2**32).

    >>> mix32(0), mix32(1)
    (0, 1753845952)
    """
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one hash stream for one seed (a python int; cheap, scalar)."""
    return mix32((int(seed) & _M32) ^ mix32((stream * _GOLDEN + 1) & _M32))


def hash_positions(seed: int, stream: int, positions: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit hashes (int64 tensor in [0, 2**32)) of int64 positions in [0, 2**32)."""
    return mix32(positions ^ stream_key(seed, stream))


def _unit_float(u: torch.Tensor, offset: float) -> torch.Tensor:
    """Top 24 bits of a 32-bit hash as a float32 in [0, 1) (+offset/2**24), exact in float32."""
    return ((u >> 8).to(torch.float32) + offset) * (2.0 ** -24)


def probe_buckets_and_values(seed: int, positions: torch.Tensor, rank: int, probe: str,
                             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket (int64 in [0, rank)) and value (float32) of each position for one probe draw.

    ``positions`` is an int64 tensor of flat positions in [0, 2**32); the same (seed, position,
    rank, probe) always gives the same answer, on any device.

    >>> b, v = probe_buckets_and_values(7, torch.arange(4), 2, "orthogonal")
    >>> sorted(b[:2].tolist()), v.abs().tolist()
    ([0, 1], [1.0, 1.0, 1.0, 1.0])
    """
    check_rank_mode_probe(rank, "spatial", probe)
    q = torch.as_tensor(positions, dtype=torch.int64, device=device)
    if q.numel() and int(q.max()) > _M32:
        raise ValueError(f"probe positions must be below 2**32, got {int(q.max())}: "
                         "sketch fewer positions per sample (use mode='spatial')")
    if probe == "orthogonal":
        shift = hash_positions(seed, _S_SHIFT, torch.div(q, rank, rounding_mode="floor"))
        bucket = (torch.remainder(q, rank) + shift) % rank
    else:
        bucket = hash_positions(seed, _S_BUCKET, q) % rank
    u = hash_positions(seed, _S_VALUE, q)
    if probe == "gaussian":
        u1 = _unit_float(u, 0.5)
        u2 = _unit_float(hash_positions(seed, _S_VALUE2, q), 0.0)
        value = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    else:
        value = 1.0 - 2.0 * (u >> 31).to(torch.float32)
    return bucket, value


def check_rank_mode_probe(rank, mode: str, probe: str) -> None:
    """Raise a ValueError that says what to pass when rank, mode or probe is invalid."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int (number of probe columns), got {rank!r}; "
                         "use rank_for_ratio(input_shape, ratio, mode) to pick one")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}: use one of {PROBES}")


def _split_shape(input_shape) -> tuple[int, int, int]:
    """(batch, channels, pixels) of a batched conv input shape (N, C, *spatial)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 3:
        raise ValueError(f"expected a batched conv input shape (N, C, *spatial), got {shape}")
    return shape[0], shape[1], math.prod(shape[2:])


def sketch_shape(input_shape, rank: int, mode: str) -> tuple[int, ...]:
    """Shape of the sketch stored for an input of ``input_shape`` (N, C, *spatial).

    >>> sketch_shape((8, 64, 56, 56), 196, "spatial"), sketch_shape((8, 64, 56, 56), 196, "channel")
    ((8, 64, 196), (8, 196))
    """
    check_rank_mode_probe(rank, mode, "rademacher")
    n, c, _ = _split_shape(input_shape)
    return (n, c, rank) if mode == "spatial" else (n, rank)


def sketch_nbytes(input_shape, rank: int, mode: str, dtype=torch.float32) -> int:
    """Bytes of the sketch stored for backward (the weight is stored too, but is a parameter).

    >>> sketch_nbytes((8, 64, 56, 56), 196, "spatial")
    401408
    """
    elem = torch.empty((), dtype=dtype).element_size()
    return math.prod(sketch_shape(input_shape, rank, mode)) * elem


def rank_for_ratio(input_shape, ratio: float, mode: str) -> int:
    """Rank whose sketch holds about ``ratio`` of the input's elements (at least 1).

    >>> rank_for_ratio((8, 64, 56, 56), 1 / 16, "spatial"), rank_for_ratio((8, 64, 56, 56), 1 / 16, "channel")
    (196, 12544)
    """
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be a fraction of the input in (0, 1], got {ratio!r}")
    check_rank_mode_probe(1, mode, "rademacher")
    _, c, p = _split_shape(input_shape)
    per_sample = p if mode == "spatial" else c * p
    return max(1, int(round(ratio * per_sample)))
