"""Calibrate the gradient noise of probed convolutions against the SGD noise already in dW.

A probed conv replaces the exact weight gradient dW of a convolution by an unbiased estimate.
That extra noise is harmless while it stays on the order of the noise that minibatch sampling
already puts into dW. :func:`calibrate_convs` measures both, per conv, from one exact forward +
backward on a small real *calibration batch* of b samples, and states them for the training
batch of B samples:

* Streaming. A torch-function mode sees every ``F.convNd`` call of a listed conv and hooks its
  output; when the output gradient dY arrives in backward, the hook computes that call's
  statistics from (X, dY) at once and lets both go. X is the tensor autograd saves for the conv's
  own backward anyway, so calibration holds nothing beyond the step's own tensors but running
  sums (and, for a conv called several times, one (b, *W) per-sample accumulator until its last
  call). No ``.grad`` is written (``torch.autograd.grad`` on the conv weights).
* SGD noise. g_n is sample n's contribution to dW (so dW = sum_n g_n, the gradient of a loss
  summed over samples). With sigma^2 the unbiased per-sample variance of g_n summed over dW's
  elements, the SGD noise of the batch gradient is sqrt(B sigma^2) at batch B: the standard error
  of a sum of B independent samples (the 1/B law for the batch mean, in sum units).
* Probe noise, closed form (:mod:`fxsketch.noise`): E||dW_hat - dW||_F^2 for every rank at once,
  from quadratic statistics of (X, dY) split into same-sample and cross-sample parts, extrapolated
  from b to B by the number of pairs (B/b and B(B-1)/(b(b-1))). A cross-sample part that comes
  out negative on the b samples (the pairs' mean is small and its estimate noisy, and B(B-1)
  would amplify it into a negative variance) counts as 0: the extrapolation errs on the safe,
  noisier side. Monte Carlo of the real op (:func:`probe_noise_mc`) stays as the checked reference.
* ``ratio(r) = probe_noise(r) / sgd_noise``: how much noise probing adds, in units of the noise
  SGD already has. A global scale of dY (mean vs sum loss, 1/b vs 1/B) cancels in it. Independent
  noises add in quadrature, so ratio 1 makes dW's total noise sqrt(2) times SGD's.

Approximation: dY of a sample is taken from the whole-batch backward, so cross-sample terms
(BatchNorm's batch statistics over b samples rather than B) are held fixed, as in the usual
per-sample-gradient estimates.

>>> noise = calibrate_convs(model, (x,), {"conv1": model.conv1}, batch=64)  # doctest: +SKIP
>>> noise["conv1"].ratio(16), noise["conv1"].smallest_rank(1.0, [4, 16, 64])  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._state import preserved
from .passes.precision import forward_context
from .errors import InputError
from .measurement import default_loss
from .ops.probed import conv_geometry, dw_channel, dw_spatial, exact_weight_grad, sketch
from .ops.probes import check_rank_mode_probe
from .ops.quant import QUANT_BITS
from .ops.qconv import quant_conv_noise_sq
from .passes.patterns import CONV_FUNCS as _CONV_FUNCS
from .passes.trace import check_inputs

__all__ = ["ConvNoise", "PriorNoise", "calibrate_convs", "probe_noise_mc", "hook_workspace_nbytes",
           "clear_cache"]

log = logging.getLogger(__name__)  # "fxsketch.calibrate": what was measured, at DEBUG

_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _Ratios:
    """What both noise kinds share: the rank choice from ``ratio``."""

    def ratio(self, rank: int) -> float:  # pragma: no cover - defined by each kind
        raise NotImplementedError

    def smallest_rank(self, max_grad_noise: float, ranks: Iterable[int]) -> int:
        """The smallest of ``ranks`` with ratio(rank) <= max_grad_noise; the largest if none."""
        ranks = sorted(ranks)
        return next((r for r in ranks if self.ratio(r) <= max_grad_noise), ranks[-1])


@dataclass(frozen=True, eq=False)
class ConvNoise(_Ratios):
    """Gradient noise of one convolution's dW, stated for the training batch (module docstring)."""

    sgd_noise: float
    """sqrt(B sigma^2): the SGD noise of the batch gradient at batch ``batch``."""
    terms: Any
    """The closed-form probe-variance statistics (:func:`fxsketch.noise.probe_variance_terms`)."""
    batch: int
    """B, the batch the figures are stated for."""
    calibration_batch: int
    """b, the samples they were measured on."""
    grad_norm: float = float("nan")
    """||dW||_F of the exact gradient at batch B (extrapolated like the probe statistics)."""
    calls: int = 1
    """How many times the conv ran in the forward pass (shared weights: estimates summed)."""
    shape: tuple[int, ...] = field(default=())
    """Shape of the conv's input X at its first call (calibration batch)."""
    calibrated: bool = True
    quant_sq: Mapping[int, float] = field(default_factory=dict)
    """bits -> E||d dW||^2 on the calibration batch of saving X in that many bits
    (:func:`fxsketch.ops.qconv.quant_conv_noise_sq`, summed over the conv's calls)."""

    def quant_ratio(self, bits: int) -> float:
        """The dW error of a conv input saved in ``bits`` bits (:mod:`fxsketch.ops.qconv`) at
        batch B over sgd_noise: a sum over samples of independent terms, so it grows like B, as
        the SGD variance does (the ratio is the calibration batch's)."""
        err = self.batch / self.calibration_batch * self.quant_sq[int(bits)]
        if self.sgd_noise > 0:
            return math.sqrt(max(err, 0.0)) / self.sgd_noise
        return 0.0 if err <= 0 else math.inf

    def probe_noise(self, rank: int) -> float:
        """RMS Frobenius error of the probed dW estimate at ``rank`` (its std: it is unbiased),
        at batch B: (B/b) x its same-sample part + B(B-1)/(b(b-1)) x its cross-sample part, the
        latter taken as 0 where the calibration batch shows it negative (module docstring)."""
        diag, off = variance_parts(self.terms, int(rank))
        b, big = self.calibration_batch, self.batch
        scale = big * (big - 1) / (b * (b - 1))
        return math.sqrt(max(big / b * diag + scale * max(off, 0.0), 0.0))

    def ratio(self, rank: int) -> float:
        """probe_noise(rank) / sgd_noise (inf when the batch shows no SGD noise but probing does)."""
        p = self.probe_noise(rank)
        if self.sgd_noise > 0:
            return p / self.sgd_noise
        return 0.0 if p == 0 else math.inf


