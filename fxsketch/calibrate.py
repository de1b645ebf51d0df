"""Calibrate the gradient noise of probed convolutions against the SGD noise already in dW.

A probed conv replaces the exact weight gradient dW of a convolution by an unbiased estimate.
That extra noise is harmless while it stays on the order of the noise that minibatch sampling
already puts into dW. :func:`calibrate_convs` measures both, per conv, on one example batch:

One exact forward + backward of the model (``torch.autograd.grad`` with respect to the conv
weights, so no ``.grad`` is ever written) captures, for every call of every listed conv, its input
X and its output gradient dY. Everything else is computed from (X, dY) with the conv's own
weight-gradient kernels; the model is not run again.

Definitions (all norms are Frobenius norms over every element of dW):

* exact gradient: ``dW = wgrad(X, dY)`` for the whole batch (summed over the conv's calls).
* SGD noise: split the batch into k contiguous groups G_1..G_k of equal size (k = the batch size by default:
  per-sample gradients). With g_i the contribution of sample i to dW (so dW = sum_i g_i), the
  group-mean gradient is M_g = k * sum_{i in G_g} g_i, and dW = mean_g M_g. The SGD noise is the
  standard error of that mean::

      sgd_noise = sqrt( sum_elements Var_g[M_g] / k ) = || std_g(M_g) ||_F / sqrt(k)

  with the unbiased (k - 1) variance over groups: an estimate of sqrt(E ||dW - E dW||_F^2), the
  RMS deviation of the batch gradient from the expected gradient under resampling the batch.
  It does not depend on whether the loss is a mean or a sum over the batch. Approximation: dY of
  a sample is taken from the whole-batch backward, so cross-sample terms (BatchNorm's batch
  statistics) are held fixed, as in the usual per-sample-gradient estimates.
* probe noise at rank r: with the sketch op of :mod:`fxsketch.ops.probed_conv` (the very
  functions its backward calls: ``sketch`` in forward, ``dw_spatial``/``dw_channel`` in backward)
  and S fresh seeds s, ``probe_noise[r] = sqrt( mean_s ||dW_hat_s - dW||_F^2 )``, the RMS error
  of the estimate (its std, since it is unbiased). S = ``n_probe_samples``.
* ``ratio(r) = probe_noise[r] / sgd_noise``: how much noise probing adds, in units of the noise
  SGD already has. Independent noises add in quadrature, so ratio 1 makes dW's total noise
  sqrt(2) times SGD's; ratio 0.5 makes it 1.12 times.

>>> noise = calibrate_convs(model, (x,), {"conv1": model.conv1}, {"conv1": [4, 16, 64]})  # doctest: +SKIP
>>> noise["conv1"].smallest_rank(1.0), noise["conv1"].ratio(16)                           # doctest: +SKIP
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._state import preserved
from .errors import InputError
from .measurement import default_loss
from .passes.patterns import CONV_FUNCS as _CONV_FUNCS
from .passes.trace import check_inputs
from .ops.probed import conv_geometry, dw_channel, dw_spatial, exact_weight_grad, sketch
from .ops.probes import check_rank_mode_probe

__all__ = ["ConvNoise", "calibrate_convs", "sgd_noise_of", "probe_noise_of"]

_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass(frozen=True, eq=False)
class ConvNoise:
    """Gradient noise of one convolution's dW on the calibration batch (see module docstring)."""

    sgd_noise: float
    """Standard error of the batch-mean dW, ||std over groups of group-mean dW||_F / sqrt(k)."""
    probe_noise: Mapping[int, float]
    """Rank -> RMS Frobenius error of the probed dW estimate against the exact dW."""
    grad_norm: float = float("nan")
    """||dW||_F of the exact gradient on the batch (for scale)."""
    groups: int = 0
    """k, the number of batch groups the SGD noise was estimated from."""
    calls: int = 1
    """How many times the conv ran in the forward pass (shared weights: estimates summed)."""
    shape: tuple[int, ...] = field(default=())
    """Shape of the conv's input X at its first call."""

    def ratio(self, rank: int) -> float:
        """probe_noise[rank] / sgd_noise (inf when the batch shows no SGD noise but probing does)."""
        if rank not in self.probe_noise:
            raise KeyError(f"rank {rank} was not calibrated; calibrated ranks: {sorted(self.probe_noise)}")
        p = self.probe_noise[rank]
        if self.sgd_noise > 0:
            return p / self.sgd_noise
        return 0.0 if p == 0 else math.inf

    def smallest_rank(self, max_grad_noise: float) -> int:
        """The smallest calibrated rank with ratio(rank) <= max_grad_noise; the largest rank if none."""
        ranks = sorted(self.probe_noise)
        for r in ranks:
            if self.ratio(r) <= max_grad_noise:
                return r
        return ranks[-1]


# --------------------------------------------------------------------------------------------
# capture


@dataclass
class _Call:
    x: torch.Tensor
    geo: Any
    weight_shape: tuple[int, ...]
    dy: torch.Tensor | None = None


