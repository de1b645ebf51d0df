"""What planning measures on real data, within memory: probe/SGD noise and node times on a sub-batch.

The user's training step may not fit, so planning never runs it at full size. It runs one exact
forward + backward of the model on the first b samples of the batch (or on the
``calibration_inputs`` given with meta inputs), with b the largest of 8, 4, 2 (at most half the
batch, :attr:`fxsketch.Config.calibration_batch` at most) whose predicted peak stays under the
limit: the budget, or, without one, the lowest peak the planner could reach (a solve with every
option allowed, before any noise bound; :class:`Reachable`, which solves only when a sub-batch's
peak lies above the solver's LP bound). The prediction is the liveness model of the unmodified
step at batch b (:func:`fxsketch.pipeline.analyse` on meta copies of the sub-batch) plus the
calibration hooks' own temporaries (:func:`fxsketch.calibrate.hook_workspace_nbytes`).

Where the planned graph is relaid out (channels_last), two whole training steps of synthetic
inputs, one per layout, are timed on the largest of 8, 4, 2, 1 samples whose predicted peak stays
under the lowest peak a plan could reach at any overhead (the options' share of ``max_overhead``
depends on that measurement, so it cannot bound it); calibration's limit is then the lowest peak
within the options' share.

The loss is evaluated on the sub-batch's outputs padded back to the full batch with zeros that
carry no gradient, so a ``loss_fn`` closing over the batch's targets pairs sample n with target n,
and a loss that is a sum or mean over samples gets the right per-sample gradients (up to a global
scale, which cancels in every noise ratio).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any, Callable

import torch

from .calibrate import calibrate_convs, hook_workspace_nbytes
from .measurement import default_loss
from .passes.timing import LOADED, StepTimes, layout_ratio, time_step
from .passes.options.probe import conv_ranks, probe_targets
from .passes.options.quant import noise_params, norm_targets
from .quant_noise import calibrate_norms, norm_hook_nbytes
from .units import format_bytes

__all__ = ["Reachable", "calibrate_for_plan", "sub_batch"]

log = logging.getLogger("fxsketch.calibrate")  # one logger for calibration (this module and calibrate.py)


class Reachable:
    """The lowest peak a plan can reach within ``max_overhead``, as a calibration limit, found only
    where it decides: no plan goes below the solver's LP bound, so a sub-batch predicted under the
    bound fits under whatever is planned without the MILP (on DenseNet-201 at 64x224^2 that MILP was
    10 of the plan's 16 solver seconds; its LP bound is one LP)."""

    def __init__(self, solver, max_overhead: float):
        self.solver, self.max_overhead = solver, max_overhead

    @functools.cached_property
    def bound(self) -> float:
        bound = self.solver.peak_bound(self.max_overhead)
        return 0.0 if bound is None else bound

    @functools.cached_property
    def peak_bytes(self) -> int:
        return self.solver.solve(None, max_overhead=self.max_overhead).peak_bytes

    def admits(self, nbytes: int) -> bool:
        return nbytes <= self.bound or nbytes <= self.peak_bytes


def _admits(limit: int | Reachable | None, nbytes: int) -> bool:
    return limit is None or (limit.admits(nbytes) if isinstance(limit, Reachable) else nbytes <= limit)


def _bytes(limit: int | Reachable) -> int:
    return limit.peak_bytes if isinstance(limit, Reachable) else limit


def sub_batch(inputs: tuple[torch.Tensor, ...], batch: int, b: int) -> tuple[torch.Tensor, ...]:
    """The first ``b`` samples of every input whose first dimension is the batch."""
    return tuple(x[:b] if x.dim() and x.shape[0] == batch else x for x in inputs)


def _pad(out: Any, b: int, batch: int) -> Any:
    """``out`` with every tensor of ``b`` rows padded to ``batch`` rows by zeros (no gradient)."""
    if isinstance(out, torch.Tensor):
        if out.dim() and out.shape[0] == b and batch > b:
            return torch.cat([out, out.new_zeros((batch - b, *out.shape[1:])).detach()])
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_pad(o, b, batch) for o in out)
    if isinstance(out, dict):
        return {k: _pad(v, b, batch) for k, v in out.items()}
    return out