@dataclass(frozen=True)
class PriorNoise(_Ratios):
    """The noise a plan assumes for a conv it could not calibrate (meta inputs and no
    ``calibration_inputs``, a batch of one, or no calibration batch fitting in the budget).

    ratio(r) = scale * sqrt(positions / r), positions = pixels (spatial mode) or channels x
    pixels (channel mode) of one sample: the probe variance of a hashed sketch falls like 1/r
    from its value at r = 1 ... positions. ``scale`` (:data:`PRIOR_SCALE`) is set from calibrated
    convs of the models in docs/training.md so that most of them lie below the prior."""

    positions: int
    scale: float
    calibrated: bool = False

    def ratio(self, rank: int) -> float:
        return self.scale * math.sqrt(self.positions / max(int(rank), 1))


PRIOR_SCALE = 1.25
"""Prior ratio at r = positions: 90 % of 106 calibrated convs (digits CNNs, resnet18, a 3D UNet, at
initialisation) lie at or below the prior at each storage ratio 1/4, 1/16, 1/64
(docs/training.md, "the prior for uncalibrated plans")."""


def probe_variance_terms(x, dy, weight_shape, geo, mode: str, probe: str, ranks=()):
    """The closed-form statistics of one conv call (:func:`fxsketch.noise.probe_variance_terms`)."""
    from .noise import probe_variance_terms as terms
    return terms(x, dy, weight_shape, geo, mode, probe, ranks=ranks)


def variance_parts(terms, rank: int) -> tuple[float, float]:
    """(same-sample, cross-sample) parts of the closed-form variance at ``rank`` on the
    calibration batch (:meth:`fxsketch.noise.ProbeVarianceTerms.variance` is their sum)."""
    terms.variance(rank)  # validates rank (and that orthogonal ranks were computed)
    if terms.probe == "orthogonal":
        fb, tb = terms.blocks[rank]
        parts = ((terms.f, 1), (fb, -1), (terms.t, 1), (tb, -1))
        return tuple(sum(c * getattr(s, k) for s, c in parts) / rank for k in ("diag", "off"))
    cd = {"gaussian": 2.0}.get(terms.probe, 0.0) - 2.0 / rank
    return tuple(cd * getattr(terms.d, k) + (getattr(terms.f, k) + getattr(terms.t, k)) / rank
                 for k in ("diag", "off"))


