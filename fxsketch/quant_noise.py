"""Gradient noise of a norm whose backward reads a stochastically rounded copy of its input.

The quantized norms (:mod:`fxsketch.ops.quant`) replace X by X + e, e independent per element,
E e = 0, Var e_i = v_i = step**2 f_i (1 - f_i) <= step**2 / 4 (f_i the fractional part of
(X_i - lo) / step), with the statistics mean / rstd = r kept exact. For a set S of M elements that
one statistic runs over (a channel of a BatchNorm, a group, a row), x_hat = (X - mean) r,
g = dY gamma, m_S = mean_S(g x_hat):

* dgamma_k = sum_{i in k} dY_i x_hat_i is linear in X: its error is unbiased with
      E||d dgamma||^2 = sum_i dY_i^2 r_i^2 v_i;
* dX_i = r (g_i - mean_S g - x_hat_i m_S); to first order in e,
      E||d dX||_S^2 = r^4 (m_S^2 V_S + 2 m_S A_S / M + X2_S Q_S / M^2),
  V = sum v, A = sum x_hat g v, Q = sum g^2 v, X2 = sum x_hat^2 over S (0 for a BatchNorm
  using its running statistics: dX then does not read X). dbeta is exact.

The level a plan states (:meth:`QuantNoise.ratio`) is, like the probes', in units of SGD noise,
the larger of two ratios, both measured on the calibration batch of b samples:

* weight: sqrt(E||d dgamma||^2) / sqrt(B sigma^2), sigma^2 the per-sample variance of the
  norm's own dgamma (per-sample gradients g_n, as :mod:`fxsketch.calibrate` does for convs);
* upstream: sqrt(kappa E||d dX||^2 / ||dX||^2), the relative error of the dX the norm passes up,
  times kappa = sum_n ||g_n||^2 / (B sigma^2) of the norm's own weight (1 without one): for a
  layer upstream that maps dX linearly and alike for every sample, its gradient's error energy
  is that fraction of its per-sample gradients' energy, and kappa turns that into units of its
  SGD noise (the norm's weight standing in for the upstream layers: an approximation).

Batch: errors, per-sample energies and SGD variance all grow like B (sums over samples of
independent terms; the term X2 Q / M^2 of a BatchNorm grows slower, so the extrapolation errs on
the noisier side), so both ratios are the calibration batch's. Groups that span the batch (a 2-dim
BatchNorm input) widen with B: their step**2 is scaled by ln B / ln b (a Gaussian's range).

Uncalibrated: :class:`QuantPrior`, ratio = scale sqrt(2 ln K) / (2**bits - 1), K the elements of a
quantization group: a Gaussian group spans about 2 sqrt(2 ln K) standard deviations, f(1 - f) <= 1/4,
and ``scale`` (:data:`QUANT_PRIOR_SCALE`) allows heavier tails (docs/quant.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from ._state import preserved
from .ops.quant import QUANT_BITS, _range, quant_groups
from .passes.precision import forward_context

__all__ = ["QuantNoise", "QuantPrior", "QUANT_PRIOR_SCALE", "norm_noise_terms", "calibrate_norms",
           "norm_hook_nbytes"]

QUANT_PRIOR_SCALE = 2.0
"""Prior ratio at a Gaussian group's range, doubled: heavier tails than Gaussian (docs/quant.md)."""


@dataclass(frozen=True)
class QuantPrior:
    """The noise a plan assumes for a norm it could not calibrate (module docstring)."""

    group_elems: int
    scale: float = QUANT_PRIOR_SCALE
    calibrated: bool = False

    def ratio(self, bits: int) -> float:
        return self.scale * math.sqrt(2 * math.log(max(self.group_elems, 2))) / ((1 << int(bits)) - 1)


@dataclass(frozen=True)
class QuantNoise:
    """One norm's statistics on the calibration batch (module docstring); ``ratio(bits)`` the level."""

    weight_err: Mapping[int, float]   # bits -> E||d dgamma||^2
    dx_err: Mapping[int, float]       # bits -> E||d dX||^2 (first order)
    sgd_var: float                    # b sigma^2 of dgamma (nan: no weight)
    per_sample_sq: float              # sum_n ||g_n||^2 of dgamma
    dx_sq: float                      # ||dX||^2
    batch: int
    calibration_batch: int
    growth: float = 1.0               # range growth of batch-wide groups from b to B
    calibrated: bool = True
    shape: tuple[int, ...] = field(default=())

    def weight_ratio(self, bits: int) -> float:
        if not math.isfinite(self.sgd_var):
            return 0.0
        return _ratio(self.growth * self.weight_err[bits], self.sgd_var)

    def dx_ratio(self, bits: int) -> float:
        kappa = self.per_sample_sq / self.sgd_var if math.isfinite(self.sgd_var) and self.sgd_var > 0 else 1.0
        return _ratio(kappa * self.growth * self.dx_err[bits], self.dx_sq)

    def ratio(self, bits: int) -> float:
        """max(weight, upstream) ratio at ``bits``, in units of SGD noise (module docstring)."""
        return max(self.weight_ratio(bits), self.dx_ratio(bits))


