"""Mem-AOP-GD's math in plain torch: a weight gradient from K of its D outer products, plus a memory.

A weight gradient is a sum of outer products, dW = sum_j b_j a_j^T: for a linear layer a_j is row
j of X and b_j row j of dY (j over the batch, leading dims flattened); for a convolution j is a
(sample, output position) pair, a_j the input patch under the kernel there (the unfolded patch,
zero in the padding) and b_j the output gradient at that position, one set of D rows per group.
:func:`outer_weight_grad` keeps K of them, chosen by a policy on the scores ||a_j|| * ||b_j||:

  "topk"      the K largest;
  "weighted"  sampled with probability proportional to the score;
  "uniform"   sampled uniformly among the nonzero ones.

What happens to the D - K left out is the memory's business:

* with a memory (Mem-AOP-GD) the memory holds R rows (a, b) left over from earlier steps. The
  candidates of a step are its D fresh rows and those R; K distinct candidates are used at weight
  1 and the D + R - K others become the next memory, their a side times ``decay``. Every outer
  product is so applied exactly once, now or later (decay 1): summed over steps the applied
  gradients are the exact ones minus what the memory still holds, which is how the memory
  corrects the bias of dropping rows. The size is bounded: D + R - K leftovers are folded into
  R slots, slot i % R taking leftover i times a random sign s_i on both sides. A slot holding
  rows i and j then contributes (s_i a_i + s_j a_j)(s_i b_i + s_j b_j)^T, whose expectation
  over the signs is a_i b_i^T + a_j b_j^T: folding is unbiased; the cross terms are zero-mean
  noise (none while D + R - K <= R). A folded slot's score grows with what it holds, so top-K
  takes it up once it outweighs a fresh row.
* without a memory (plain AOP) the sampling policies are made unbiased per step: "uniform"
  weighs each kept row by (nonzero rows) / K, "weighted" draws K rows with replacement and weighs
  draw j by 1 / (K p_j) (Drineas, Kannan and Mahoney's approximate matrix product); "topk" is
  used as it is and stays biased. At K = D every policy uses every row once: the exact dW.

Only K rows (and the leftovers folded into the memory) are ever gathered, in chunks; the scores
need one pass over X and dY (for a conv, a convolution of the squared channel norms with a
kernel of ones), so the full unfold is never built. Nothing reads tensor values in Python, so
these functions run on fake tensors as they do on real ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .probed import ConvGeometry, _transient_elems, tap_indices

__all__ = ["POLICIES", "kept_rows", "memory_rows", "LinearRows", "ConvRows", "select", "outer_weight_grad"]

POLICIES = ("topk", "weighted", "uniform")

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _acc(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype for ``t``: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def kept_rows(d: int, fraction: float) -> int:
    """K: how many of ``d`` outer products a step keeps, ceil(fraction * d), at least one.

    >>> kept_rows(256, 0.5), kept_rows(10, 0.25), kept_rows(3, 1.0)
    (128, 3, 3)
    """
    return max(1, min(d, math.ceil(fraction * d - 1e-9)))


def memory_rows(d: int, fraction: float) -> int:
    """R: the memory's rows for ``d`` outer products a step, as many as one step leaves out (D - K)."""
    return d - kept_rows(d, fraction)


