"""The public calls: plan() predicts, measure() measures (see fxsketch.measure)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .passes.liveness import Schedule, Timeline, build_schedule, simulate
from .passes.saved import Kind, profile_step
from .passes.trace import check_inputs, trace
from .config import Config, resolve_budget
from .passes.candidates import Device, build_problem, conv_ranks, probe_targets, time_nodes
from .passes.rewrite import rewrite
from .passes.solve import BudgetError, evaluate, solve
from .plan import Decision, MemoryPlan, NodeRow, Option, TimelineData
from .units import format_bytes

__all__ = ["plan", "optimize", "analyze"]

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
        else:  # a view or an in-place result: the storage belongs to the node that made it
            owner = storages[metas[0].storage].owner if metas else ""
            freed = f"shares {owner}'s storage" if owner else "-"
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


def _fork_rng():
    return torch.random.fork_rng(devices=[])  # planning leaves the caller's RNG stream alone


def _optimize(model, example_inputs, config: Config, loss_fn, leaf_modules):
    """Analyse, choose, rewrite, then re-analyse the rewritten graph for the report."""
    with _fork_rng():
        gm, schedule = analyze(model, example_inputs, loss_fn=loss_fn, leaf_modules=leaf_modules)
        baseline = simulate(schedule)
        budget = resolve_budget(config.budget, baseline.peak_bytes)
        inputs = check_inputs(model, example_inputs)
        device = Device.for_tensor(next(iter(gm.parameters()), inputs[0]))
        notes = []
        noise = _calibrate(model, gm, inputs, loss_fn, config, notes)
        timings = None
        if config.time_nodes and not any(x.device.type == "meta" for x in inputs):
            timings = time_nodes(gm, inputs)
            notes.append("extra time estimated from measured node times on the example batch "
                         "(backward = 2 x forward; probes: roofline)")
        problem, cands, _ = build_problem(
            gm, schedule, baseline, methods=config.methods, ratios=config.ratios,
            probe_rank=config.probe_rank, mode=config.mode, probe=config.probe, device=device,
            noise=noise, max_grad_noise=config.max_grad_noise, timings=timings)
        def build(sol):  # rewrite the chosen plan and predict it on the rewritten graph
            new = rewrite(model, gm, [cands[i] for i in sol.chosen], seed=config.seed)
            new_schedule = _analyze_graph(new, inputs, loss_fn, leaf_modules)
            return sol, new, new_schedule, simulate(new_schedule)

        result = None
        target = budget
        for _ in range(3):
            try:
                result = build(solve(problem, target, max_overhead=config.max_overhead,
                                     time_limit=config.solver_time_limit))
            except BudgetError:
                break
            peak = result[3].peak_bytes
            if budget is None or peak <= budget or not result[0].chosen:
                break
            # the rewritten graph came out above the solver's estimate: tighten and solve again
            notes.append(f"re-planned: the rewritten graph predicted {format_bytes(peak)} > budget; "
                         f"solver target lowered")
            target = max(1, target - (peak - budget))
            result = None
        if result is None:
            # the lowest-peak plan decides: met, or its predicted peak is the reachable floor
            lowest = build(solve(problem, None, max_overhead=float("inf"),
                                 time_limit=config.solver_time_limit))
            if lowest[3].peak_bytes > budget:
                raise BudgetError(
                    f"budget {format_bytes(budget)} cannot be met for {type(model).__name__}: the lowest "
                    f"reachable predicted peak with methods {config.methods} is "
                    f"{format_bytes(lowest[3].peak_bytes)} (unmodified: {format_bytes(baseline.peak_bytes)}). "
                    f"Raise the budget, or allow more methods.", lowest[3].peak_bytes)
            notes.append("the lowest-peak plan was used (the budget is close to the reachable floor)")
            result = lowest
        sol, new, new_schedule, tl = result
        if budget is not None and tl.peak_bytes > budget * 1.001:
            notes.append(f"predicted peak exceeds the budget by {100 * (tl.peak_bytes / budget - 1):.1f} %")
        decisions = _decisions(problem, cands, sol)
        new.memory_plan = make_plan(new, new_schedule, baseline, tl, name=type(model).__name__,
                                    decisions=decisions, budget=budget, notes=notes)
        return new


def _calibrate(model, gm, inputs, loss_fn, config: Config, notes: list[str]):
    """Per probe-able conv, its SGD and probe noise on the example batch (None if not calibrated)."""
    if "probe" not in config.methods or config.probe_rank is not None or not config.calibrate:
        return None
    if any(x.device.type == "meta" for x in inputs):
        notes.append("probe noise not calibrated (meta inputs): noise column is a heuristic")
        return None
    if inputs[0].dim() == 0 or inputs[0].shape[0] < 2:
        notes.append("probe noise not calibrated (a batch of one has no SGD noise to compare with): "
                     "noise column is a heuristic")
        return None
    targets = probe_targets(gm)
    if not targets:
        return None
    from .calibrate import calibrate_convs
    convs = {name: w for name, (w, _) in targets.items()}
    ranks = {name: conv_ranks(shape, config.ratios, config.mode) for name, (_, shape) in targets.items()}
    noise = calibrate_convs(model, inputs, convs, ranks, loss_fn=loss_fn, mode=config.mode,
                            probe=config.probe, progress=config.progress)
    notes.append(f"probe ranks calibrated on the example batch: probe noise <= {config.max_grad_noise:g}x "
                 f"SGD noise of each layer's dW")
    return noise


def _analyze_graph(gm, inputs, loss_fn, leaf_modules):
    profile_step(gm, inputs, loss_fn or _default_loss)
    return build_schedule(gm)


def _decisions(problem, cands, sol) -> list[Decision]:
    """One Decision per choice; freed_bytes = how much the peak rises if that choice alone is undone."""
    out = []
    for i in sol.chosen:
        without = max(evaluate(problem, [c for c in sol.chosen if c != i]))
        ch, cand = problem.choices[i], cands[i]
        out.append(Decision(node=cand.nodes[0] if len(cand.nodes) == 1 else f"{cand.nodes[0]}..{cand.nodes[-1]}",
                            option=Option(cand.kind), detail=cand.detail,
                            freed_bytes=max(0, without - sol.peak_bytes), extra_time=ch.cost,
                            grad_noise=ch.noise))
    return out


def optimize(model: nn.Module, example_inputs: Any, budget=None, *, loss_fn: Callable | None = None,
             methods=("probe", "lean", "recompute"), max_overhead: float = 0.2,
             probe_rank: int | None = None, seed: int | None = None,
             leaf_modules: Sequence[type] = (), **options) -> fx.GraphModule:
    """Rewrite ``model`` to train within ``budget`` bytes; return the new GraphModule.

    The result is a drop-in for ``model``: same outputs, same parameter names and ``state_dict``
    keys, and the *same* parameter and buffer objects (training either trains both). The model
    itself is not modified. ``gm.memory_plan`` holds the report. ``budget``: bytes (int, or
    "3.5GiB"), a fraction in (0, 1] of the unmodified peak, or None for the lowest peak within
    ``max_overhead`` estimated extra step time. Other options: see :class:`fxsketch.Config`.

    >>> gm = fxsketch.optimize(torchvision.models.resnet18(), (x,), budget=0.3)  # doctest: +SKIP
    >>> print(gm.memory_plan.summary())                                          # doctest: +SKIP
    """
    config = Config(budget=budget, methods=methods, max_overhead=max_overhead, probe_rank=probe_rank,
                    seed=seed, **options)
    return _optimize(model, example_inputs, config, loss_fn, leaf_modules)


def plan(model: nn.Module, example_inputs: Any, budget=None, *, loss_fn: Callable | None = None,
         methods=None, max_overhead: float = 0.2, probe_rank: int | None = None,
         seed: int | None = None, leaf_modules: Sequence[type] = (), **options) -> MemoryPlan:
    """Predict the memory of one training step of ``model`` (forward, loss, backward).

    ``example_inputs`` is a tuple of tensors, as in ``torch.export``; meta tensors are accepted
    (shapes only). ``loss_fn(output)`` gives the scalar to backpropagate (default: the sum of all
    floating-point outputs). Nothing is allocated for activations: the step runs on fake tensors.

    With no planning arguments the plan is of the unmodified model. With any of them (``budget``,
    ``methods``, ``max_overhead``, ``probe_rank``, ``seed`` or a :class:`~fxsketch.Config` field) it
    is the plan :func:`optimize` would carry out, without returning the module.

    >>> p = plan(torchvision.models.resnet18(), (torch.randn(8, 3, 224, 224),))  # doctest: +SKIP
    >>> print(p.summary())                                                       # doctest: +SKIP
    fxsketch memory plan for ResNet
      parameters           44.63 MiB
      inputs                4.59 MiB
      predicted peak      ...
    """
    planning = (budget is not None or methods is not None or max_overhead != 0.2 or probe_rank is not None
                or seed is not None or bool(options))
    if planning:
        methods = ("probe", "lean", "recompute") if methods is None else methods
        return optimize(model, example_inputs, budget, loss_fn=loss_fn, methods=methods,
                        max_overhead=max_overhead, probe_rank=probe_rank, seed=seed,
                        leaf_modules=leaf_modules, **options).memory_plan
    with _fork_rng():
        gm, schedule = analyze(model, example_inputs, loss_fn=loss_fn, leaf_modules=leaf_modules)
    tl = simulate(schedule)
    return make_plan(gm, schedule, tl, tl, name=type(model).__name__)