class _Capture(TorchFunctionMode):
    """Record (X, geometry) of every F.convNd call whose weight is one of ``weights`` and hook
    its output to record dY in backward. nn.ConvNd modules go through F.convNd, so both forms
    (call_module and call_function nodes) are seen."""

    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights = weights
        self.calls: dict[str, list[_Call]] = {name: [] for name in weights.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONV_FUNCS:
            bound = dict(zip(_ARG_NAMES, args)) | kwargs
            w = bound.get("weight")
            name = self.weights.get(id(w)) if isinstance(w, torch.Tensor) else None
            if name is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                x = bound["input"]
                d = _CONV_FUNCS[func]
                if x.dim() == d + 1:
                    raise ValueError(f"conv {name!r}: unbatched input {tuple(x.shape)} cannot be calibrated")
                geo = conv_geometry(tuple(w.shape), bound.get("stride", 1), bound.get("padding", 0),
                                    bound.get("dilation", 1), bound.get("groups", 1))
                call = _Call(x.detach(), geo, tuple(w.shape))
                self.calls[name].append(call)

                def hook(g, call=call):
                    call.dy = g.detach()
                out.register_hook(hook)
        return out


# --------------------------------------------------------------------------------------------
# noise of one conv from its (X, dY) calls


def _group_grads(x, dy, geo, weight_shape, k: int) -> torch.Tensor:
    """sum_{i in G_g} g_i for k equal groups of the batch, shape (k, *weight_shape), fp32, in one
    grouped wgrad: the groups are folded into channels and the conv's groups multiplied by k."""
    n = x.shape[0]
    m = n // k
    x = x[: m * k].float().reshape(k, m, *x.shape[1:]).transpose(0, 1).reshape(m, -1, *x.shape[2:])
    dy = dy[: m * k].float().reshape(k, m, *dy.shape[1:]).transpose(0, 1).reshape(m, -1, *dy.shape[2:])
    geo_k = type(geo)(geo.stride, geo.dilation, geo.pad_left, geo.pad_right, geo.groups * k)
    wshape = (k * weight_shape[0], *weight_shape[1:])
    return exact_weight_grad(dy, x.contiguous(), wshape, geo_k).reshape(k, *weight_shape)


def sgd_noise_of(calls: Sequence[_Call], k: int) -> tuple[float, torch.Tensor]:
    """(||std_g(M_g)||_F / sqrt(k), exact dW), M_g = k * (sum over group g of per-sample dW),
    summed over the conv's calls; dW = mean_g M_g comes for free."""
    total = None
    for c in calls:
        s = _group_grads(c.x, c.dy, c.geo, c.weight_shape, k)
        total = s if total is None else total.add_(s)
    exact = total.sum(dim=0)
    dev = total.mul_(k).sub_(exact)  # M_g - mean_g M_g
    var_sum = float(torch.linalg.vector_norm(dev)) ** 2 / (k - 1)  # unbiased over the k groups
    return math.sqrt(var_sum / k), exact


def probe_noise_of(calls: Sequence[_Call], exact: torch.Tensor, rank: int, mode: str, probe: str,
                   seeds: Sequence[int], rel_tol: float = 0.0, min_seeds: int = 3) -> float:
    """sqrt(mean over seeds of ||dW_hat - dW||_F^2), dW_hat from the probed conv's own sketch and
    backward functions (each call of the conv with its own seed, as in training).

    With ``rel_tol`` > 0 the seeds stop early, after at least ``min_seeds``, once the standard
    error of the mean squared error is below ``rel_tol`` of it (large layers average over many
    elements and converge in a few draws; small ones use every seed)."""
    sq = []
    for s in seeds:
        est = None
        for j, c in enumerate(calls):
            seed = (int(s) * 7919 + j) % (2**31 - 1)
            xbar = sketch(c.x, seed, rank, mode, probe)
            if mode == "spatial":
                dw = dw_spatial(c.dy, xbar, seed, rank, probe, c.x.shape[2:], c.weight_shape, c.geo)
            else:
                dw = dw_channel(c.dy, xbar, seed, rank, probe, tuple(c.x.shape), c.weight_shape, c.geo)
            est = dw if est is None else est.add_(dw)
        sq.append(float(torch.linalg.vector_norm(est.sub_(exact))) ** 2)
        if rel_tol > 0 and len(sq) >= max(2, min_seeds):
            t = torch.tensor(sq, dtype=torch.float64)
            if float(t.std() / math.sqrt(len(sq))) <= rel_tol * float(t.mean()):
                break
    return math.sqrt(sum(sq) / len(sq))


# --------------------------------------------------------------------------------------------
# public entry


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _weight_of(name: str, conv) -> torch.Tensor:
    if isinstance(conv, torch.Tensor):
        return conv
    w = getattr(conv, "weight", None)
    if isinstance(conv, nn.Module) and isinstance(w, torch.Tensor):
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"conv {name!r} has padding_mode={conv.padding_mode!r}; only 'zeros' convs "
                             "can be probed")
        return w
    raise TypeError(f"convs[{name!r}] must be a conv nn.Module or its weight tensor, got {type(conv).__name__}")


