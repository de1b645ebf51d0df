"""The planning pipeline, one way: analyse -> propose -> solve -> rewrite -> verify; ``fit`` owns the loop.

    analysis = analyse(model, inputs)                 # trace, profile one fake step, simulate it
    proposal = propose(model, analysis, config)       # calibrate, time, every option's choices
    fitted   = fit(model, analysis, proposal, config) # solve, rewrite, verify (re-analyse), tighten
    plan     = report(analysis, proposal, fitted)     # every figure from the verified graph

Each stage is a function from dataclasses to a dataclass. Only ``fit`` loops: when the rewritten
graph's own analysis comes out above the budget it solves again, on the same solver (the MILP is
built once), within one total time budget; an infeasible budget reuses the lowest-peak plan the
solver already found.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ._calibration import Reachable, calibrate_for_plan
from .config import Config, resolve_budget
from .errors import BudgetError
from .measurement import default_loss
from .passes import options as registry
from .passes.candidates import Candidates, build_problem
from .passes.cost import Device
from .passes.liveness import Schedule, Timeline, build_schedule, simulate
from .passes.options import Candidate
from .passes.options.offload import host_timeline
from .passes.rewrite import rewrite
from .passes.saved import RESIDENT, Kind, profile_step
from .passes.solve import Infeasible, Solution, Solver
from .passes.sweep import live_bytes
from .passes import layout, workspace
from .passes.trace import check_inputs, trace
from .report import Decision, MemoryPlan, NodeRow, Option, StorageSpan, TimelineData
from .units import format_bytes

__all__ = ["Analysis", "Proposal", "Verified", "Fit", "analyse", "propose", "apply", "verify", "fit",
           "report"]

log = logging.getLogger(__name__)  # the stages at DEBUG; api.py logs the finished plan


@dataclass(frozen=True)
class Analysis:
    """The unmodified step: the traced graph (annotated by the profiler), its schedule and timeline."""

    model_name: str
    gm: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[Any], torch.Tensor]
    schedule: Schedule
    timeline: Timeline
    notes: tuple[str, ...] = ()  # how the model was captured, where not by torch.fx (passes.export)
    unmodified: tuple[Schedule, Timeline] | None = None  # the step as given, where gm is relaid out
    given_gm: fx.GraphModule | None = None  # the graph as given, where gm is relaid out (timed against
    #   gm on a sub-batch: the overhead is against the step as given, as the reduction is)

    @property
    def baseline(self) -> Timeline:
        """The unmodified step's timeline: the step as the user gave it (before a layout pass)."""
        return self.unmodified[1] if self.unmodified is not None else self.timeline

    @property
    def baseline_schedule(self) -> Schedule:
        return self.unmodified[0] if self.unmodified is not None else self.schedule

    @property
    def meta_inputs(self) -> bool:
        return any(x.device.type == "meta" for x in self.inputs)


@dataclass(frozen=True)
class Proposal:
    """Every enabled option's choices on the unmodified step, and what the planner noted doing so."""

    candidates: Candidates       # the choices within max_grad_noise: what the solver sees
    notes: tuple[str, ...] = ()
    refused_probes: int = 0      # convs with no probe choice within max_grad_noise
    every: Candidates | None = None  # every choice, noise unbounded (for what a looser bound reaches)
    calibration_batch: int = 0   # samples the probe noise was measured on (0: uncalibrated)
    layout_time: float = 0.0     # the relaid-out step's time against the step as given, minus 1 (whole
    #   steps on a sub-batch, fxsketch._calibration._with_layout; 0 where not measured)


@dataclass(frozen=True)
class Verified:
    """A solution carried out: the rewritten module and its own analysis (the figures reported)."""

    solution: Solution
    chosen: tuple[Candidate, ...]
    gm: fx.GraphModule
    schedule: Schedule
    timeline: Timeline