def _ratio(err_sq: float, ref_sq: float) -> float:
    if ref_sq > 0:
        return math.sqrt(max(err_sq, 0.0) / ref_sq)
    return 0.0 if err_sq <= 0 else math.inf


def _sets(kind: str, x: torch.Tensor, groups: int, normalized: int) -> torch.Tensor:
    """One sample (or a 2-dim input's row) as (sets, elements of the set in it)."""
    if kind == "group":
        return x.reshape(groups, -1)
    if kind == "layer":
        return x.reshape(-1, math.prod(x.shape[x.dim() - normalized:]))
    return x.reshape(x.shape[0], -1)  # batch / instance: (C, P)


def norm_noise_terms(x: torch.Tensor, dy: torch.Tensor, kind: str, *, weight: torch.Tensor | None = None,
                     eps: float = 1e-5, num_groups: int = 1, normalized_dims: int = 1, batch_stats: bool = True,
                     running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                     batch: int | None = None) -> QuantNoise:
    """The closed-form statistics of one norm call on (X, dY), X of b >= 2 samples, one sample at
    a time (fp32 temporaries of one sample); ``kind`` "batch", "instance", "group" or "layer"."""
    x, dy = x.detach(), dy.detach()
    b = x.shape[0]
    n_sets = {"batch": x.shape[1], "instance": x.shape[1], "group": num_groups}.get(kind)
    spans_batch = kind == "batch" and x.dim() == 2
    xs3 = x.reshape(b, x.shape[1], -1) if kind in ("batch", "instance") else None
    if kind == "batch":  # one statistic per channel over the batch
        if batch_stats:
            var, mean = torch.var_mean(xs3.float().transpose(0, 1).reshape(x.shape[1], -1), dim=1, correction=0)
        else:
            mean, var = running_mean.float(), running_var.float()
        shared = (mean[:, None], (var + eps).rsqrt()[:, None])
    ranges = {bits: _range(x, quant_groups(x.shape, "layer" if kind == "layer" else kind, normalized_dims),
                           (1 << bits) - 1) for bits in QUANT_BITS}
    w_err = dict.fromkeys(QUANT_BITS, 0.0)
    dx_err = dict.fromkeys(QUANT_BITS, 0.0)
    acc = {}  # a BatchNorm's per-channel sums, complete after the last sample
    sq_sum, total, dx_sq = 0.0, None, 0.0
    for n in range(b):
        xn, gn = x[n].float(), dy[n].float()
        sx, sy = _sets(kind, xn, num_groups, normalized_dims), _sets(kind, gn, num_groups, normalized_dims)
        if kind == "batch":
            mean, rstd = shared
        else:
            var, mean = torch.var_mean(sx, dim=1, correction=0, keepdim=True)
            rstd = (var + eps).rsqrt()
        xh = (sx - mean) * rstd
        gamma = _affine(kind, weight, sx.shape, xn.shape, normalized_dims)
        g = sy * gamma if gamma is not None else sy
        if weight is not None:
            gw = _per_channel(kind, sy * xh, xn.shape, normalized_dims, n_sets)
            sq_sum += float(gw.double().pow(2).sum())
            total = gw.double() if total is None else total + gw.double()
        sums = {"M": torch.full_like(rstd[:, 0], sx.shape[1]), "g": g.sum(1), "g2": (g * g).sum(1),
                "x": xh.sum(1), "x2": (xh * xh).sum(1), "xg": (xh * g).sum(1)}
        for bits, (lo, step) in ranges.items():
            lo_n, step_n = (lo[n], step[n]) if lo.shape[0] != 1 else (lo[0], step[0])
            t = (xn - lo_n) / step_n
            f = t - t.floor()
            v = _sets(kind, (step_n * step_n * f * (1 - f)).expand_as(xn), num_groups, normalized_dims)
            w_err[bits] += float((sy * sy * rstd * rstd * v).double().sum()) if weight is not None else 0.0
            sums |= {f"V{bits}": v.sum(1), f"A{bits}": (xh * g * v).sum(1), f"Q{bits}": (g * g * v).sum(1)}
        if kind == "batch":
            for k, s in sums.items():
                acc[k] = s.double() if k not in acc else acc[k] + s.double()
        else:
            dx_sq, dx_err = _finish(sums, rstd[:, 0], dx_sq, dx_err, True)
    if kind == "batch":
        dx_sq, dx_err = _finish(acc, shared[1][:, 0].double(), dx_sq, dx_err, batch_stats)
    sgd = (sq_sum - float(total.pow(2).sum()) / b) / (b - 1) * b if total is not None else math.nan
    big = b if batch is None else int(batch)
    growth = math.log(big) / math.log(b) if spans_batch and big > b else 1.0
    return QuantNoise(w_err, dx_err, sgd, sq_sum, dx_sq, big, b, growth, shape=tuple(x.shape))