def _padded_loss(loss_fn: Callable, b: int, batch: int) -> Callable:
    return lambda out: loss_fn(_pad(out, b, batch))


def _predicted_peak(model, inputs, batch: int, b: int, loss, pad_to: int, targets, config, ranks, norms=()) -> int:
    from .pipeline import analyse  # the pipeline imports this module
    meta = tuple(torch.empty_like(x, device="meta") for x in sub_batch(inputs, batch, b))
    a = analyse(model, meta, loss_fn=_padded_loss(loss, b, pad_to))
    shapes = {n.name: n for n in a.gm.graph.nodes}
    calls: dict[int, int] = {}
    for w, _ in targets.values():
        calls[id(w)] = calls.get(id(w), 0) + 1
    hooks = 0
    for name, (w, _) in targets.items():
        node = shapes.get(name)
        if node is None or not node.all_input_nodes:
            continue
        x = node.all_input_nodes[0].meta["fxsketch.tensor"][0].shape
        y = node.meta["fxsketch.tensor"][0].shape
        hooks = max(hooks, hook_workspace_nbytes(x, y, tuple(w.shape), calls[id(w)], config.mode,
                                                 config.probe, ranks.get(name, ())))
    for name in norms:  # the quantized norms' calibration hooks (fxsketch.quant_noise)
        node = shapes.get(name)
        if node is not None and node.all_input_nodes:
            hooks = max(hooks, norm_hook_nbytes(node.all_input_nodes[0].meta["fxsketch.tensor"][0].shape))
    return a.timeline.peak_bytes + hooks