@dataclass(frozen=True)
class Fit:
    """The plan ``fit`` settled on, the budget it was fitted to (bytes) and its notes."""

    verified: Verified
    budget: int | None
    notes: tuple[str, ...] = ()


def _fork_rng():
    return torch.random.fork_rng(devices=[])  # planning leaves the caller's RNG stream alone


def verify(gm: fx.GraphModule, inputs, loss_fn) -> tuple[Schedule, Timeline]:
    """Profile one fake step of ``gm`` (annotating it) and simulate it."""
    with _fork_rng():
        profile_step(gm, inputs, loss_fn)
    schedule = build_schedule(gm)
    return schedule, simulate(schedule)


def analyse(model: nn.Module, example_inputs: Any, *, loss_fn: Callable | None = None,
            leaf_modules: Sequence[type] = ()) -> Analysis:
    """Trace ``model`` and profile one fake training step. Allocates no activations."""
    inputs = check_inputs(model, example_inputs)
    workspace.prestart(next((p.device for p in model.parameters()), torch.device("cpu")))
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    loss_fn = loss_fn or default_loss
    schedule, timeline = verify(gm, inputs, loss_fn)
    log.debug("analysed %s: %d steps, %d storages, predicted peak %s at %s", type(model).__name__,
              len(timeline.steps), len(schedule.storages), format_bytes(timeline.peak_bytes),
              " ".join(timeline.peak_node))
    captured = gm.meta.get("fxsketch.capture")  # set by passes.export where fx could not trace
    return Analysis(type(model).__name__, gm, inputs, loss_fn, schedule, timeline,
                    (captured,) if captured else ())


AUTO_LAYOUT_SLACK = 0.05
"""memory_format="auto" keeps channels_last unless the relaid-out unmodified step peaks this much
above the step as given (ResNet-18 8x3x64x64: +14 %, left as given; ResNet-50: +0.7 %, relaid out)."""


def relayout(analysis: Analysis, config: Config) -> Analysis:
    """``analysis`` with its graph's convolutions in ``config.memory_format`` (passes/layout.py),
    profiled again; the step as given stays the baseline. Unchanged for "preserve" or a graph
    without 2-d/3-d convs. "auto" relays out a step on CPU, and keeps it unless the relaid-out
    unmodified step peaks more than AUTO_LAYOUT_SLACK above the step as given: weight-dominated
    steps on small inputs, where channels_last's weight-gradient copies (AccumulateGrad keeps dW
    in the weight's layout) outweigh the reorders it saves. Its unmodified peak is a proxy:
    ResNet-50 184x3x224² relaid out peaks 0.7 % higher unmodified and plans 2.2x lower
    (docs/layout.md)."""
    fmt = config.memory_format
    if fmt == "auto":
        device = next((p.device for p in analysis.gm.parameters()), analysis.inputs[0].device)
        fmt = "channels_last" if device.type == "cpu" else "preserve"
    if fmt == "preserve":
        return analysis
    gm = fx.GraphModule(analysis.gm, copy.deepcopy(analysis.gm.graph), class_name=type(analysis.gm).__name__)
    gm.meta.update(analysis.gm.meta)
    count = layout.to_channels_last(gm)
    if not count:
        return analysis
    schedule, timeline = verify(gm, analysis.inputs, analysis.loss_fn)
    given = analysis.timeline.peak_bytes
    if config.memory_format == "auto" and timeline.peak_bytes > given * (1 + AUTO_LAYOUT_SLACK):
        note = (f"layout: convolutions left as given (memory_format='auto'): channels_last would peak at "
                f"{format_bytes(timeline.peak_bytes)} unmodified, {100 * (timeline.peak_bytes / given - 1):.0f} % "
                f"above {format_bytes(given)}; memory_format='channels_last' forces it")
        return replace(analysis, notes=(*analysis.notes, note))
    note = (f"layout: {count} convolution(s) run channels_last (memory_format={config.memory_format!r}); "
            f"unmodified peak {format_bytes(given)} as given, {format_bytes(timeline.peak_bytes)} relaid out")
    return replace(analysis, gm=gm, schedule=schedule, timeline=timeline, notes=(*analysis.notes, note),
                   unmodified=(analysis.schedule, analysis.timeline), given_gm=analysis.gm)


