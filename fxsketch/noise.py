"""Closed-form probe noise of the probed conv: E||dW_hat - dW||_F^2 for any rank, without probes.

The probed conv (:mod:`fxsketch.ops.probed`) estimates every weight-gradient element e = (o, c, k)
as <M, G_e>, M = Z Z^T for one probe draw; the exact element is tr G_e. This module computes the
variance summed over dW's elements from X and dY of one conv call. Derivation:

1. One element, spatial mode. For tap k let a_{n,o,k}[q] = dY[n, o, p] where q = q(p, k) is a
   real (unpadded) input pixel (at most one p per q and k), 0 where no p maps to q, and
   x_{n,c} = X[n, c, :]. The backward computes sum_n a_n^T M x_n = <M, G>, G = sum_n a_n x_n^T
   (P x P). M[u, v] = s_u s_v [h_u = h_v]; the values s are independent of the buckets h and of
   each other, E s = 0, E s^2 = 1, so E M = I and E<M, G> = tr G. The variance:
       Var<M, G> = Var(s^2) sum_u G_uu^2 + sum_{u != v} pi_uv G_uv (G_uv + G_vu),
   pi_uv = P(h_u = h_v): diagonal and off-diagonal entries of M are uncorrelated
   (E[(s_u^2 - 1) s_a s_b] = 0 for a != b) and two off-diagonal entries correlate only as
   (u, v) and (v, u), E[s_u^2 s_v^2 [h_u = h_v]] = pi_uv.
2. Probe kinds. gaussian: Var(s^2) = 2, pi = 1/r; rademacher: Var(s^2) = 0, pi = 1/r;
   orthogonal: Var(s^2) = 0, pi = 0 inside one block of r consecutive positions (they map
   bijectively onto the buckets), 1/r across blocks (two independent uniform shifts mod r).
   With D = sum_u G_uu^2, F = ||G||_F^2, T = tr(G G) and F_B, T_B their sums over the pairs
   (u, v) of one block (u = v included, so D cancels):
       hashed:     Var = Var(s^2) D + (F + T - 2 D) / r
       orthogonal: Var = (F - F_B + T - T_B) / r          (0 once one block holds every position)
3. Sums over the elements (o in group g, c in g, k). With the per-position Grams
       alpha_g[n, m, q] = sum_{o in g, k} a_{n,o,k}[q] a_{m,o,k}[q],  xi_g[n, m, q] = sum_{c in g} X[n,c,q] X[m,c,q]
   D = sum_{g,n,m,q} alpha xi, F = sum_{g,n,m} (sum_q alpha)(sum_q xi) and F_B = sum_{g,n,m,b}
   (sum_{q in b} alpha)(sum_{q in b} xi): one pass over pixel chunks; alpha_g[q] sums over taps
   the output-pixel Gram beta_g[n, m, p] = sum_{o in g} dY[n,o,p] dY[m,o,p] at p = p(q, k).
   T = sum_{n,m} <D_nm, D_mn> with the cross-sample weight gradient D_nm = wgrad(x_n, dy_m); it is
   symmetric in (n, m), so sample n takes two batch-1 wgrads against the samples m >= n folded
   into channels (rows D_{n,m} and columns D_{m,n}: at most 2N|W| at a time, N^2 sample-wgrads in
   all); the exact dW = sum_n D_nn.
   T_B = sum_b sum_{n,m} <D^b_nm, D^b_mn>, D^b the wgrad from block b's pixels only, per chunk of
   blocks either directly (N^2|W| per pixel) or through block Grams, whichever costs fewer
   flops: <D^b_nm, D^b_mn> = sum_{j,i in b} (sum_c x_n[c,j] x_m[c,i]) (sum_{o,k} a_m[o,k,j] a_n[o,k,i]).
4. Channel mode: positions u = (c, q), flat c*P + q over all C channels. G_e is zero outside
   row block c: G_e[(c, q), (c', q')] = sum_n a_n[q] X[n, c', q'] with c' over every channel
   (Xhat mixes channels, across groups too). D and T see row block c only, so they are spatial
   mode's; F = (C/G) sum_{n,m} (sum_{g,q} alpha_g)(sum_{c,q} X_n X_m); F_B sums the flat-block
   products (sum_{u in b} alpha~)(sum_{v in b} xi), alpha~[c*P + q] = alpha_{g(c)}[q]; T_B is
   spatial mode's with channel c cut where flat blocks end, at q = j r - (c P mod r): channels
   with the same c P mod r share their segments and are done together.
5. Batch split: every statistic is S = sum_{n,m} s_nm over sample pairs, kept as the n = m part
   (diag) and the n != m part (off). For b i.i.d. samples E S_diag = b mu_d and E S_off =
   b (b - 1) mu_o, so at batch B: S(B) = (B/b) S_diag + B(B-1)/(b(b-1)) S_off (the average of
   this over all b-subsets of a B-batch is exactly S(B)). A global scale of dY (mean or sum
   loss) scales probe and SGD variances alike. sum_n ||g_n||^2 = T_diag (g_n = D_nn).
6. Idealisations: hashes are taken as independent uniform draws (the 32-bit hash mod r makes
   pi = 1/r to about r/2**32); gaussian values come from 24-bit uniforms (Var(s^2) = 2 to ~1e-6).

>>> terms = probe_variance_terms(x, dy, conv.weight.shape, geo, "spatial", "gaussian")  # doctest: +SKIP
>>> terms.variance(16), terms.variance(16, batch=256)                                    # doctest: +SKIP
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .errors import InputError
from .ops.probed import CHUNK_ELEMS, ConvGeometry, exact_weight_grad
from .ops.probes import check_rank_mode_probe

__all__ = ["Split", "ProbeVarianceTerms", "probe_variance_terms", "accumulate", "workspace_nbytes"]

_VAR_S2 = {"gaussian": 2.0, "rademacher": 0.0, "orthogonal": 0.0}
_BUDGET = CHUNK_ELEMS  # the most elements one chunk's temporaries may hold
_budget = contextvars.ContextVar("fxsketch_noise_budget", default=_BUDGET)


def chunk_budget(x_elems: int, y_elems: int) -> int:
    """Elements one chunk may hold for a call on X and dY of these sizes: an eighth of them
    (at least 2**16, at most ``_BUDGET``), so calibrating a small conv holds little beside it."""
    return min(_BUDGET, max(1 << 16, (x_elems + y_elems) // 8))


@dataclass(frozen=True)
class Split:
    """A statistic sum_{n,m} s_nm over sample pairs: its n = m part and its n != m part."""

    diag: float = 0.0
    off: float = 0.0

    @classmethod
    def of(cls, pairs: torch.Tensor) -> "Split":
        """From the (N, N) matrix of s_nm."""
        d = float(pairs.diagonal().sum())
        return cls(d, float(pairs.sum()) - d)

    @property
    def total(self) -> float:
        return self.diag + self.off

    def at(self, b: int, batch: int | None = None) -> float:
        """The statistic at batch ``batch`` from this one measured on ``b`` samples (None: as is)."""
        if batch is None or batch == b:
            return self.total
        if b < 2:
            raise ValueError(f"cannot extrapolate cross-sample terms from a batch of {b} to {batch}: "
                             "calibrate on at least 2 samples")
        return batch / b * self.diag + batch * (batch - 1) / (b * (b - 1)) * self.off

    def __add__(self, other: "Split") -> "Split":
        return Split(self.diag + other.diag, self.off + other.off)


@dataclass(frozen=True, eq=False)
class ProbeVarianceTerms:
    """The quadratic statistics of the closed form (module docstring), for one conv or a sum of
    independent calls; :meth:`variance` turns them into E||dW_hat - dW||_F^2."""

    mode: str
    probe: str
    batch: int
    """b, the samples the statistics were measured on."""
    d: Split
    """sum_u G_uu^2 over elements."""
    f: Split
    """||G||_F^2 over elements."""
    t: Split
    """tr(G G) over elements; t.diag = sum_n ||g_n||^2 (per-sample gradients)."""
    blocks: Mapping[int, tuple[Split, Split]] = field(default_factory=dict)
    """Orthogonal probes only: rank -> (F_B, T_B), the same-block parts of F and T."""
    grad_sq: Split | None = None
    """||dW||^2 = sum_{n,m} <g_n, g_m> of one call (None after summing calls: per-sample gradients
    of shared weights sum over calls before their norms are taken)."""
    grad: torch.Tensor | None = None
    """The exact dW (fp32), kept when asked for (``keep_grad``)."""
    calls: int = 1

    @property
    def per_sample_sq(self) -> float:
        """sum_n ||g_n||^2 of the calibration batch (summed over calls)."""
        return self.t.diag

    def variance(self, rank: int, batch: int | None = None) -> float:
        """E||dW_hat - dW||_F^2 summed over dW's elements at ``rank``, for the calibration batch
        or extrapolated to ``batch`` samples (module docstring, item 5)."""
        check_rank_mode_probe(int(rank), self.mode, self.probe)
        b = self.batch
        if self.probe == "orthogonal":
            if rank not in self.blocks:
                raise KeyError(f"orthogonal probes: rank {rank} was not computed; computed ranks: "
                               f"{sorted(self.blocks)} (pass it in probe_variance_terms(ranks=...))")
            fb, tb = self.blocks[rank]
            v = (self.f.at(b, batch) - fb.at(b, batch) + self.t.at(b, batch) - tb.at(b, batch)) / rank
        else:
            d = self.d.at(b, batch)
            v = _VAR_S2[self.probe] * d + (self.f.at(b, batch) + self.t.at(b, batch) - 2 * d) / rank
        return max(v, 0.0)

    def rms(self, rank: int, batch: int | None = None) -> float:
        """sqrt(variance): the RMS Frobenius error of the estimate (its std: it is unbiased)."""
        return math.sqrt(self.variance(rank, batch))

    def __add__(self, other: "ProbeVarianceTerms") -> "ProbeVarianceTerms":
        """Terms of two calls with independent probes (their errors add in variance)."""
        if (self.mode, self.probe, self.batch) != (other.mode, other.probe, other.batch):
            raise ValueError("cannot add probe-variance terms of different mode, probe or batch: "
                             f"{(self.mode, self.probe, self.batch)} vs {(other.mode, other.probe, other.batch)}")
        if set(self.blocks) != set(other.blocks):
            raise ValueError(f"orthogonal terms for different ranks: {sorted(self.blocks)} vs "
                             f"{sorted(other.blocks)}; compute every call with the same ranks")
        blocks = {r: (fb + other.blocks[r][0], tb + other.blocks[r][1]) for r, (fb, tb) in self.blocks.items()}
        grad = None if self.grad is None or other.grad is None else self.grad + other.grad
        return ProbeVarianceTerms(self.mode, self.probe, self.batch, self.d + other.d, self.f + other.f,
                                  self.t + other.t, blocks, None, grad, self.calls + other.calls)


def accumulate(terms: Iterable[ProbeVarianceTerms]) -> ProbeVarianceTerms:
    """The sum of the terms of several calls of one conv (each call drew its own probe)."""
    terms = list(terms)
    if not terms:
        raise ValueError("accumulate needs at least one ProbeVarianceTerms")
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


# --------------------------------------------------------------------------------------------
# the pieces


def _tap_sources(q, in_spatial, out_spatial, kernel, geo: ConvGeometry):
    """For flat input positions q (L,; -1 = none) the output pixel p with q(p, k) = q of every tap
    k, (K, L), and whether it exists: q = stride * p + dilation * k - pad_left inverted per axis."""
    coords, rest = [], q.clamp(min=0)
    for size in reversed(in_spatial):
        coords.append(rest % size)
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.reverse()
    taps = torch.cartesian_prod(*[torch.arange(k, device=q.device) for k in kernel]).view(-1, len(kernel))
    flat = torch.zeros((), dtype=torch.int64, device=q.device)
    ok = (q >= 0)[None, :]
    for a, (size_out, qa) in enumerate(zip(out_spatial, coords)):
        num = qa[None, :] + geo.pad_left[a] - geo.dilation[a] * taps[:, a:a + 1]
        p = torch.div(num, geo.stride[a], rounding_mode="floor")
        ok = ok & (num % geo.stride[a] == 0) & (p >= 0) & (p < size_out)
        flat = flat * size_out + p.clamp(0, size_out - 1)
    return flat, ok


def _gather(xs, dys, idx, sources):
    """X and the per-tap dY (a) at input positions idx (any shape; -1 = zero padding):
    (N, G, C, *idx.shape) and (N, G, O, K, *idx.shape)."""
    q = idx.reshape(-1)
    src, ok = sources(q)
    xg = xs[..., q.clamp(min=0)] * (q >= 0)
    ag = dys[..., src] * ok
    return xg.view(*xs.shape[:3], *idx.shape), ag.view(*dys.shape[:3], src.shape[0], *idx.shape)


def _cross_pairs(x, dy, weight_shape, geo: ConvGeometry):
    """(tmat, grad_sq, grad): tmat[n, m] = <D_nm, D_mn> with D_nm = wgrad(x_n, dy_m), ||dW||^2 split
    over sample pairs, and dW = sum_n D_nn. tmat is symmetric, so sample i needs only m >= i: two
    batch-1 wgrads against those samples folded into channels, N^2 sample-wgrads in all. Output
    channels go in chunks (each group's, alike) so rows and columns hold at most the chunk
    budget: <D_nm, D_mn> is a sum over output channels."""
    n, c, o, g = x.shape[0], x.shape[1], dy.shape[1], geo.groups
    cg, og, kshape = c // g, o // g, tuple(weight_shape[2:])
    per_channel = 2 * n * g * cg * math.prod(kshape)   # rows + columns of one output channel per group
    step = max(1, min(og, _budget.get() // max(per_channel, 1)))
    dy5 = dy.reshape(n, g, og, *dy.shape[2:])
    x_g = x.reshape(n, g, cg, *x.shape[2:]).transpose(0, 1)
    tmat = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    grad = torch.zeros(g, og, cg, *kshape, dtype=x.dtype, device=x.device)
    cross = 0.0  # sum_{m < i} <g_m, g_i>
    for o0 in range(0, og, step):
        oc = min(og, o0 + step) - o0
        dy_c = dy5[:, :, o0:o0 + oc]                                     # (n, g, oc, ...)
        dy_g = dy_c.transpose(0, 1)                                      # (g, n, oc, ...)
        for i in range(n):
            k = n - i
            rows = exact_weight_grad(dy_g[:, i:].reshape(1, g * k * oc, *dy.shape[2:]), x[i:i + 1],
                                     (g * k * oc, cg, *kshape), geo)
            rows = rows.view(g, k, oc, cg, -1).transpose(0, 1).reshape(k, -1)          # [m - i] = D_{i m}
            cols = exact_weight_grad(dy_c[i:i + 1].reshape(1, g * oc, *dy.shape[2:]),
                                     x_g[:, i:].reshape(1, g * k * cg, *x.shape[2:]),
                                     (g * oc, k * cg, *kshape), geo)
            cols = cols.view(g, oc, k, cg, -1).permute(2, 0, 1, 3, 4).reshape(k, -1)   # [m - i] = D_{m i}
            tm = (rows * cols).sum(1, dtype=torch.float64)
            tmat[i, i:] += tm
            if k > 1:
                tmat[i + 1:, i] += tm[1:]
            own = grad[:, o0:o0 + oc]
            cross += float(torch.dot(own.reshape(-1).double(), rows[0].double()))
            own += rows[0].view(g, oc, cg, *kshape)
            del rows, cols
    grad = grad.reshape(weight_shape)
    diag = float(tmat.diagonal().sum())  # <D_nn, D_nn> = ||g_n||^2
    return tmat, Split(diag, 2 * cross), grad


def _pairs(u: torch.Tensor) -> torch.Tensor:
    """(G, N, N, L) fp64 with [g, n, m, j] = sum_f u[n, g, f, j] u[m, g, f, j], for u (N, G, F, L)."""
    n = u.shape[0]
    out = torch.empty(u.shape[1], n, n, u.shape[3], dtype=torch.float64, device=u.device)
    for i in range(n):
        pm = (u[i:i + 1] * u[i:]).sum(2).transpose(0, 1)   # (G, N - i, L)
        out[:, i, i:] = pm
        out[:, i:, i] = pm
    return out


def _pixel_plan(n, g, cg, og, k, p, channel_blocks: bool):
    """(pixels per chunk, elements held) of :func:`_pixel_stats`: dY and X values, the fp64 Grams
    (beta, alpha, xi and a product), tap-index temporaries and, for channel-mode blocks, the
    per-channel alpha~ and xi (fp64, with their permuted copies)."""
    per_pos = n * g * og + n * g * cg + 8 * g * n * n + 12 * k + (8 * g * cg * n * n if channel_blocks else 0)
    step = max(1, _budget.get() // per_pos)
    return step, min(step, p) * per_pos


def _pixel_stats(xs, dys, sources, mode: str, ranks):
    """One pass over chunks of input pixels: D and F as (N, N) pair matrices and, per rank, the
    same-block F_B (orthogonal probes). xs (N, G, Cg, P), dys (N, G, Og, P_out)."""
    n, g, cg, p = xs.shape
    c = g * cg
    step, _ = _pixel_plan(n, g, cg, dys.shape[2], sources(xs.new_zeros(1, dtype=torch.int64))[0].shape[0],
                          p, mode == "channel" and bool(ranks))
    f64 = dict(dtype=torch.float64, device=xs.device)
    d, atot, xtot = torch.zeros(n, n, **f64), torch.zeros(g, n, n, **f64), torch.zeros(g, n, n, **f64)
    if mode == "spatial":
        shape = {r: (-(-p // r), g, n, n) for r in ranks}
    else:
        shape = {r: (-(-(c * p) // r), n, n) for r in ranks}
    sa = {r: torch.zeros(s, **f64) for r, s in shape.items()}
    sx = {r: torch.zeros(s, **f64) for r, s in shape.items()}
    chans = torch.arange(c, device=xs.device)[:, None]
    for lo in range(0, p, step):
        q = torch.arange(lo, min(p, lo + step), device=xs.device)
        src, ok = sources(q)                                   # (K, L) output pixel of each tap
        hit = src[ok]
        p0, p1 = (int(hit.min()), int(hit.max()) + 1) if hit.numel() else (0, 1)
        al = torch.zeros(g, n, n, q.numel(), **f64)            # alpha_g[n, m, q]: beta summed over taps
        if p1 - p0 <= 2 * q.numel():
            beta = _pairs(dys[..., p0:p1])                     # sum_o dY_n dY_m at those pixels
            for t in range(src.shape[0]):
                al += beta[..., (src[t] - p0).clamp(0, p1 - p0 - 1)] * ok[t]
            del beta
        else:  # taps reach far beyond the chunk (3d, small chunks): each tap's dY on its own
            for t in range(src.shape[0]):
                al += _pairs(dys[..., src[t]] * ok[t])
        xg = xs[..., lo:lo + q.numel()]
        xi = _pairs(xg)                                        # xi_g[n, m, q]
        d += (al * xi).sum((0, 3))
        atot += al.sum(-1)
        xtot += xi.sum(-1)
        if mode == "spatial":
            for r in ranks:
                sa[r].index_add_(0, q // r, al.permute(3, 0, 1, 2))
                sx[r].index_add_(0, q // r, xi.permute(3, 0, 1, 2))
        elif ranks:  # flat blocks over (channel, pixel): alpha~ of channel c is its group's alpha
            alc = al.repeat_interleave(cg, 0).permute(0, 3, 1, 2).reshape(-1, n, n)
            xc = xg.reshape(n, c, -1).double()
            xic = (xc[:, None] * xc[None]).permute(2, 3, 0, 1).reshape(-1, n, n)
            for r in ranks:
                idx = torch.div(chans * p + q[None, :], r, rounding_mode="floor").reshape(-1)
                sa[r].index_add_(0, idx, alc)
                sx[r].index_add_(0, idx, xic)
            del alc, xic
        del al, xi, xg
    if mode == "spatial":
        f = (atot * xtot).sum(0)
    else:  # every row channel c of a group sees all columns (c', q')
        f = cg * atot.sum(0) * xtot.sum(0)
    fb = {r: (sa[r] * sx[r]).flatten(0, -3).sum(0) for r in ranks}
    return d, f, fb


def _segment_plan(n, gs, cs, os_, k, l, n_seg):
    """(gram, segments per chunk, samples per chunk, positions per sub-range, elements held) of
    :func:`_segment_pairs`: the Gram route where it costs fewer flops and fits, else D^s itself."""
    w = gs * os_ * cs * k                      # one segment's D_nm
    per_pos = n * gs * (os_ * k + cs) + 12 * k  # gathered values and tap-index temporaries per position
    gram_mem = 3 * gs * (n * l) ** 2 + per_pos * l
    if l * (cs + os_ * k) < os_ * cs * k and gram_mem <= _budget.get():
        nb = max(1, min(n_seg, _budget.get() // gram_mem))
        return True, nb, n, l, nb * gram_mem
    nc = max(1, min(n, _budget.get() // (3 * n * w)))
    nb = max(1, min(n_seg, _budget.get() // (3 * nc * n * w + per_pos * l)))
    ls = max(1, min(l, _budget.get() // (per_pos * nb)))
    return False, nb, nc, ls, nb * (3 * nc * n * w + per_pos * ls)


def _segment_pairs(xs, dys, edges, sources):
    """sum over segments s = [edges[i], edges[i+1]) of input positions of sum_{n,m} <D^s_nm,
    D^s_mn> as an (N, N) matrix, D^s_nm the wgrad of x_n's positions in s against dy_m.
    xs (N, G, C, P), dys (N, G, O, P_out). Per chunk of segments (padded to the longest) either
    D^s itself or the segment Grams, whichever costs fewer flops (module docstring, item 3)."""
    n, gs, cs, _ = xs.shape
    os_ = dys.shape[2]
    e = torch.tensor(edges, dtype=torch.int64, device=xs.device)
    lens = e[1:] - e[:-1]
    l, n_seg = int(lens.max()), lens.numel()
    gram, nb, nc, ls, _ = _segment_plan(n, gs, cs, os_, sources(e[:1])[0].shape[0], l, n_seg)
    tmat = torch.zeros(n, n, dtype=torch.float64, device=xs.device)
    starts, j = e[:-1, None], torch.arange(l, device=xs.device)
    for s0 in range(0, n_seg, nb):
        idx = torch.where(j < lens[s0:s0 + nb, None], starts[s0:s0 + nb] + j, -1)  # (nb, l), -1: padding
        if gram:
            xg, ag = _gather(xs, dys, idx, sources)
            xi = torch.einsum("ngcbj,mgcbi->gbnjmi", xg, xg)
            h = torch.einsum("mgokbj,ngokbi->gbmjni", ag, ag)
            tmat += torch.einsum("gbnjmi,gbmjni->nm", xi, h).double()
            del xg, ag, xi, h
            continue
        for i0 in range(0, n, nc):
            rows = cols = 0
            for j0 in range(0, l, ls):
                xg, ag = _gather(xs, dys, idx[:, j0:j0 + ls], sources)
                rows = rows + torch.einsum("ngcbj,mgokbj->bnmgock", xg[i0:i0 + nc], ag)  # D_{n m}
                cols = cols + torch.einsum("mgcbj,ngokbj->bnmgock", xg, ag[i0:i0 + nc])  # D_{m n}
                del xg, ag
            tmat[i0:i0 + nc] += (rows * cols).sum((0, 3, 4, 5, 6), dtype=torch.float64)
            del rows, cols
    return tmat


def _same_block_t(xs, dys, sources, mode: str, r: int):
    """T_B at rank r as an (N, N) pair matrix (orthogonal probes)."""
    n, g, cg, p = xs.shape
    if mode == "spatial":
        return _segment_pairs(xs, dys, list(range(0, p, r)) + [p], sources)
    tmat = torch.zeros(n, n, dtype=torch.float64, device=xs.device)
    for gi in range(g):
        delta = [(c * p) % r for c in range(gi * cg, (gi + 1) * cg)]
        for dl in sorted(set(delta)):  # channels whose flat blocks cut them at the same pixels
            sel = torch.tensor([i for i, v in enumerate(delta) if v == dl], device=xs.device)
            edges = [0] + list(range(r - dl, p, r)) + [p]
            tmat += _segment_pairs(xs[:, gi:gi + 1, sel], dys[:, gi:gi + 1], edges, sources)
    return tmat


def _check_shapes(x, dy, weight_shape, geo: ConvGeometry) -> None:
    d = len(weight_shape) - 2
    what = f"x {tuple(x.shape)}, dy {tuple(dy.shape)}, weight {tuple(weight_shape)}, groups {geo.groups}"
    if x.dim() != d + 2 or dy.dim() != d + 2 or x.shape[0] != dy.shape[0]:
        raise InputError(f"probe_variance_terms needs batched X and dY (N, C, *spatial) of one {d}d conv "
                         f"with the same N; got {what}")
    if x.shape[1] != weight_shape[1] * geo.groups or dy.shape[1] != weight_shape[0] or weight_shape[0] % geo.groups:
        raise InputError(f"channels do not fit the weight: {what}; X needs weight[1] * groups channels, "
                         "dY weight[0]")
    out = tuple((i + pl + pr - dl * (k - 1) - 1) // s + 1 for i, k, s, dl, pl, pr in zip(
        x.shape[2:], weight_shape[2:], geo.stride, geo.dilation, geo.pad_left, geo.pad_right))
    if tuple(dy.shape[2:]) != out:
        raise InputError(f"dY's spatial shape {tuple(dy.shape[2:])} is not the conv's output {out} for {what}: "
                         "pass the geometry the conv ran with (fxsketch.ops.probed.conv_geometry)")


def probe_variance_terms(x: torch.Tensor, dy: torch.Tensor, weight_shape, geo: ConvGeometry,
                         mode: str = "spatial", probe: str = "gaussian", ranks: Iterable[int] = (),
                         keep_grad: bool = False) -> ProbeVarianceTerms:
    """The closed-form statistics of one conv call Y = conv(X, W) with output gradient dY.

    ``geo`` is the call's :func:`fxsketch.ops.probed.conv_geometry`. Gaussian and rademacher
    terms serve every rank; orthogonal probes' same-block terms depend on the rank, so those are
    computed for ``ranks`` (each costs about as much as the cross-sample term T). fp64 inputs are
    computed in fp64, others in fp32 with fp64 sums. ``keep_grad`` keeps the exact dW.

    >>> terms = probe_variance_terms(x, dy, (8, 4, 3, 3), conv_geometry((8, 4, 3, 3), 1, 1, 1, 1))  # doctest: +SKIP
    >>> terms.variance(16), terms.variance(16, batch=256)                                          # doctest: +SKIP
    """
    check_rank_mode_probe(1, mode, probe)
    ranks = sorted({int(r) for r in ranks})
    for r in ranks:
        check_rank_mode_probe(r, mode, probe)
    if probe == "orthogonal" and not ranks:
        raise InputError("orthogonal probes: the variance depends on the rank through the probe's blocks; "
                         "pass the candidate ranks (probe_variance_terms(..., ranks=[...]))")
    _check_shapes(x, dy, weight_shape, geo)
    work = torch.float64 if torch.float64 in (x.dtype, dy.dtype) else torch.float32
    n, c, o, g = x.shape[0], x.shape[1], dy.shape[1], geo.groups
    p = math.prod(x.shape[2:])
    xs, dys = x.detach().to(work), dy.detach().to(work)
    tmat, grad_sq, grad = _cross_pairs(xs, dys, tuple(weight_shape), geo)
    if not keep_grad:
        grad = None

    def sources(q):
        return _tap_sources(q, x.shape[2:], dy.shape[2:], weight_shape[2:], geo)

    positions = p if mode == "spatial" else c * p
    orth = [r for r in ranks if r < positions] if probe == "orthogonal" else []
    x4, dy4 = xs.reshape(n, g, c // g, p), dys.reshape(n, g, o // g, -1)
    token = _budget.set(chunk_budget(x.numel(), dy.numel()))
    try:
        dmat, fmat, fb = _pixel_stats(x4, dy4, sources, mode, orth)
        f, t = Split.of(fmat), Split.of(tmat)
        blocks = {}
        if probe == "orthogonal":  # one block holding every position: the estimate is exact
            blocks = {r: (Split.of(fb[r]), Split.of(_same_block_t(x4, dy4, sources, mode, r))) if r in fb
                      else (f, t) for r in ranks}
    finally:
        _budget.reset(token)
    return ProbeVarianceTerms(mode, probe, n, Split.of(dmat), f, t, blocks, grad_sq,
                              None if grad is None else grad.float())


def workspace_nbytes(x_shape, y_shape, weight_shape, mode: str = "spatial", probe: str = "gaussian",
                     ranks: Iterable[int] = (), asymmetric: bool = True) -> int:
    """Estimated peak bytes :func:`probe_variance_terms` allocates beside fp32 X and dY, phase by
    phase from its own chunk plans: the cross-sample wgrads (rows, columns and their product,
    3N|W|, beside the samples folded into channels and, for asymmetric padding, a padded copy),
    the pixel pass with its block accumulators, and the orthogonal same-block pass.

    >>> workspace_nbytes((8, 64, 56, 56), (8, 64, 56, 56), (64, 64, 3, 3)) // 2**20
    27
    """
    token = _budget.set(chunk_budget(math.prod(x_shape), math.prod(y_shape)))
    try:
        return _workspace(x_shape, y_shape, weight_shape, mode, probe, ranks, asymmetric)
    finally:
        _budget.reset(token)


def _workspace(x_shape, y_shape, weight_shape, mode, probe, ranks, asymmetric) -> int:
    n, c, o = x_shape[0], x_shape[1], y_shape[1]
    g = c // weight_shape[1]
    cg, og = c // g, o // g
    p, k = math.prod(x_shape[2:]), math.prod(weight_shape[2:])
    w = math.prod(weight_shape)
    rows_cols = min(2 * n * w, max(_budget.get(), 2 * n * g * cg * k))  # one output-channel chunk
    cross = w + 3 * rows_cols // 2 + math.prod(x_shape) * (2 if asymmetric else 1) + math.prod(y_shape)
    orth = sorted(int(r) for r in ranks if int(r) < (p if mode == "spatial" else c * p)) if probe == "orthogonal" else []
    acc = sum(4 * -(-(p if mode == "spatial" else c * p) // r) * (g if mode == "spatial" else 1) * n * n for r in orth)
    pixel = _pixel_plan(n, g, cg, og, k, p, mode == "channel" and bool(orth))[1] + acc
    seg = 0
    for r in orth:  # channel mode: at most a group's channels share one segmentation
        l, n_seg = (r, -(-p // r)) if mode == "spatial" else (min(r, p), -(-p // r) + 1)
        seg = max(seg, _segment_plan(n, g if mode == "spatial" else 1, cg, og, k, l, n_seg)[4])
    # 4 bytes, and a quarter for temporaries inside einsum; the orthogonal same-block pass's
    # einsum copies are not planned chunk by chunk: another quarter for them
    return (5 if not orth else 6) * max(cross, pixel, seg)