def calibrate_for_plan(model, analysis, config, limits: Callable[[float | None], int | Reachable | None],
                       notes: list[str], *, calibration_inputs=None, calibration_loss_fn: Callable | None = None):
    """(noise by conv node or None, :class:`~fxsketch.passes.timing.StepTimes` or None).
    ``limits(cap)``: the memory what planning runs must stay under, for plans whose options cost at
    most ``cap`` (None: any): the budget, a :class:`Reachable`, or None (no check)."""
    batch = analysis.inputs[0].shape[0] if analysis.inputs and analysis.inputs[0].dim() else 1
    real = calibration_inputs is not None or not analysis.meta_inputs
    if calibration_inputs is not None:
        source = tuple(calibration_inputs) if isinstance(calibration_inputs, (tuple, list)) else (calibration_inputs,)
        have = source[0].shape[0] if source and source[0].dim() else 0
        # the training loss_fn fits the training batch: outputs are padded to it; a
        # calibration_loss_fn fits the calibration inputs
        loss, pad_to = (calibration_loss_fn, have) if calibration_loss_fn else (analysis.loss_fn, batch)
        full = have
    else:  # meta inputs give shapes only: node times are taken on synthetic inputs anyway
        source, have, full = analysis.inputs, batch // 2, batch
        loss, pad_to = calibration_loss_fn or analysis.loss_fn, batch
    wanted = ("probe" in config.methods and config.probe_rank is None or "quant" in config.methods) \
        and config.calibrate and real
    targets = probe_targets(analysis.gm) if wanted else {}
    if not real and "probe" in config.methods and config.probe_rank is None and config.calibrate:
        notes.append("uncalibrated (meta inputs, no calibration_inputs): probe noise from the stated prior "
                     "(fxsketch.calibrate.PriorNoise); pass calibration_inputs= a few real samples to measure it")
    times = _step_times(model, analysis, config, batch, limits(None), notes)
    limit = limits(config.options_cap(times.layout if times is not None else 0.0))
    norms = norm_targets(analysis.gm) if "quant" in config.methods and config.calibrate and real else {}
    if not targets and not norms:
        return None, times
    tries = [b for b in (8, 4, 2) if b <= min(config.calibration_batch, have)]
    if not tries:
        why = f"a batch of {batch}" if calibration_inputs is None else f"calibration_inputs of {have} sample(s)"
        if targets or norms:
            notes.append(f"uncalibrated ({why} gives no sub-batch of at least 2 samples below the full step): "
                         f"probe noise from the stated prior")
        return None, times
    ranks = {name: [config.probe_rank] if config.probe_rank else conv_ranks(shape, config.ratios, config.mode)
             for name, (_, shape) in targets.items()}
    chosen, predicted = None, 0
    for b in tries:
        predicted = _predicted_peak(model, source, full, b, loss or default_loss, pad_to, targets, config, ranks,
                                    norms)
        log.debug("calibration batch %d: predicted peak %s", b, format_bytes(predicted))
        if _admits(limit, predicted):
            chosen = b
            break
    if chosen is None:
        notes.append(f"uncalibrated: even a 2-sample calibration batch is predicted at "
                     f"{format_bytes(predicted)}, above the {format_bytes(_bytes(limit))} the plan may use; probe "
                     f"noise from the stated prior")
        return None, times
    noise = None
    if targets:
        sub = tuple(x.detach() for x in sub_batch(source, full, chosen))
        first: dict[int, str] = {}  # a conv module called twice is two nodes with one weight
        for name, (w, _) in targets.items():
            first.setdefault(id(w), name)
        by_weight = calibrate_convs(model, sub, {name: targets[name][0] for name in first.values()},
                                    batch=batch, loss_fn=_padded_loss(loss or default_loss, chosen, pad_to),
                                    mode=config.mode, probe=config.probe, progress=config.progress,
                                    ranks={name: ranks[name] for name in first.values()},
                                    quant="quant" in config.methods and config.quant_inputs == "all")
        noise = {name: by_weight[first[id(w)]] for name, (w, _) in targets.items()}
        notes.append(f"probe noise calibrated on {chosen} of {batch} samples (predicted peak of calibration "
                     f"{format_bytes(predicted)}) and stated for batch {batch} by the 1/B law")
    if norms:
        sub = tuple(x.detach() for x in sub_batch(source, full, chosen))
        found = calibrate_norms(analysis.gm, sub, {name: noise_params(spec) for name, spec in norms.items()},
                                batch=batch, loss_fn=_padded_loss(loss or default_loss, chosen, pad_to), model=model)
        noise = (noise or {}) | found
        notes.append(f"quantized-norm noise of {len(found)} norm(s) calibrated on {chosen} of {batch} samples")
    return noise, times


TIMING_SAMPLES = 4


def _step_times(model, analysis, config, batch: int, limit, notes: list[str]) -> StepTimes | None:
    """Node times on at most ``calibration_batch`` synthetic samples: one node's forward and
    backward at a time beside a no-grad forward (what every plan's own step holds at that node),
    not the step; up to :data:`TIMING_SAMPLES` samples (1-sample node times misjudged a 2-sample
    3D UNet step by 1.5x; more than 4 costs planning time for little). Where the graph is relaid
    out, also the layout's change as whole steps of both graphs on a sub-batch within ``limit``
    (:func:`_with_layout`)."""
    if not config.time_nodes:
        return None
    if any(p.device.type == "meta" for p in analysis.gm.parameters()):
        notes.append("node times not measured (parameters on the meta device): roofline estimate")
        return None
    chosen = max(1, min(config.calibration_batch, batch, TIMING_SAMPLES))
    shapes = [((chosen, *x.shape[1:]) if x.dim() and x.shape[0] == batch else tuple(x.shape), x.dtype)
              for x in analysis.inputs]
    try:
        times = time_step(analysis.gm, shapes, batch, chosen)
    except Exception as e:  # a graph specialised to its batch: the roofline stands
        notes.append(f"node times not measured ({type(e).__name__} at batch {chosen}): roofline estimate")
        return None
    notes.append(f"extra time from node times (forward and backward, each node alone) measured on "
                 f"{chosen} synthetic samples, scaled to {batch}; cached per machine")
    if analysis.given_gm is not None and config.overhead_against == "given":
        times = _with_layout(times, model, analysis, config, batch, limit, notes)
    if times.slowdown > LOADED:
        notes.append(f"node times taken while this machine ran {times.slowdown:.1f}x slower than its measured "
                     "speed (another process on its cores?): the extra-time figures may be off; they were not "
                     "cached, so planning again on a quiet machine times them again")
    return times