def admissible(cands: Candidates, max_grad_noise: float) -> Candidates:
    """The choices whose gradient noise is within ``max_grad_noise`` (the bound every plan keeps),
    and the required ones (the user asked for those by name)."""
    keep = [i for i, c in enumerate(cands.problem.choices) if c.noise <= max_grad_noise or c.required]
    if len(keep) == len(cands.candidates):
        return cands
    problem = replace(cands.problem, choices=[cands.problem.choices[i] for i in keep])
    return Candidates(problem, tuple(cands.candidates[i] for i in keep), cands.cost)


def propose(model: nn.Module, analysis: Analysis, config: Config, *, calibration_inputs=None,
            calibration_loss_fn: Callable | None = None) -> Proposal:
    """Measure probe noise and node times on a real sub-batch within the plan's memory (see
    :mod:`fxsketch._calibration`), then describe every choice; only those within
    ``max_grad_noise`` are offered to the solver."""
    notes: list[str] = []
    device = Device.for_tensor(next(iter(analysis.gm.parameters()), analysis.inputs[0]))

    def build(noise=None, timings=None) -> Candidates:
        with _fork_rng():  # option kinds time their ops on random tensors
            return build_problem(analysis.gm, analysis.schedule, analysis.timeline, methods=config.methods,
                             settings=config.option_settings(noise), device=device, timings=timings)
    budget = resolve_budget(config.budget, analysis.baseline.peak_bytes)
    runs = not analysis.meta_inputs or calibration_inputs is not None  # calibration runs real steps
    times_layout = analysis.given_gm is not None and config.overhead_against == "given" and config.time_nodes
    if budget is None and (runs or times_layout):
        # without a budget, what planning runs stays under the lowest peak a plan could reach: at any
        # overhead for the layout's whole steps (the options' cap is known only after them), within
        # the options' cap for calibration
        solver = Solver(build().problem, config.solver_options())

        def limits(cap):
            return Reachable(solver, cap)
    else:
        def limits(cap):
            return budget
    with _fork_rng():
        noise, timings = calibrate_for_plan(model, analysis, config, limits, notes,
                                            calibration_inputs=calibration_inputs,
                                            calibration_loss_fn=calibration_loss_fn)
    every = build(noise, timings)
    cands = admissible(every, config.max_grad_noise)
    probed = {c.nodes[0] for c in every.candidates if c.kind == "probe"}
    offered = {c.nodes[0] for c in cands.candidates if c.kind == "probe"}
    refused = len(probed - offered)
    if probed:
        source = "calibrated" if noise else "prior"
        notes.append(f"probing: {len(probed)} conv(s), {refused} refused (no sketch size keeps the {source} "
                     f"probe noise within {config.max_grad_noise:g}x the layer's SGD noise)" if refused else
                     f"probing: {len(probed)} conv(s), every one has a sketch size within "
                     f"{config.max_grad_noise:g}x SGD noise ({source})")
    samples = next((c.calibration_batch for c in (noise or {}).values()), 0)
    log.debug("proposed %d choices (%d within max_grad_noise=%g), calibrated on %d samples",
              len(every.candidates), len(cands.candidates), config.max_grad_noise, samples)
    return Proposal(cands, tuple(notes), refused, every, samples, getattr(timings, "layout", 0.0))


def apply(model: nn.Module, analysis: Analysis, proposal: Proposal, solution: Solution,
          seed: int | None = None) -> Verified:
    """Rewrite the chosen candidates into a new module and verify it (re-analyse the new graph)."""
    chosen = tuple(proposal.candidates.candidates[i] for i in solution.chosen)
    gm = rewrite(model, analysis.gm, chosen, seed=seed)
    schedule, timeline = verify(gm, analysis.inputs, analysis.loss_fn)
    return Verified(solution, chosen, gm, schedule, timeline)