class LinearRows:
    """Rows of a linear layer: a_j = X[j], b_j = dY[j] (leading dims flattened), one group."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor):
        self.x = x.reshape(-1, x.shape[-1])
        self.dy = dy.reshape(-1, dy.shape[-1])
        self.groups, self.count = 1, self.x.shape[0]
        self.widths = (self.x.shape[1], self.dy.shape[1])

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||a_j||, ||b_j||), each (1, D), at least fp32."""
        acc = _acc(self.x)
        return (torch.linalg.vector_norm(self.x, dim=1, dtype=acc)[None],
                torch.linalg.vector_norm(self.dy, dim=1, dtype=acc)[None])

    def rows(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a and b rows of indices ``j`` (1, k): (1, k, in) and (1, k, out)."""
        return self.x[j], self.dy[j]

    def weight(self, dw: torch.Tensor, weight_shape) -> torch.Tensor:
        return dw.reshape(weight_shape)


class ConvRows:
    """Rows of a convolution, per group g: a_j the patch of X under the kernel at output position
    p of sample n (j = n * P_out + p; layout taps x channels of the group, zero in the padding),
    b_j = dY[n, group's channels, p]."""

    def __init__(self, x: torch.Tensor, dy: torch.Tensor, weight_shape, geo: ConvGeometry):
        n, c = x.shape[:2]
        o, g = dy.shape[1], geo.groups
        self.kernel, self.in_sp, self.out_sp = tuple(weight_shape[2:]), tuple(x.shape[2:]), tuple(dy.shape[2:])
        self.geo, self.n, self.taps = geo, n, math.prod(self.kernel)
        self.p_in, self.p_out = math.prod(self.in_sp), math.prod(self.out_sp)
        self.groups, self.count = g, n * self.p_out
        self.cg, self.og = c // g, o // g
        self.widths = (self.taps * self.cg, self.og)
        self.x = x
        self.xv = x.reshape(n, g, self.cg, self.p_in).permute(1, 0, 3, 2)      # (G, N, P_in, Cg), a view
        self.dyv = dy.reshape(n, g, self.og, self.p_out).permute(1, 0, 3, 2)  # (G, N, P_out, Og)
        flat, valid = tap_indices(self.kernel, self.out_sp, self.in_sp, geo, x.device)
        self.q, self.valid = flat.t().contiguous(), valid.t().to(x.dtype)   # (P_out, taps)
        self.g = torch.arange(g, device=x.device)

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||a_j||, ||b_j||), each (G, D), at least fp32: ||a_j||^2 is the group's squared channel norm
        summed under the kernel, a convolution with a kernel of ones, in batch chunks."""
        g, geo, acc = self.groups, self.geo, _acc(self.x)
        ones = torch.ones((g, 1) + self.kernel, dtype=acc, device=self.x.device)
        a = torch.empty(g, self.n, self.p_out, dtype=acc, device=self.x.device)
        step = max(1, min(self.n, _transient_elems(self.x.numel()) // max(1, self.cg * self.p_in)))
        pads = [p for i in reversed(range(len(self.kernel))) for p in (geo.pad_left[i], geo.pad_right[i])]
        for i in range(0, self.n, step):
            xs = self.x[i:i + step]
            sq = torch.linalg.vector_norm(xs.reshape(xs.shape[0], g, self.cg, *self.in_sp), dim=2,
                                          dtype=acc).square_()
            padding = list(geo.pad_left)
            if not geo.symmetric:
                sq, padding = F.pad(sq, pads), [0] * len(padding)
            s = _CONV_FN[len(self.kernel)](sq, ones, None, list(geo.stride), padding, list(geo.dilation), g)
            a[:, i:i + step] = s.reshape(s.shape[0], g, self.p_out).transpose(0, 1)
        b = torch.linalg.vector_norm(self.dyv, dim=3, dtype=acc)  # (G, N, P_out)
        return a.reshape(g, -1).clamp_min_(0).sqrt_(), b.reshape(g, -1)

    def rows(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a and b rows of indices ``j`` (G, k): (G, k, taps * Cg) and (G, k, Og)."""
        n = torch.div(j, self.p_out, rounding_mode="floor")
        p = j - n * self.p_out
        g = self.g[:, None]
        a = self.xv[g[..., None], n[..., None], self.q[p]]                   # (G, k, taps, Cg)
        a.mul_(self.valid[p][..., None])                                     # zero in the padding
        return a.reshape(j.shape + (-1,)), self.dyv[g, n, p]

    def weight(self, dw: torch.Tensor, weight_shape) -> torch.Tensor:
        """(G, Og, taps * Cg) in the rows' layout -> the conv weight's (C_out, Cg, *kernel)."""
        dw = dw.view(self.groups, self.og, self.taps, self.cg).permute(0, 1, 3, 2)
        return dw.reshape(weight_shape)


def select(scores: torch.Tensor, k: int, policy: str, memory: bool, u: torch.Tensor | None):
    """Which candidates (G, C) a step uses: (chosen (G, K), weights (G, K) or None for all 1,
    left out (G, C - K) or None). ``u``: uniform draws, (G, C), or (G, K) for "weighted" without
    a memory and K < C; None for "topk"."""
    c = scores.shape[1]
    if policy == "topk":
        keys = scores
    elif policy == "uniform":
        keys = torch.where(scores > 0, u, -1.0)  # every nonzero candidate equally likely
    elif memory or k >= c:
        keys = scores.log() - (-u.log()).log()   # Gumbel top-K: K draws without replacement, p ~ score
    else:  # with replacement, importance weights 1 / (K p_j): unbiased without a memory
        total = scores.sum(1, keepdim=True)
        chosen = torch.searchsorted(scores.cumsum(1), u * total).clamp_(max=c - 1)
        picked = scores.gather(1, chosen)
        weights = torch.where(picked > 0, total / (k * picked.clamp_min(1e-30)), 0.0)
        return chosen, weights, None
    order = torch.argsort(keys, dim=1, descending=True)
    chosen, left = order[:, :k], order[:, k:]
    weights = None
    if policy == "uniform" and not memory:
        nonzero = (scores > 0).sum(1, keepdim=True).to(torch.float32)
        weights = (nonzero / k).clamp_min(1.0).expand(-1, k)
    return chosen, weights, (left if memory else None)


def _gather(src, j: torch.Tensor, mem_a, mem_b):
    """Rows of candidates ``j``: fresh rows (j < D) from ``src``, memory rows (j >= D) from the memory."""
    d = src.count
    if mem_a is None:
        return src.rows(j)
    fresh = (j < d)[..., None]
    a, b = src.rows(j.clamp(max=d - 1))
    g, r = mem_a.shape[:2]
    m = (j - d).clamp_(0, r - 1).add_(torch.arange(g, device=j.device)[:, None] * r)  # rows of (G * R, width)
    old_a, old_b = mem_a.view(g * r, -1)[m], mem_b.view(g * r, -1)[m]
    return torch.where(fresh, a, old_a, out=old_a), torch.where(fresh, b, old_b, out=old_b)


def _chunk_rows(src, x: torch.Tensor) -> int:
    """Candidates gathered at once: their rows (and copies) stay within the transient budget,
    but at least 128 (a GEMM over a few rows runs far below the machine's rate)."""
    per_row = src.groups * (sum(src.widths) + 2 * getattr(src, "taps", 0))
    return max(128, _transient_elems(x.numel()) // (3 * per_row))  # GEMMs of >= 128 rows run at speed


def outer_weight_grad(src, k: int, policy: str, decay: float, mem_a, mem_b, u, signs,
                      weight_shape, dtype: torch.dtype) -> torch.Tensor:
    """dW (``weight_shape``, ``dtype``; at least fp32 accumulation) from K of the rows of ``src`` (and the
    memory ``mem_a`` (G, R, a), ``mem_b`` (G, R, b), updated in place; None for none). ``u``:
    the policy's uniform draws (see :func:`select`); ``signs``: (G, D + R - K) of {0, 1}, the
    random signs that fold the left-out rows into the memory."""
    g = src.groups
    a_norm, b_norm = src.norms()
    memory = mem_a is not None
    if memory:
        acc = a_norm.dtype
        m_norm = (torch.linalg.vector_norm(mem_a, dim=2, dtype=torch.promote_types(mem_a.dtype, acc))
                  * torch.linalg.vector_norm(mem_b, dim=2, dtype=torch.promote_types(mem_b.dtype, acc)))
        m_norm = m_norm.to(acc)
        scores = torch.cat([a_norm.mul_(b_norm), m_norm], dim=1)
    else:
        scores = a_norm.mul_(b_norm)
    del b_norm
    chosen, weights, left = select(scores, k, policy, memory, u)
    del scores
    acc = _acc(src.x)
    dw = torch.zeros(g, src.widths[1], src.widths[0], dtype=acc, device=src.x.device)
    step = _chunk_rows(src, src.x)
    for i in range(0, chosen.shape[1], step):
        a, b = _gather(src, chosen[:, i:i + step], mem_a, mem_b)
        b = b.to(acc) if weights is None else b.to(acc) * weights[:, i:i + step, None]
        dw.baddbmm_(b.transpose(1, 2), a.to(acc))
        del a, b
    if memory:
        _fold(src, left, signs, decay, mem_a, mem_b, step)
    return src.weight(dw, weight_shape).to(dtype).contiguous()


def _fold(src, left: torch.Tensor, signs: torch.Tensor, decay: float, mem_a, mem_b, step: int) -> None:
    """The next memory: left-out candidate i goes to slot i % R with sign s_i on both sides, its
    a side times ``decay``. Leftovers come in blocks of R, so each chunk adds into a contiguous
    range of slots (a dense add, no scatter)."""
    r = mem_a.shape[1]
    new_a, new_b = torch.zeros_like(mem_a), torch.zeros_like(mem_b)
    sign = signs.to(mem_a.dtype).mul_(2).sub_(1)
    for block in range(0, left.shape[1], r):
        for i in range(block, min(block + r, left.shape[1]), step):
            j = min(i + step, block + r, left.shape[1])
            a, b = _gather(src, left[:, i:j], mem_a, mem_b)
            s = sign[:, i:j, None]
            new_a[:, i - block:j - block] += a.to(new_a.dtype) * (s * decay)
            new_b[:, i - block:j - block] += b.to(new_b.dtype) * s
            del a, b
    mem_a.copy_(new_a)
    mem_b.copy_(new_b)
