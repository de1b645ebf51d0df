"""The public calls: ``optimize`` rewrites a model to fit a budget, ``plan`` predicts its memory.

Both are thin: the work is the pipeline of :mod:`fxsketch.pipeline`
(analyse -> propose -> fit -> report); ``fxsketch.measure`` measures (see :mod:`fxsketch.measurement`).
Neither prints: each logs its plan to the logger "fxsketch.api" (INFO: a one-line summary and
the plan's notes; DEBUG: every decision), which shows nothing unless logging is configured::

    >>> logging.basicConfig(level=logging.INFO)                   # doctest: +SKIP
    >>> gm = fxsketch.optimize(model, (x,))                       # doctest: +SKIP
    INFO:fxsketch.api:optimize Sequential: predicted peak 2.11 MiB at backward _4 (unmodified
    2.62 MiB, 1.24x lower); 3 decisions, extra step time 1.9 % (roofline)      (one line)
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch.fx as fx
from torch import nn

from . import dfa, pipeline
from .config import Config
from .errors import ConfigError
from .report import MemoryPlan
from .units import format_bytes

try:
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY as _PRESERVED
except ImportError:  # pragma: no cover - older torch
    _PRESERVED = "_user_preserved_attributes"

__all__ = ["optimize", "plan"]

log = logging.getLogger(__name__)


def _log_plan(call: str, p: MemoryPlan) -> None:
    """One INFO line for the plan, one per note; one DEBUG line per decision."""
    if not log.isEnabledFor(logging.INFO):
        return
    line = f"{call} {p.model}: predicted peak {format_bytes(p.peak_bytes)} at {p.peak_node}"
    if p.decisions or call == "optimize":
        ratio = p.baseline_peak_bytes / max(p.peak_bytes, 1)
        line += (f" (unmodified {format_bytes(p.baseline_peak_bytes)}, {ratio:.2f}x lower); {len(p.decisions)} "
                 f"decisions, extra step time {100 * p.extra_time:.1f} % ({p.cost_estimator or 'roofline'})")
        if p.layout_time:
            line += f", {100 * p.overhead:+.1f} % against the step as given (layout {100 * p.layout_time:+.1f} %)"
    log.info("%s", line)
    for note in p.notes:
        log.info("note: %s", note)
    for d in p.decisions:
        log.debug("decision: %s -> %s%s: frees %s at the peak, extra step time %.1f %%, grad noise %.2f",
                  d.node, d.option.value, f" ({d.detail})" if d.detail else "", format_bytes(d.freed_bytes),
                  100 * d.extra_time, d.grad_noise)


def _optimize(model, example_inputs, config: Config, loss_fn, leaf_modules, calibration) -> fx.GraphModule:
    with config.planning_context():
        gm = _optimize_here(model, example_inputs, config, loss_fn, leaf_modules, calibration)
    _log_plan("optimize", gm.memory_plan)
    return gm


def _optimize_here(model, example_inputs, config: Config, loss_fn, leaf_modules, calibration) -> fx.GraphModule:
    analysis = pipeline.analyse(model, example_inputs, loss_fn=loss_fn, leaf_modules=leaf_modules)
    if dfa.selected(config):  # replaces backprop over the whole graph: no solver (fxsketch/dfa.py)
        return dfa.optimize_dfa(model, analysis, config)
    analysis = pipeline.relayout(analysis, config)
    proposal = pipeline.propose(model, analysis, config, **calibration)
    fitted = pipeline.fit(model, analysis, proposal, config)
    gm = fitted.verified.gm
    gm.memory_plan = pipeline.report(analysis, proposal, fitted, config)
    # GraphModule.__deepcopy__ keeps only attributes listed here (pickle keeps them all)
    gm.meta.setdefault(_PRESERVED, {})["memory_plan"] = gm.memory_plan
    return gm


def optimize(model: nn.Module, example_inputs: Any, budget=None, *, config: Config | None = None,
             loss_fn: Callable | None = None, leaf_modules: Sequence[type] = (),
             calibration_inputs: Any = None, calibration_loss_fn: Callable | None = None,
             **options) -> fx.GraphModule:
    """Rewrite ``model`` to train within ``budget`` bytes; return the new GraphModule.

    The result is a drop-in for ``model``: same outputs, same parameter names and ``state_dict``
    keys, and the *same* parameter and buffer objects (training either trains both). The model
    itself is not modified. ``gm.memory_plan`` holds the report.

    ``budget``: bytes (an int of at least 1 KiB, or a string such as "3.5GiB"), a float fraction
    in (0, 1] of the unmodified peak, or None for the lowest peak within ``max_overhead``
    estimated extra step time. ``config``: a :class:`fxsketch.Config`; ``options``: any of its
    fields, replacing the config's (e.g. ``methods=("probe",)``, ``max_grad_noise=4``).
    ``loss_fn(output)`` is the scalar backpropagated (default: the sum of all floating outputs);
    ``leaf_modules``: module types to keep whole (opaque) when tracing.

    Probe noise is measured on a real sub-batch of ``example_inputs`` that fits the plan's memory
    (never the full step); with meta inputs pass ``calibration_inputs`` (a few real samples) and,
    if ``loss_fn`` does not fit them, ``calibration_loss_fn``; without them the plan says it is
    uncalibrated and judges probes by a stated prior.

    >>> gm = fxsketch.optimize(torchvision.models.resnet18(), (x,), budget=0.3)  # doctest: +SKIP
    >>> print(gm.memory_plan.summary())                                          # doctest: +SKIP
    """
    if budget is not None:
        options["budget"] = budget
    return _optimize(model, example_inputs, Config.from_options(config, **options), loss_fn, leaf_modules,
                     dict(calibration_inputs=calibration_inputs, calibration_loss_fn=calibration_loss_fn))


def plan(model: nn.Module, example_inputs: Any, budget=None, *, optimized: bool = False,
         config: Config | None = None, loss_fn: Callable | None = None,
         leaf_modules: Sequence[type] = (), calibration_inputs: Any = None,
         calibration_loss_fn: Callable | None = None, **options) -> MemoryPlan:
    """Predict the memory of one training step of ``model`` (forward, loss, backward).

    ``example_inputs`` is a tuple of tensors, as in ``torch.export``; meta tensors are accepted
    (shapes only). Nothing is allocated for activations: the step runs on fake tensors.

    By default the plan is of the unmodified model. With ``optimized=True`` it is the plan
    :func:`optimize` would carry out with the same ``budget``, ``config`` and ``options``
    (without returning the module); planning arguments without it are refused, so a plan is
    never silently of another step than the one asked for.

    >>> p = plan(torchvision.models.resnet18(), (torch.randn(8, 3, 224, 224),))  # doctest: +SKIP
    >>> print(p.summary())                                                       # doctest: +SKIP
    fxsketch memory plan for ResNet
      parameters           44.63 MiB
      inputs                4.59 MiB
      predicted peak      ...
    """
    if optimized:
        return optimize(model, example_inputs, budget, config=config, loss_fn=loss_fn,
                        leaf_modules=leaf_modules, calibration_inputs=calibration_inputs,
                        calibration_loss_fn=calibration_loss_fn, **options).memory_plan
    step = Config(autocast=options.pop("autocast", None))  # what the step is, not how to plan it
    given = sorted(options) + (["budget"] if budget is not None else []) + (["config"] if config else []) \
        + (["calibration_inputs"] if calibration_inputs is not None else [])
    if given:
        raise ConfigError(f"plan() got planning argument(s) {', '.join(given)} without optimized=True: "
                          f"pass optimized=True for the plan optimize() would carry out, or leave "
                          f"them out for the plan of the unmodified model")
    with step.planning_context():
        analysis = pipeline.analyse(model, example_inputs, loss_fn=loss_fn, leaf_modules=leaf_modules)
    p = pipeline.make_plan(analysis, analysis.gm, analysis.schedule, analysis.timeline)
    _log_plan("plan", p)
    return p