def _noise_to_reach(proposal: Proposal, config: Config, budget: int) -> float | None:
    """The smallest noise bound (among the choices' own levels, bisected with a few solves) whose
    admissible choices reach ``budget`` on the solver's model; None if no bound does."""
    every = proposal.every
    if every is None:
        return None
    levels = sorted({c.noise for c in every.problem.choices if c.noise > config.max_grad_noise})
    if not levels:
        return None

    def reaches(level: float) -> bool:
        try:
            Solver(admissible(every, level).problem, config.solver_options()).solve(budget)
        except Infeasible:
            return False
        return True
    if not reaches(levels[-1]):
        return None
    lo, hi = 0, len(levels) - 1          # levels[hi] reaches; find the first that does
    for _ in range(4):
        if lo >= hi:
            break
        mid = (lo + hi) // 2
        if reaches(levels[mid]):
            hi = mid
        else:
            lo = mid + 1
    return levels[hi]


def _budget_error(analysis: Analysis, proposal: Proposal, config: Config, budget: int,
                  lowest: int) -> BudgetError:
    """What is reachable within the bounds, and which option would reach the budget."""
    hints = []
    missing = [m for m in registry.default_methods() if m not in config.methods]
    if missing:
        hints.append(f"allow more methods (methods={tuple(config.methods) + tuple(missing)!r})")
    level = _noise_to_reach(proposal, config, budget)
    if level is not None:
        hints.insert(0, f"allow noisier probes: max_grad_noise={math.ceil(level * 100) / 100:g} (now "
                        f"{config.max_grad_noise:g}) reaches the budget on the planner's model")
    hints.append("raise the budget to at least the lowest reachable peak")
    every = proposal.every or proposal.candidates
    offered = {c.kind for c in every.candidates}
    idle = [m for m in config.methods if m not in offered]
    methods = tuple(m for m in config.methods if m in offered)
    idle_text = f" ({', '.join(idle)}: no choice on this step)" if idle else ""
    return BudgetError(
        f"budget {format_bytes(budget)} cannot be met for {analysis.model_name}: the lowest reachable "
        f"predicted peak with methods {methods}{idle_text} and max_grad_noise={config.max_grad_noise:g} "
        f"is {format_bytes(lowest)} (unmodified: {format_bytes(analysis.baseline.peak_bytes)}). "
        f"To go lower: {'; or '.join(hints)}.", lowest)


def _no_worse(v: Verified, model, analysis: Analysis, proposal: Proposal, config: Config,
              notes: list[str], budget: int | None = None) -> Verified:
    """``v``, or the unmodified step when ``v``'s verified peak is above it (the solver's model
    can miss a cost that only the rewritten graph's analysis shows, e.g. a lean op's workspace).
    A plan above it that meets ``budget`` and is estimated to save time (Mem-AOP-GD trades memory
    for time) is kept, and so is a plan with choices the user required."""
    if not v.solution.chosen or v.timeline.peak_bytes <= analysis.baseline.peak_bytes:
        return v
    if budget is not None and v.timeline.peak_bytes <= budget and v.solution.cost < 0:
        return v
    if any(proposal.candidates.problem.choices[c].required for c in v.solution.chosen):
        return v  # the user asked for those choices (e.g. aop_layers="all")
    notes.append(f"the solver's plan verified at {format_bytes(v.timeline.peak_bytes)}, above the "
                 f"unmodified step: the model is left as it is")
    none = Solution((), analysis.timeline.peak_bytes, tuple(analysis.timeline.live_bytes), 0.0)
    return apply(model, analysis, proposal, none, config.seed)