def calibrate_convs(model: nn.Module, example_inputs: Any, convs: Mapping[str, Any],
                    ranks_by_conv: Mapping[str, Sequence[int]], *, loss_fn: Callable | None = None,
                    mode: str = "spatial", probe: str = "gaussian", n_probe_samples: int = 8,
                    sgd_groups: int | None = None, seed: int = 0, rel_tol: float = 0.1,
                    progress: bool | None = None) -> dict[str, ConvNoise]:
    """Measure, per conv, the SGD noise of dW and the probe noise of each candidate rank.

    ``convs`` maps a name (fx node name or module path; only used as the key) to the conv
    ``nn.Module`` or its weight tensor; ``ranks_by_conv[name]`` lists the candidate ranks.
    ``loss_fn(output)`` gives the scalar loss (default: :func:`fxsketch.measure.default_loss`).
    ``sgd_groups``: k, the number of batch groups for the SGD noise (default: the batch size,
    i.e. per-sample gradients; must divide into the batch, at least 2). ``seed``: base seed of
    the probe draws (calibration is deterministic and leaves torch's RNG streams alone).
    ``n_probe_samples``: the most probe seeds per rank; ``rel_tol``: stop drawing seeds (after at
    least 3) once the standard error of the mean squared probe error is below this fraction of it
    (0: always draw ``n_probe_samples``).

    The model is not modified: no ``.grad`` is written (gradients are taken with
    ``torch.autograd.grad``), buffers (BatchNorm running statistics) and train/eval flags are
    restored. Its train/eval mode is used as is (BatchNorm in train mode uses batch statistics).
    One exact forward+backward runs, then per conv one grouped weight-gradient call for the SGD
    noise and ``n_probe_samples`` sketch+estimate calls per rank.
    """
    check_rank_mode_probe(1, mode, probe)
    if n_probe_samples < 1:
        raise ValueError(f"n_probe_samples must be >= 1, got {n_probe_samples}")
    missing = [n for n in convs if n not in ranks_by_conv or not ranks_by_conv[n]]
    if missing:
        raise ValueError(f"no candidate ranks for conv(s) {missing}: ranks_by_conv must list at least one")
    for n in convs:
        for r in ranks_by_conv[n]:
            check_rank_mode_probe(r, mode, probe)
    inputs = tuple(x.detach() for x in check_inputs(model, example_inputs))
    if any(x.device.type == "meta" or _is_fake(x) for x in inputs):
        raise InputError("calibrate_convs needs real tensors as example_inputs (it runs one real "
                         "forward+backward); got meta or fake tensors")
    loss_fn = default_loss if loss_fn is None else loss_fn
    weights = {name: _weight_of(name, c) for name, c in convs.items()}
    by_id: dict[int, str] = {}
    for name, w in weights.items():
        if not w.requires_grad:
            raise ValueError(f"conv {name!r}: its weight does not require grad, so it has no dW to calibrate")
        if id(w) in by_id:
            raise ValueError(f"convs {by_id[id(w)]!r} and {name!r} share one weight: list it once")
        by_id[id(w)] = name
    if not weights:
        return {}

    names = list(weights)
    with preserved(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
        capture = _Capture(by_id)
        with capture:
            out = model(*inputs)
        loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError("loss_fn must return a scalar tensor")
        grads = torch.autograd.grad(loss, [weights[n] for n in names], allow_unused=True)
        del out, loss

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):
            return it
    result: dict[str, ConvNoise] = {}
    seeds = [seed * 1_000_003 + i + 1 for i in range(n_probe_samples)]
    for name, grad in tqdm(list(zip(names, grads)), desc="calibrating convs", unit="conv",
                           disable=None if progress is None else not progress, leave=False):
        calls = [c for c in capture.calls[name] if c.dy is not None]
        if grad is None or not calls:
            raise ValueError(f"conv {name!r} did not take part in the loss's backward (no call of it "
                             "was recorded with a gradient); is it used by the model?")
        n = calls[0].x.shape[0]
        if any(c.x.shape[0] != n for c in calls):
            raise ValueError(f"conv {name!r} ran on batches of different sizes; cannot split them into groups")
        k = n if sgd_groups is None else int(sgd_groups)
        if not 2 <= k <= n or n % k:
            raise ValueError(f"the SGD noise needs k >= 2 equal batch groups; batch {n}, sgd_groups {sgd_groups}")
        sgd, exact = sgd_noise_of(calls, k)
        err = float((exact - grad.float()).norm()) / max(float(grad.float().norm()), 1e-30)
        if err > 1e-3:
            warnings.warn(f"conv {name!r}: dW rebuilt from the captured X and dY differs from autograd's "
                          f"by {err:.2e} (relative); an in-place op may have changed X or dY")
        probe_noise = {int(r): probe_noise_of(calls, exact, int(r), mode, probe, seeds, rel_tol)
                       for r in sorted(set(ranks_by_conv[name]))}
        result[name] = ConvNoise(sgd_noise=sgd, probe_noise=probe_noise,
                                 grad_norm=float(torch.linalg.vector_norm(exact)), groups=k, calls=len(calls),
                                 shape=tuple(calls[0].x.shape))
        for c in calls:  # free X and dY as we go
            c.x = c.dy = None
    return result