LAYOUT_SAMPLES = (8, 4, 2, 1)
"""Sub-batches the layout's step time may be measured on (at most ``calibration_batch`` and half
the batch): the largest whose predicted peak the plan's memory admits. The layout's gain grows with
the batch (ResNet-50: +10.9 % at 1 sample, -6.6 % at 4, -19.1 % at 16; tools/bench_layout.py
--ratio), so a sub-batch's gain is the lower estimate."""


def _with_layout(times: StepTimes, model, analysis, config, batch: int, limit, notes: list[str]) -> StepTimes:
    """``times`` with the layout's share: the relaid-out step against the step as given, timed as
    whole steps on a synthetic sub-batch whose predicted peak (the step as given at that sub-batch,
    plus what relaying out adds at full batch: weight-gradient copies that do not shrink with the
    batch) the plan's memory admits. The overhead is against the step as given, as the reduction is
    (docs/layout.md, "Step time")."""
    from .pipeline import analyse  # the pipeline imports this module
    tries = [b for b in LAYOUT_SAMPLES if b <= min(config.calibration_batch, batch // 2)]
    if not tries:
        notes.append(f"layout: a batch of {batch} has no sub-batch to time it on: the overhead is against the "
                     f"relaid-out step")
        return times
    added = max(analysis.timeline.peak_bytes - analysis.baseline.peak_bytes, 0)
    for b in tries:
        meta = tuple(torch.empty_like(x, device="meta") for x in sub_batch(analysis.inputs, batch, b))
        try:
            predicted = analyse(model, meta).timeline.peak_bytes + added
        except Exception as e:  # a model that traces only at its batch (or only with leaf_modules)
            notes.append(f"layout: its step time not measured ({type(e).__name__} analysing {b} samples): the "
                         f"overhead is against the relaid-out step")
            return times
        if not _admits(limit, predicted):
            continue
        shapes = [(tuple(x.shape), x.dtype) for x in meta]
        try:
            ratio, load = layout_ratio(analysis.given_gm, analysis.gm, shapes, default_loss)
        except Exception as e:  # a graph specialised to its batch
            notes.append(f"layout: its step time not measured ({type(e).__name__} at {b} samples): the overhead "
                         f"is against the relaid-out step")
            return times
        notes.append(f"layout: the relaid-out step measured {100 * (ratio - 1):+.1f} % against the step as given "
                     f"(whole steps on {b} synthetic samples, predicted peak {format_bytes(predicted)}); the "
                     f"overhead is against the step as given")
        if load > LOADED:
            notes.append(f"layout: its steps were timed while this machine ran {load:.1f}x slower than its measured "
                         f"speed: not cached, planning again on a quiet machine times them again")
        if ratio - 1 >= config.max_overhead:
            notes.append(f"layout: the relaid-out step alone is {100 * (ratio - 1):+.1f} % against the step as given, "
                         f"at or above max_overhead={config.max_overhead:g}: no option gets extra time "
                         f"(memory_format='preserve' keeps the layout)")
        return replace(times, layout=ratio - 1)
    notes.append("layout: no sub-batch of the step fits the plan's memory to time it: the overhead is against "
                 "the relaid-out step")
    return times