def _solver_notes(solver: Solver, sol: Solution | None = None, what: str = "peak") -> list[str]:
    """The optimality gap of the solve that made the plan, and the note a plan carries when a
    solve ran into the solver's wall-clock safety net: the one way a plan can depend on the
    machine's load."""
    notes = []
    if sol is not None and sol.gap is not None:
        notes.append(f"solver: this plan's {what} is within {100 * sol.gap:.1f} % of the LP bound "
                     f"(optimality gap on the solver's model, {solver.model.n_choices} choices)")
    if not solver.hit_time_limit:
        return notes
    return notes + [f"a solver search stopped at its {solver.options.safety_seconds:g} s safety limit "
                    f"(SolverOptions.safety_seconds), so this plan can differ from run to run; lower "
                    f"solver_max_nodes or raise the limit for a plan that does not"]


def fit(model: nn.Module, analysis: Analysis, proposal: Proposal, config: Config) -> Fit:
    """Solve, rewrite and verify until the verified peak meets the budget (or none is given).

    The rewritten graph's analysis may land above the solver's own estimate; then the solver's
    target is lowered by the excess and it solves again (at most three times, all solves within
    ``config.total_plan_nodes`` branch-and-bound nodes: work, not seconds, so the plan is the
    same on any load). If no plan meets the budget, the lowest-peak plan decides: met, or
    :class:`BudgetError` with its verified peak. Where the step has kernel workspace, all of this
    runs twice, with and without the unmodified step's workspace in the solver's model (each run
    with its own node limit), and the better verified plan is kept (see the comment below); with a
    budget, the second run only when the first plan misses it.
    """
    budget = resolve_budget(config.budget, analysis.baseline.peak_bytes)
    problem = proposal.candidates.problem
    alt = _without_kernel_workspace(problem, analysis)
    if alt is None:
        return _fit_on(problem, model, analysis, proposal, config, budget)
    # The solver's model keeps each kernel's workspace of the unmodified step where an option
    # rewrites that kernel (a probed conv's backward is another kernel, with other workspace):
    # only verification sees the rewritten one. So the problem is also solved without kernel
    # workspace, and the verified plan that does better is kept (VGG-16 16x224^2: 1661.7 against
    # 1705.6 MiB process-level, docs/workspace.md).
    # With a budget, the first verified plan that meets it is kept (the second problem's measured
    # gain is in the lowest peak, and it doubles the solver's time: the CLI's ResNet-50 plan)
    fits, error = [], None
    for p in (problem, alt):
        if budget is not None and fits and fits[0].verified.timeline.peak_bytes <= budget:
            break
        try:
            fits.append(_fit_on(p, model, analysis, proposal, config, budget))
        except BudgetError as e:
            error = error or e
    if not fits:
        raise error

    def better(f: Fit):  # lower verified peak; with a budget, the cheaper plan that meets it
        peak, cost = f.verified.timeline.peak_bytes, f.verified.solution.cost
        return (peak, cost) if budget is None else (peak > budget, cost, peak)
    log.debug("verified peaks with and without the kernel workspace in the solver's model: %s",
              ", ".join(format_bytes(f.verified.timeline.peak_bytes) for f in fits))
    return min(fits, key=better)


def _without_kernel_workspace(problem, analysis: Analysis):
    """``problem`` with the unmodified step's kernel workspace taken out of its fixed bytes, or
    None when it has none."""
    tl, storages = analysis.timeline, analysis.schedule.storages
    spans = [(storages[s].nbytes, a, b) for s, (a, b) in tl.intervals.items() if storages[s].kind is Kind.KERNEL]
    if not spans:
        return None
    kernel = live_bytes(problem.n_steps, spans)
    # a choice that frees workspace (a negative span: passes.options.chunk) frees none here
    choices = [replace(c, adds=tuple(sp for sp in c.adds if sp.nbytes >= 0)) for c in problem.choices]
    return replace(problem, fixed=[f - k for f, k in zip(problem.fixed, kernel)], choices=choices)


TARGET_MARGIN = 0.01
"""The first solve of a budget plan aims this fraction below the budget (see :func:`_fit_on`)."""