def prior_noise(x_shape, mode: str) -> PriorNoise:
    positions = math.prod(x_shape[2:]) * (x_shape[1] if mode == "channel" else 1)
    return PriorNoise(positions, PRIOR_SCALE)


# --------------------------------------------------------------------------------------------
# streaming capture


class _ConvStats:
    """Running sums of one conv over its calls: per-sample gradients and closed-form terms."""

    def __init__(self, weight_shape):
        self.weight_shape = weight_shape
        self.calls = 0          # forward calls seen
        self.done = 0           # backward hooks run
        self.per_sample: torch.Tensor | None = None  # (b, *W), only while calls are pending
        self.terms = None
        self.shape: tuple[int, ...] = ()
        self.batch = 0
        self.sq_sum = self.sum_sq = 0.0   # sum_n ||g_n||^2 and ||sum_n g_n||^2 once complete
        self.quant_sq = dict.fromkeys(QUANT_BITS, 0.0)  # E||d dW||^2 of a quantized X, per width


def _per_sample_grads(x, dy, geo, weight_shape) -> torch.Tensor:
    """g_n for every sample n, shape (b, *weight_shape), fp32, in one grouped wgrad: samples
    folded into channels, the conv's groups multiplied by b."""
    b = x.shape[0]
    xs = x.float().reshape(1, -1, *x.shape[2:])
    dys = dy.float().reshape(1, -1, *dy.shape[2:])
    geo_b = type(geo)(geo.stride, geo.dilation, geo.pad_left, geo.pad_right, geo.groups * b)
    return exact_weight_grad(dys, xs, (b * weight_shape[0], *weight_shape[1:]), geo_b).reshape(b, *weight_shape)


class _Capture(TorchFunctionMode):
    """See every F.convNd call whose weight is listed; in backward, fold each call's (X, dY) into
    its conv's running sums and drop them."""

    def __init__(self, weights: dict[int, str], mode: str, probe: str, bar=None, ranks=None, quant: bool = True):
        super().__init__()
        self.weights, self.mode, self.probe, self.bar = weights, mode, probe, bar
        self.ranks = ranks or {}
        self.quant = quant
        self.stats: dict[str, _ConvStats] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONV_FUNCS:
            bound = dict(zip(_ARG_NAMES, args)) | kwargs
            w = bound.get("weight")
            name = self.weights.get(id(w)) if isinstance(w, torch.Tensor) else None
            if name is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                self._watch(name, bound, w, out, _CONV_FUNCS[func])
        return out

    def _watch(self, name, bound, w, out, dims: int):
        x = bound["input"]
        if x.dim() == dims + 1:
            raise ValueError(f"conv {name!r}: unbatched input {tuple(x.shape)} cannot be calibrated")
        geo = conv_geometry(tuple(w.shape), bound.get("stride", 1), bound.get("padding", 0),
                            bound.get("dilation", 1), bound.get("groups", 1))
        st = self.stats.setdefault(name, _ConvStats(tuple(w.shape)))
        st.ranks = tuple(self.ranks.get(name, ()))
        if st.calls and x.shape[0] != st.batch:
            raise ValueError(f"conv {name!r} ran on batches of different sizes; cannot pair its samples")
        st.calls += 1
        st.batch, st.shape = x.shape[0], st.shape or tuple(x.shape)
        ref = [x.detach()]  # dropped by the hook: autograd's own saved X is the only other holder

        def hook(dy):
            self._fold(st, ref.pop(), dy.detach(), geo)
        out.register_hook(hook)

    def _fold(self, st: _ConvStats, x, dy, geo):
        if st.calls == 1:  # one sample at a time: two |W| buffers, whatever the batch
            total = None
            for i in range(x.shape[0]):
                g = exact_weight_grad(dy[i:i + 1].float(), x[i:i + 1].float(), st.weight_shape, geo)
                st.sq_sum += float(g.pow(2).sum())
                total = g if total is None else total.add_(g)
                del g
            st.sum_sq = float(total.pow(2).sum())
            del total
        else:  # shared weights: sample n's gradient sums over calls before its norm is taken
            g = _per_sample_grads(x, dy, geo, st.weight_shape)
            st.per_sample = g if st.per_sample is None else st.per_sample.add_(g)
            del g
        for bits in QUANT_BITS if self.quant else ():
            st.quant_sq[bits] += quant_conv_noise_sq(x, dy, st.weight_shape, geo, bits)
        terms = probe_variance_terms(x, dy, st.weight_shape, geo, self.mode, self.probe, st.ranks)
        st.terms = terms if st.terms is None else st.terms + terms
        st.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if st.done == st.calls and st.per_sample is not None:  # the last call: reduce to scalars
            flat = st.per_sample.flatten(1)
            st.sq_sum = float(flat.pow(2).sum())
            st.sum_sq = float(flat.sum(0).pow(2).sum())
            st.per_sample = None


