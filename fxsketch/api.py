"""The public calls: plan() predicts, measure() measures (see fxsketch.measure)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .passes.liveness import Schedule, Timeline, build_schedule, simulate
from .passes.saved import Kind, profile_step
from .passes.trace import check_inputs, trace
from .plan import Decision, MemoryPlan, NodeRow, TimelineData

__all__ = ["plan", "analyze"]

_RESIDENT = (Kind.PARAM, Kind.BUFFER, Kind.INPUT)


def _default_loss(output: Any) -> torch.Tensor:
    from .measure import default_loss
    return default_loss(output)


def analyze(model: nn.Module, example_inputs: Any, *, loss_fn: Callable | None = None,
            leaf_modules: Sequence[type] = ()) -> tuple[fx.GraphModule, Schedule]:
    """Trace ``model`` and profile one fake training step; return the annotated GraphModule and
    its unmodified :class:`~fxsketch.passes.liveness.Schedule`. Allocates no activations."""
    inputs = check_inputs(model, example_inputs)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    profile_step(gm, inputs, loss_fn or _default_loss)
    return gm, build_schedule(gm)


def _timeline_data(tl: Timeline) -> TimelineData:
    return TimelineData(tl.steps, tl.live_bytes, tl.by_category, tl.peak_bytes, tl.peak_step)


def make_plan(gm: fx.GraphModule, schedule: Schedule, baseline: Timeline, timeline: Timeline, *,
              name: str, decisions: Sequence[Decision] = (), budget: int | None = None,
              notes: Sequence[str] = ()) -> MemoryPlan:
    """Assemble the report data from an analysed graph and its simulated timelines."""
    storages = schedule.storages
    chosen = {d.node: d.option.value for d in decisions}
    rows = []
    for n in gm.graph.nodes:
        if n.op in ("output",):
            continue
        metas = n.meta.get("fxsketch.tensor", ())
        own = [m.storage for m in metas if storages[m.storage].owner == n.name]
        saved = sum(storages[s].nbytes for s in n.meta.get("fxsketch.saved", ())
                    if storages[s].kind not in _RESIDENT)
        if n.op in ("placeholder", "get_attr"):
            freed = "kept"
        elif any(s in schedule.pinned for s in own):
            freed = "end (model output)"
        elif own and own[0] in timeline.intervals:
            phase, node = timeline.steps[timeline.intervals[own[0]][1]]
            freed = f"{phase} {node}"
        else:
            freed = "view of an input"
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        rows.append(NodeRow(
            name=n.name, op=n.op, target=str(target),
            shape=metas[0].shape if metas else None,
            output_bytes=sum(storages[s].nbytes for s in own),
            saved_bytes=saved, freed=freed, option=chosen.get(n.name, "keep")))
    alive = tuple((storages[s].owner, _cat(storages[s], s, timeline), storages[s].nbytes)
                  for s in timeline.alive_at_peak)
    params = sum(i.nbytes for i in storages.values() if i.kind in (Kind.PARAM, Kind.BUFFER))
    inputs = sum(i.nbytes for i in storages.values() if i.kind is Kind.INPUT)
    return MemoryPlan(model=name, parameter_bytes=params, input_bytes=inputs,
                      baseline=_timeline_data(baseline), timeline=_timeline_data(timeline),
                      rows=tuple(rows), alive_at_peak=alive, decisions=tuple(decisions),
                      budget_bytes=budget, notes=tuple(notes))


def _cat(info, sid: int, tl: Timeline) -> str:
    if info.kind in (Kind.PARAM, Kind.BUFFER):
        return "parameter"
    if info.kind is Kind.INPUT:
        return "input"
    if info.kind is Kind.PARAM_GRAD:
        return "gradient"
    if info.kind is Kind.GRAD:
        return "activation gradient"
    return "saved" if tl.intervals[sid][1] > tl.peak_step or tl.steps[tl.peak_step][0] == "backward" else "activation"


def plan(model: nn.Module, example_inputs: Any, *, loss_fn: Callable | None = None,
         leaf_modules: Sequence[type] = ()) -> MemoryPlan:
    """Predict the memory of one training step of ``model`` (forward, loss, backward).

    ``example_inputs`` is a tuple of tensors, as in ``torch.export``; meta tensors are accepted
    (shapes only). ``loss_fn(output)`` gives the scalar to backpropagate (default: the sum of all
    floating-point outputs). Nothing is allocated for activations: the step runs on fake tensors.

    >>> p = plan(torchvision.models.resnet18(), (torch.randn(8, 3, 224, 224),))  # doctest: +SKIP
    >>> print(p.summary())                                                       # doctest: +SKIP
    fxsketch memory plan for ResNet
      parameters           44.63 MiB
      inputs                4.59 MiB
      predicted peak      ...
    """
    gm, schedule = analyze(model, example_inputs, loss_fn=loss_fn, leaf_modules=leaf_modules)
    tl = simulate(schedule)
    return make_plan(gm, schedule, tl, tl, name=type(model).__name__)