def _fit_on(problem, model: nn.Module, analysis: Analysis, proposal: Proposal, config: Config,
            budget: int | None) -> Fit:
    """:func:`fit` on one problem of the proposal's choices."""
    solver = Solver(problem, config.solver_options())
    notes: list[str] = []

    def search(target, max_overhead):  # each search gets what is left of the total, at most its own limit
        left = max(min(config.solver_max_nodes, config.total_plan_nodes - solver.nodes_used), 1)
        solver.options = replace(solver.options, max_nodes=left)
        return solver.solve(target, max_overhead=max_overhead)

    lowest: Solution | None = None
    # the solver's model runs about 1 % under the rewritten graph's analysis on conv nets (kernel
    # workspace of rewritten kernels, temporaries it does not see): aiming that much lower first
    # saves a re-plan (a solve and a verification) on most budgets
    target = None if budget is None else int(budget * (1 - TARGET_MARGIN))
    for attempt in range(3):
        try:
            sol = search(target, config.options_cap(proposal.layout_time))
        except Infeasible as e:
            if attempt == 0 and target is not None and target < budget:
                target = budget  # the margin itself was out of reach: the budget as it is
                continue
            lowest = e.lowest
            break
        v = apply(model, analysis, proposal, sol, config.seed)
        log.debug("solved for %s: %d choices, solver's peak %s, verified %s",
                  format_bytes(target) if target is not None else "the lowest peak", len(sol.chosen),
                  format_bytes(sol.peak_bytes), format_bytes(v.timeline.peak_bytes))
        if budget is None or v.timeline.peak_bytes <= budget or not sol.chosen:
            v = _no_worse(v, model, analysis, proposal, config, notes, budget)  # still within the budget
            if budget is not None and v.timeline.peak_bytes > budget * 1.001:
                notes.append(f"predicted peak exceeds the budget by "
                             f"{100 * (v.timeline.peak_bytes / budget - 1):.1f} %")
            return Fit(v, budget, tuple(notes + _solver_notes(solver, sol, "peak" if target is None else "extra time")))
        notes.append(f"re-planned: the rewritten graph predicted {format_bytes(v.timeline.peak_bytes)} "
                     f"> budget; solver target lowered")
        target = max(1, target - (v.timeline.peak_bytes - budget))
        if solver.nodes_used >= config.total_plan_nodes:
            break
    if lowest is None:
        lowest = search(None, math.inf)
    v = _no_worse(apply(model, analysis, proposal, lowest, config.seed), model, analysis, proposal, config, notes)
    if v.timeline.peak_bytes > budget:
        raise _budget_error(analysis, proposal, config, budget, v.timeline.peak_bytes)
    notes.append("the lowest-peak plan was used (the budget is close to the reachable floor)")
    return Fit(v, budget, tuple(notes + _solver_notes(solver, lowest)))


# --------------------------------------------------------------------------------------------
# the report, from the verified graph


def _alive(tl: Timeline, sid: int, t: int) -> bool:
    span = tl.intervals.get(sid)
    return span is not None and span[0] <= t <= span[1]


