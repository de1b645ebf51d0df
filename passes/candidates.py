"""The planning problem: the unmodified step as numbers, and every registered option's choices on it.

The step's storages split in two: those no choice can change (summed per step into
``Problem.fixed``) and the saved activations whose life after their last forward use depends on
which savers still keep them (``Problem.saved``). Each registered option kind
(:mod:`fxsketch.passes.options`) then describes its choices on that table; the solver sees only
these numbers, the rewrite pass the matching :class:`Candidate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .cost import CostModel, Device, cost_model
from .liveness import Schedule, Timeline
from .options import Candidate, OptionSettings, ProposalContext, default_methods, get
from .saved import Kind, require
from .solve import Problem, Saved
from .sweep import live_bytes

__all__ = ["Candidates", "build_problem"]


@dataclass(frozen=True)
class Candidates:
    """``problem.choices[i]`` and ``candidates[i]`` describe the same option."""

    problem: Problem
    candidates: tuple[Candidate, ...]
    cost: CostModel


def _saved_table(schedule: Schedule, timeline: Timeline) -> tuple[list[Saved], dict[int, int]]:
    """Activations alive until their last forward use, then while a saver keeps them; and the
    activations no backward node saves (no savers): a recompute segment that starts from one must
    hold it until the replay, which the solver has to see."""
    storages = schedule.storages
    savers: dict[int, list[tuple[str, int]]] = {}
    base_end: dict[int, int] = {}
    for i, st in enumerate(schedule.steps):
        for s in st.allocs + st.reads:
            if storages[s].kind not in (Kind.ACTIVATION, Kind.INTERNAL) or s in schedule.pinned:
                continue
            if st.phase == "backward":
                savers.setdefault(s, []).append((st.node, i))
            else:
                base_end[s] = max(base_end.get(s, i), i)
    saved: list[Saved] = []
    index: dict[int, int] = {}
    for s in savers:
        start = timeline.intervals[s][0]
        index[s] = len(saved)
        saved.append(Saved(storages[s].nbytes, start, base_end.get(s, start), tuple(savers[s])))
    for s, (a, b) in timeline.intervals.items():
        if s not in index and storages[s].kind in (Kind.ACTIVATION, Kind.INTERNAL) and s not in schedule.pinned:
            index[s] = len(saved)
            saved.append(Saved(storages[s].nbytes, a, b, ()))
    return saved, index


def build_problem(gm: fx.GraphModule, schedule: Schedule, timeline: Timeline, *,
                  methods: tuple[str, ...] | None = None, settings: OptionSettings | None = None,
                  device: Device | None = None, timings: dict[str, float] | None = None,
                  **setting_fields) -> Candidates:
    """Describe every choice of every enabled option kind on ``schedule``.

    ``methods``: the registered kinds to offer (default: the default ones). ``settings`` (or its
    fields as keywords, e.g. ``probe_rank=4``) is what the kinds read. ``timings`` (node name ->
    measured forward seconds, see :func:`fxsketch.passes.cost.time_nodes`) replace the roofline
    estimate of the nodes they name.
    """
    require(gm, "fxsketch.step")
    settings = settings or OptionSettings(**setting_fields)
    kinds = [get(m) for m in (default_methods() if methods is None else methods)]
    T = len(schedule.steps)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    saved, index = _saved_table(schedule, timeline)
    storages = schedule.storages
    fixed = live_bytes(T, ((storages[s].nbytes, a, b) for s, (a, b) in timeline.intervals.items()
                           if s not in index))
    ctx = ProposalContext(
        gm=gm, schedule=schedule, timeline=timeline, nodes=nodes,
        fwd={s.node: i for i, s in enumerate(schedule.steps) if s.phase == "forward"},
        bwd={s.node: i for i, s in enumerate(schedule.steps) if s.phase == "backward"},
        cost=cost_model(gm, device or Device(), timings), saved=saved, saved_index=index,
        settings=settings)
    pairs = []
    for n in nodes:
        if n.name in ctx.fwd and n.name in ctx.bwd:
            for kind in kinds:
                ctx.node_pairs.setdefault(n.name, []).extend(kind.node_choices(ctx, n))
            pairs += ctx.node_pairs.get(n.name, [])
    for kind in kinds:
        pairs += kind.graph_choices(ctx)
    problem = Problem(T, fixed, saved, [choice for choice, _ in pairs])
    return Candidates(problem, tuple(cand for _, cand in pairs), ctx.cost)