def _affine(kind, weight, set_shape, sample_shape, normalized):
    """gamma per element of a sample's (sets, elements) view, or None."""
    if weight is None:
        return None
    w = weight.detach().float()
    if kind in ("batch", "instance"):
        return w[:, None]
    if kind == "group":
        c = sample_shape[0]
        per = math.prod(sample_shape[1:])
        return w[:, None].expand(c, per).reshape(set_shape)
    return w.reshape(1, -1)


def _per_channel(kind, t, sample_shape, normalized, n_sets):
    """Sum of a sample's (sets, elements) values per affine channel: this sample's dgamma."""
    if kind in ("batch", "instance"):
        return t.sum(1)
    if kind == "group":
        return t.reshape(sample_shape[0], -1).sum(1)
    return t.sum(0)


def _finish(s, rstd, dx_sq, dx_err, depends_on_x: bool):
    """Add the complete sets' ||dX||^2 and E||d dX||^2 (module docstring) to the totals."""
    r2, m = rstd * rstd, s["M"]
    mean_xg = s["xg"] / m
    if depends_on_x:
        energy = s["g2"] - s["g"] ** 2 / m - 2 * mean_xg * (s["xg"] - s["g"] * s["x"] / m) + mean_xg ** 2 * s["x2"]
    else:
        energy = s["g2"]
    dx_sq += float((r2 * energy).sum())
    out = dict(dx_err)
    for bits in QUANT_BITS:
        if depends_on_x:
            e = r2 * r2 * (mean_xg ** 2 * s[f"V{bits}"] + 2 * mean_xg * s[f"A{bits}"] / m
                           + s["x2"] * s[f"Q{bits}"] / (m * m))
            out[bits] += float(e.sum())
    return dx_sq, out


def norm_hook_nbytes(x_shape) -> int:
    """What one calibration hook holds beside the step's own tensors: about 12 fp32 copies of one
    sample of X (its values, dY, x_hat, g, the rounding variances and their products)."""
    return 12 * 4 * math.prod(x_shape[1:])


class _Capture(fx.Interpreter):
    """Runs the traced graph; at every listed norm node hooks the output and folds (X, dY) in."""

    def __init__(self, gm: fx.GraphModule, params: Mapping[str, Callable], batch: int):
        super().__init__(gm)
        self.params, self.batch, self.noise = params, batch, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        reader = self.params.get(n.name)
        if reader is not None and isinstance(out, torch.Tensor) and out.requires_grad:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            kw = reader(self.module, n, args, kwargs)
            if kw is not None and args[0].dim() >= 2 and args[0].shape[0] >= 2:
                ref = [args[0].detach()]

                def hook(dy, name=n.name, kw=kw):
                    self.noise[name] = norm_noise_terms(ref.pop(), dy, batch=self.batch, **kw)
                out.register_hook(hook)
        return out


def calibrate_norms(gm: fx.GraphModule, inputs: tuple, params: Mapping[str, Callable], *, batch: int,
                    loss_fn: Callable, model: Any = None) -> dict[str, QuantNoise]:
    """Statistics of the listed norm nodes from one exact forward + backward of ``gm`` on the
    real calibration ``inputs``, stated for batch ``batch``. ``params[name](module, node, args,
    kwargs)`` gives :func:`norm_noise_terms`' keywords for that call (None: skip it). Buffers,
    flags and ``.grad`` are left as they were (``model``, or ``gm``), and so is torch's RNG."""
    if not params:
        return {}
    with preserved(model if model is not None else gm, grads=True), torch.random.fork_rng(devices=[]), \
            torch.enable_grad():
        capture = _Capture(gm, params, batch)
        with forward_context(inputs[0].device.type if inputs else "cpu"):
            loss = loss_fn(capture.run(*inputs))
        wrt = [p for p in gm.parameters() if p.requires_grad]
        torch.autograd.grad(loss, wrt, allow_unused=True)
    return capture.noise