def _freed_at_peak(analysis: Analysis, v: Verified, cand: Candidate, rewritten: fx.Node,
                   renamed: dict[str, str]) -> int:
    """Bytes the candidate keeps out of the verified peak step: what its node(s) saved in the
    unmodified step and would still hold there (not alive there anyway), minus the storages the
    rewritten node itself made to save (sketch, mask); when the peak is that node's own step,
    also that step's new storages (outputs, gradients, workspace) against the original's."""
    tl, t = v.timeline, v.timeline.peak_step
    name = rewritten.name
    try:
        if not v.schedule.index("forward", name) <= t <= v.schedule.index("backward", name):
            return 0
    except KeyError:
        return 0
    storages = analysis.schedule.storages
    by_name = {n.name: n for n in analysis.gm.graph.nodes}
    new_nodes = {n.name: n for n in v.gm.graph.nodes}
    inside = set(cand.nodes)
    outputs = [o for o in cand.nodes if any(u.name not in inside for u in by_name[o].users)]

    def counterpart(sid: int) -> int | None:
        owner = storages[sid].owner
        own = [m.storage for m in by_name[owner].meta.get("fxsketch.tensor", ())] if owner in by_name else []
        if sid not in own:
            return None
        index = own.index(sid)
        if owner in inside:
            if len(cand.nodes) > 1:  # a replayed segment: only its outputs survive, as the call's
                if owner not in outputs:
                    return None
                index, owner = outputs.index(owner), name
            else:
                owner = name
        node = new_nodes.get(renamed.get(owner, owner))
        metas = node.meta.get("fxsketch.tensor", ()) if node is not None else ()
        return metas[index].storage if index < len(metas) else None

    would_hold = set()
    for node in cand.nodes:
        for sid in by_name[node].meta.get("fxsketch.saved", ()):
            if storages[sid].kind in RESIDENT or storages[sid].kind is Kind.PARAM_GRAD:
                continue
            twin = counterpart(sid)
            if twin is None or not _alive(tl, twin, t):
                would_hold.add(sid)
    held = {s for s in rewritten.meta.get("fxsketch.saved", ())
            if v.schedule.storages[s].owner == name and v.schedule.storages[s].kind is Kind.INTERNAL
            and _alive(tl, s, t)}
    freed = sum(storages[s].nbytes for s in would_hold) - sum(v.schedule.storages[s].nbytes for s in held)
    phase, _ = tl.steps[t]
    if len(cand.nodes) == 1 and tl.steps[t][1] == name:
        # the peak is the rewritten node's own step: swap that step's new storages (outputs,
        # gradients, workspace) for those the original node's step made
        new_step = v.schedule.steps[t]
        old_step = analysis.schedule.steps[analysis.schedule.index(phase, cand.nodes[0])]
        freed += sum(storages[s].nbytes for s in old_step.allocs if s not in would_hold)
        freed -= sum(v.schedule.storages[s].nbytes for s in new_step.allocs if s not in held)
    return max(0, freed)


def _decisions(analysis: Analysis, proposal: Proposal, v: Verified) -> list[Decision]:
    # the node of the rewritten graph that stands for each chosen candidate (marked by rewrite)
    stands = {n.meta["fxsketch.choice"]: n for n in v.gm.graph.nodes if "fxsketch.choice" in n.meta}
    renamed = {v.chosen[k].nodes[0]: n.name for k, n in stands.items() if len(v.chosen[k].nodes) == 1}
    out = []
    problem = proposal.candidates.problem
    for k, (i, cand) in enumerate(zip(v.solution.chosen, v.chosen)):
        ch, node = problem.choices[i], stands.get(k)
        out.append(Decision(
            node=cand.nodes[0] if len(cand.nodes) == 1 else f"{cand.nodes[0]}..{cand.nodes[-1]}",
            option=Option(cand.kind), detail=cand.detail,
            freed_bytes=_freed_at_peak(analysis, v, cand, node, renamed) if node is not None else 0,
            extra_time=ch.cost, grad_noise=ch.noise, rewritten=node.name if node is not None else ""))
    return out


def opaque_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Module nodes that run several autograd ops as one (see ``passes.trace._opaque``)."""
    return [n for n in gm.graph.nodes if n.meta.get("fxsketch.opaque")]


def _timeline_data(tl: Timeline, schedule: Schedule) -> TimelineData:
    """The report data of one timeline, with every storage's lifetime (for the memory_viz export)."""
    end = len(tl.steps) - 1
    spans = []
    for sid, (first, last) in sorted(tl.intervals.items()):
        info = schedule.storages[sid]
        kept = last == end and (sid in schedule.pinned or info.kind in RESIDENT or info.kind is Kind.PARAM_GRAD)
        spans.append(StorageSpan(info.owner, info.kind.value, tl.categories[sid].value, info.nbytes,
                                 first, last, kept))
    return TimelineData(tl.steps, tl.live_bytes, tl.by_category, tl.peak_bytes, tl.peak_step, tuple(spans))