def hook_workspace_nbytes(x_shape, y_shape, weight_shape, calls: int = 1, mode: str = "spatial",
                          probe: str = "gaussian", ranks=()) -> int:
    """Upper estimate of what one calibration hook holds beside the step's own tensors: a
    sample's gradient and the running sum (fp32; a (b, *W) accumulator and its fold for a conv
    called several times), fp32 copies of one sample's X and dY, and the closed form's chunked
    temporaries (:func:`fxsketch.noise.workspace_nbytes`)."""
    from .noise import workspace_nbytes
    b, w = x_shape[0], math.prod(weight_shape)
    grads = 2 * w if calls == 1 else 2 * b * w
    sample = (math.prod(x_shape) + math.prod(y_shape)) // max(b, 1)
    # the quantized-input error (one sample at a time): X's rounding variances and their
    # temporaries (4 of X's sample), dY squared, one dW
    quant = 4 * math.prod(x_shape) // max(b, 1) + math.prod(y_shape) // max(b, 1) + w
    return 4 * (grads + max(sample, quant)) + workspace_nbytes(x_shape, y_shape, weight_shape, mode, probe, ranks)


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


_CACHE: dict[tuple, tuple[weakref.ref, dict[str, ConvNoise]]] = {}


def clear_cache() -> None:
    """Forget every cached calibration (they are also dropped when their model is freed)."""
    _CACHE.clear()


def _cache_key(model, inputs, names, batch, mode, probe, loss_fn) -> tuple:
    """(model structure, shapes, weights version): the same model with untouched weights, the
    same calibration tensors and the same settings give the same statistics. Any in-place
    update of a parameter (an optimizer step) bumps its version and misses. Buffers are left
    out: calibration's own forward updates BatchNorm statistics and restores them."""
    state = [(id(t), t._version) for t in model.parameters()] + [model.training]
    # the calibration tensors by address, version and a content fingerprint (a freed batch's
    # memory can be reused by another one at the same address)
    data = [(x.data_ptr(), x._version, tuple(x.shape), x.dtype,
             float(x.double().sum()) if x.is_floating_point() else 0.0,
             float(x.double().abs().sum()) if x.is_floating_point() else 0.0) for x in inputs]
    return (id(model), type(model).__qualname__, tuple(state), tuple(data), tuple(names), batch, mode, probe,
            id(loss_fn))


def calibrate_convs(model: nn.Module, calibration_inputs: Any, convs: Mapping[str, Any], *,
                    batch: int | None = None, loss_fn: Callable | None = None, mode: str = "spatial",
                    probe: str = "gaussian", ranks: Mapping[str, Sequence[int]] | None = None,
                    cache: bool = True, progress: bool | None = None, quant: bool = True) -> dict[str, ConvNoise]:
    """Measure, per conv, the SGD noise of dW and the closed-form probe noise, for batch ``batch``.

    ``calibration_inputs``: a small real batch (b >= 2 samples along dim 0). ``convs`` maps a name
    (fx node name or module path; only the key) to the conv ``nn.Module`` or its weight tensor.
    ``batch``: B, the training batch the figures are for (default b). ``loss_fn(output)`` gives the
    scalar loss (default :func:`fxsketch.measure.default_loss`). Results are cached per (model,
    weights version, calibration tensors, settings): sweeping budgets does not recalibrate.
    ``ranks``: name -> candidate ranks; needed for orthogonal probes only (their noise is computed
    per rank; gaussian and rademacher serve every rank). ``progress``: a bar over the conv calls folded in backward: True always, False never, None
    only when stderr is a terminal (tqdm's convention).
    ``quant``: also state the dW error of saving each conv's input in 8 and 4 bits
    (:attr:`ConvNoise.quant_sq`; the planner asks for it where quantized conv inputs are offered).

    The model is not modified: no ``.grad`` is written, buffers (BatchNorm running statistics)
    and train/eval flags are restored, torch's RNG streams are left alone.
    """
    check_rank_mode_probe(1, mode, probe)
    inputs = tuple(x.detach() for x in check_inputs(model, calibration_inputs))
    if any(x.device.type == "meta" or _is_fake(x) for x in inputs):
        raise InputError("calibration needs real tensors (it runs one real forward+backward on a small "
                         "batch); got meta or fake tensors: pass calibration_inputs= a few real samples")
    b = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if b < 2:
        raise InputError(f"a calibration batch needs at least 2 samples to show SGD noise, got {b}")
    batch = b if batch is None else int(batch)
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
    key = _cache_key(model, inputs, sorted(weights), batch, mode, probe, loss_fn) + (quant,) \
        + (tuple(sorted((k, tuple(v)) for k, v in (ranks or {}).items())) if probe == "orthogonal" else (),)
    hit = _CACHE.get(key)
    if cache and hit is not None and hit[0]() is model:
        log.debug("calibration of %d conv(s) on %d samples: cached", len(weights), b)
        return dict(hit[1])

    names = list(weights)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(desc="calibrating convs", unit="call", leave=False,
               disable=None if progress is None else not progress) if tqdm else None
    with preserved(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
        capture = _Capture(by_id, mode, probe, bar, ranks, quant)
        with capture, forward_context(inputs[0].device.type if inputs else "cpu"):
            out = model(*inputs)
            loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError("loss_fn must return a scalar tensor")
        del out
        grads = torch.autograd.grad(loss, [weights[n] for n in names], allow_unused=True)
        del loss, grads
    if bar is not None:
        bar.close()

    result: dict[str, ConvNoise] = {}
    for name in names:
        st = capture.stats.get(name)
        if st is None or st.done == 0:
            raise ValueError(f"conv {name!r} did not take part in the loss's backward (no call of it "
                             "was recorded with a gradient); is it used by the model?")
        if st.done != st.calls:
            raise ValueError(f"conv {name!r}: {st.calls - st.done} of its {st.calls} calls got no gradient")
        n = st.batch
        var = (st.sq_sum - st.sum_sq / n) / (n - 1)           # sigma^2, unbiased over samples
        pairs = batch * (batch - 1) / (n * (n - 1))
        grad_sq = batch / n * st.sq_sum + pairs * (st.sum_sq - st.sq_sum)
        result[name] = ConvNoise(sgd_noise=math.sqrt(max(batch * var, 0.0)), terms=st.terms, batch=batch,
                                 calibration_batch=n, grad_norm=math.sqrt(max(grad_sq, 0.0)),
                                 calls=st.calls, shape=st.shape,
                                 quant_sq=dict(st.quant_sq) if quant else {})
    if cache:
        _CACHE[key] = (weakref.ref(model, lambda _, k=key: _CACHE.pop(k, None)), dict(result))
    log.debug("calibrated %d conv(s) on %d samples for batch %d", len(result), b, batch)
    return result


# --------------------------------------------------------------------------------------------
# the checked reference


def probe_noise_mc(x, dy, weight_shape, geo, rank: int, mode: str, probe: str,
                   seeds: Sequence[int]) -> float:
    """sqrt(mean over seeds of ||dW_hat - dW||_F^2), dW_hat from the probed conv's own sketch and
    backward functions: the Monte-Carlo reference the closed form is tested against."""
    exact = exact_weight_grad(dy.float(), x.float(), weight_shape, geo)
    sq = []
    for s in seeds:
        xbar = sketch(x, int(s), rank, mode, probe)
        if mode == "spatial":
            est = dw_spatial(dy, xbar, int(s), rank, probe, x.shape[2:], weight_shape, geo)
        else:
            est = dw_channel(dy, xbar, int(s), rank, probe, tuple(x.shape), weight_shape, geo)
        sq.append(float(torch.linalg.vector_norm(est - exact)) ** 2)
    return math.sqrt(sum(sq) / len(sq))