def _rows(gm: fx.GraphModule, schedule: Schedule, timeline: Timeline) -> tuple[NodeRow, ...]:
    storages = schedule.storages
    rows = []
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        metas = n.meta.get("fxsketch.tensor", ())
        own = [m.storage for m in metas if storages[m.storage].owner == n.name]
        saved = sum(storages[s].nbytes for s in n.meta.get("fxsketch.saved", ())
                    if storages[s].kind not in RESIDENT)
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
        rows.append(NodeRow(name=n.name, op=n.op, target=str(target), shape=metas[0].shape if metas else None,
                            output_bytes=sum(storages[s].nbytes for s in own), saved_bytes=saved,
                            freed=freed, option=n.meta.get("fxsketch.option", "keep")))
    return tuple(rows)


def make_plan(analysis: Analysis, gm: fx.GraphModule, schedule: Schedule, timeline: Timeline, *,
              decisions: Sequence[Decision] = (), budget: int | None = None, notes: Sequence[str] = (),
              cost_estimator: str = "", max_grad_noise: float | None = None,
              calibration_batch: int = 0, layout_time: float = 0.0) -> MemoryPlan:
    """Assemble the report data of ``gm`` (analysed: ``schedule``, ``timeline``) against the
    unmodified step of ``analysis``."""
    storages = schedule.storages
    alive = tuple((storages[s].owner, timeline.categories[s].value, storages[s].nbytes)
                  for s in timeline.alive_at_peak)
    params = sum(i.nbytes for i in storages.values() if i.kind in (Kind.PARAM, Kind.BUFFER))
    inputs = sum(i.nbytes for i in storages.values() if i.kind is Kind.INPUT)
    notes = (*analysis.notes, *notes)
    sources = gm.meta["fxsketch.step"].kernel_sources
    if sources:
        found = ", ".join(f"{n} {how}" for how, n in sorted(sources.items()))
        notes = (*notes, f"kernel workspace (convolutions): {found}; tensor-level peak "
                         f"{format_bytes(timeline.tensor_peak_bytes)}")
    data = _timeline_data(timeline, schedule)
    opaque = opaque_nodes(gm)
    if opaque:
        named = ", ".join(f"{n.name} ({type(gm.get_submodule(n.target)).__name__})" for n in opaque[:6])
        more = f" and {len(opaque) - 6} more" if len(opaque) > 6 else ""
        notes = (*notes, f"opaque node(s), run whole (torch.nn modules with submodules, RNNs, "
                         f"leaf_modules) with no option inside: {named}{more}")
    return MemoryPlan(model=analysis.model_name, parameter_bytes=params, input_bytes=inputs,
                      baseline=_timeline_data(analysis.baseline, analysis.baseline_schedule),
                      timeline=data,
                      rows=_rows(gm, schedule, timeline), alive_at_peak=alive, decisions=tuple(decisions),
                      budget_bytes=budget, notes=tuple(notes), cost_estimator=cost_estimator,
                      max_grad_noise=max_grad_noise, calibration_batch=calibration_batch,
                      layout_time=layout_time, host_live_bytes=host_timeline(gm, schedule))  # offloaded copies: apart


def report(analysis: Analysis, proposal: Proposal, fitted: Fit, config: Config | None = None) -> MemoryPlan:
    """The memory plan of the fitted module: every figure from its verified analysis."""
    v = fitted.verified
    return make_plan(analysis, v.gm, v.schedule, v.timeline, decisions=_decisions(analysis, proposal, v),
                     budget=fitted.budget, notes=proposal.notes + fitted.notes,
                     cost_estimator=proposal.candidates.cost.estimator,
                     max_grad_noise=config.max_grad_noise if config is not None else None,
                     calibration_batch=proposal.calibration_batch, layout_time=proposal.layout_time)
