"""Choose one option per node: least estimated overhead subject to predicted peak <= budget.

Pure Python over numbers (no fx): a :class:`Problem` lists the bytes alive at every step that no
choice changes, the saved storages whose lifetime depends on who still saves them, and the
choices. A storage saved by several nodes is freed only when every one of them lets go, so its
life after the forward pass is an OR over its savers: that is what the MILP encodes (variable
y >= "saver j still keeps it" for every saver j still ahead), never a per-node sum of savings;
:mod:`.solver_model` builds it. Solved with HiGHS through ``highspy``, which takes a starting plan:
a lowest-peak solve climbs a ladder of overhead caps, each rung starting from the best plan found
so far. A :class:`Solver` keeps the model between solves on the same problem.

Deterministic: the searches are bounded by work (branch-and-bound nodes, LPs run to the optimum),
never by the clock, so the same problem gives the same plan on any machine load. The one
wall-clock limit, :attr:`SolverOptions.safety_seconds`, is a far-away safety net that a solve
reports in :attr:`Solution.hit_time_limit`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .solver_model import BaseModel, Effort, Program, _highs, build_model  # noqa: F401  (_highs: tests)
from .sweep import live_bytes

__all__ = ["Span", "Saved", "Choice", "Problem", "Solution", "SolverOptions", "Infeasible", "Solver",
           "evaluate", "solve"]


@dataclass(frozen=True)
class Span:
    """``nbytes`` alive from step ``start`` to step ``end`` (inclusive)."""

    nbytes: int
    start: int
    end: int


@dataclass(frozen=True)
class Saved:
    """A storage alive over [start, base_end] whatever is chosen, and after that for as long as
    one of its savers (key, last step that needs it) still keeps it."""

    nbytes: int
    start: int
    base_end: int
    savers: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Choice:
    group: str                                  # at most one choice per group
    cost: float                                 # estimated extra step time (fraction)
    noise: float = 0.0                          # gradient noise added (0 for exact options)
    drops: tuple[tuple[int, str], ...] = ()     # (saved index, saver key) that no longer keeps it
    adds: tuple[Span, ...] = ()                 # new storages: sketch, mask, recomputed copies
    holds: tuple[tuple[int, int], ...] = ()     # (saved index, step): kept alive until step
    covers: tuple[str, ...] = ()                # other groups this choice excludes
    required: bool = False                      # in every plan (the user asked for it, e.g. aop_layers="all")


@dataclass
class Problem:
    n_steps: int
    fixed: list[int]                            # bytes alive at each step, untouched by choices
    saved: list[Saved] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)


@dataclass(frozen=True)
class Solution:
    chosen: tuple[int, ...]
    peak_bytes: int
    live_bytes: tuple[int, ...]
    cost: float
    hit_time_limit: bool = False
    """A search of the solve that found it ran into ``SolverOptions.safety_seconds``: the plan
    then depends on the machine's speed and load, unlike every other plan."""
    bound: float | None = None
    """A proven lower bound on what the solve minimised (the LP relaxation of its whole problem):
    bytes of peak for a lowest-peak solve, cost + noise_weight x noise for a budget solve."""
    objective: float | None = None
    """What the solve minimised, for this plan (in the units of :attr:`bound`)."""

    @property
    def gap(self) -> float | None:
        """How far this plan can be from the optimum: (objective - bound) / objective (0: optimal)."""
        if self.bound is None or self.objective is None:
            return None
        return max(self.objective - self.bound, 0.0) / self.objective if self.objective > 0 else 0.0


class Infeasible(Exception):
    """No plan meets the budget. ``lowest`` is the lowest-peak plan the solver found on the way
    (any overhead): a caller can use it as it is instead of solving again."""

    def __init__(self, budget: int, lowest: Solution):
        super().__init__(f"budget of {budget} bytes is below the lowest reachable peak, "
                         f"{lowest.peak_bytes} bytes")
        self.budget = budget
        self.lowest = lowest


def _require(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"SolverOptions.{name} must be {what}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SolverOptions:
    """How hard, and how, the solver searches; none of these changes what a plan must satisfy."""

    ladder: tuple[float, ...] = (0.1,)
    """Overhead caps (increasing fractions of the step) that a lowest-peak solve climbs below its
    own cap, each rung starting from the best plan so far: HiGHS finds good plans quickly under a
    tight cap and poorly under a loose one. ``()``: one solve at the cap."""
    noise_weight: float = 0.01
    """Weight of gradient noise against cost in the objective (0: cost alone)."""
    max_nodes: int = 100
    """Branch-and-bound nodes for one search: a budget MILP, or a lowest-peak solve's whole
    ladder (its rungs share them; a budget solve the budget MILP cannot meet runs the ladder and
    a second budget MILP after it, each with as many); then the best plan found so far is used.
    A work limit, not a time limit: the plan does not depend on the machine's load. Each MILP's
    root node counts as one and always runs (HiGHS closes the 2 % gap there on most problems);
    the limit bounds the tree search after it, which some problems need (MobileNetV2 at cap
    0.2: 79 nodes, ResNet-50 near its lowest peak: 73; docs/optimize.md)."""
    safety_seconds: float = 120.0
    """Wall-clock safety net for one :meth:`Solver.solve` (its MILPs; the LPs always finish),
    so that it never decides a plan unless something is badly wrong: 2x the slowest solve
    measured (ResNet-50 on meta inputs at budget 0.35 of its peak, 57 s with the 2-core machine
    at load 8 and a CPU burner on both cores, 15 s without the burner; docs/optimize.md). A
    solve that hits it says so in :attr:`Solution.hit_time_limit`."""
    mip_rel_gap: float = 0.02
    """HiGHS stops once its plan is provably within this fraction of the optimum."""
    reduce_above: int = 200
    """With more choices, the MILP runs over the choices an LP relaxation wants (plus the
    starting plan's and other relaxations' supports), the rest fixed to zero (as in RINS): on
    ResNet-50 the same plan as the full MILP in a fraction of the time."""
    also_full_below: int = 600
    """With fewer choices, the full MILP runs too and the better plan is kept: the reduction can
    leave out what the optimum needs (r3d_18 lost 3 % of its peak that way; a 460-choice CNN with a
    budget: the reduced MILP's plan cost +297 %, the full one's +49 %). With more, it never
    runs (on ResNet-50 its root node alone outlasted the whole reduced search): a budget the
    reduced MILP cannot meet goes to the ladder of lowest-peak solves instead."""

    def __post_init__(self):
        ladder = self.ladder
        caps = isinstance(ladder, (tuple, list)) and all(_is_number(f) and 0 < f < math.inf for f in ladder)
        _require(caps and list(ladder) == sorted(set(ladder)), "ladder",
                 "increasing overhead caps > 0, e.g. (0.1,)", ladder)
        object.__setattr__(self, "ladder", tuple(float(f) for f in ladder))
        nw, safety, gap = self.noise_weight, self.safety_seconds, self.mip_rel_gap
        _require(_is_number(nw) and 0 <= nw < math.inf, "noise_weight", "a weight >= 0", nw)
        _require(_is_number(safety) and safety > 0, "safety_seconds", "seconds > 0 (inf: none)", safety)
        _require(_is_number(gap) and 0 <= gap < math.inf, "mip_rel_gap", "a fraction >= 0 (0.02 = 2 %)", gap)
        for name, what in (("max_nodes", "a number of nodes >= 1"), ("reduce_above", "a number of choices >= 0"),
                           ("also_full_below", "a number of choices >= 0")):
            n = getattr(self, name)
            _require(isinstance(n, int) and not isinstance(n, bool) and n >= (name == "max_nodes"), name, what, n)


def evaluate(problem: Problem, chosen) -> list[int]:
    """Live bytes per step when the choices ``chosen`` (indices) are applied.

    >>> p = Problem(3, [0, 0, 0], [Saved(8, 0, 0, (("a", 2),))], [Choice("a", 0.1, drops=((0, "a"),))])
    >>> evaluate(p, []), evaluate(p, [0])
    ([8, 8, 8], [8, 0, 0])
    """
    chosen = set(chosen)
    dropped = {d for c in chosen for d in problem.choices[c].drops}

    def end(i: int, s: Saved) -> int:  # a saved storage lives until its last keeper lets go
        return max([s.base_end] + [step for key, step in s.savers if (i, key) not in dropped]
                   + [step for c in chosen for j, step in problem.choices[c].holds if j == i])
    spans = [(s.nbytes, s.start, end(i, s)) for i, s in enumerate(problem.saved)]
    spans += [(sp.nbytes, sp.start, sp.end) for c in chosen for sp in problem.choices[c].adds]
    return live_bytes(problem.n_steps, spans, problem.fixed)


def _solution(problem: Problem, chosen) -> Solution:
    live = evaluate(problem, chosen)
    return Solution(tuple(sorted(chosen)), max(live), tuple(live),
                    sum(problem.choices[c].cost for c in chosen))


class Solver:
    """Plans for one problem. The base model is built here, once, and the uncapped relaxation's
    support on first need; every :meth:`solve` reuses both, so a caller that re-plans with a
    tighter budget pays only for the new search. Neither depends on :attr:`options`, which a
    caller may replace between solves (each with the nodes it has left, say: :attr:`nodes_used`
    counts every solve's).

    >>> p = Problem(2, [1, 5], [Saved(10, 0, 0, (("a", 1),))], [Choice("a", 0.1, drops=((0, "a"),))])
    >>> s = Solver(p)
    >>> s.solve(15).chosen, s.solve(11).chosen, s.solve(None, max_overhead=0.1).peak_bytes
    ((), (0,), 11)
    """

    def __init__(self, problem: Problem, options: SolverOptions | None = None):
        self.problem = problem
        self.options = SolverOptions() if options is None else options
        self.unmodified = _solution(problem, [])
        self.required = tuple(c for c, ch in enumerate(problem.choices) if ch.required)
        self.baseline = _solution(problem, self.required)
        """The plan of the required choices alone: where every search starts."""
        self.model: BaseModel = build_model(problem, scale=float(max(self.unmodified.peak_bytes, 1)))
        self._uncapped: np.ndarray | None = None
        self.nodes_used = 0
        """Branch-and-bound nodes of every solve so far (a caller's work budget across solves)."""
        self.hit_time_limit = False
        """Whether any solve so far stopped at ``options.safety_seconds`` (see
        :attr:`Solution.hit_time_limit`)."""
        self._effort = Effort()
        self._deadline = math.inf
        self._programs: dict = {}

    @property
    def _reduce(self) -> bool:  # ``options`` may be replaced between solves (new reduction sizes)
        return self.model.n_choices > self.options.reduce_above

    def solve(self, budget: int | None = None, *, max_overhead: float = 0.2) -> Solution:
        """With a budget: least cost (+ noise_weight x noise) with peak <= budget; raises
        :class:`Infeasible` (carrying the lowest-peak plan) when it cannot be met. Without: the
        lowest peak whose cost stays <= max_overhead."""
        self._effort = Effort()
        self._deadline = time.perf_counter() + self.options.safety_seconds
        try:
            if budget is None:
                cap = math.inf if max_overhead is None else max_overhead
                found = self._lowest_peak(cap, self.options.max_nodes)
                found = replace(found, bound=self._peak_bound(cap), objective=float(found.peak_bytes))
            else:
                found = self._within(budget)
                objective = float(self._weights()[list(found.chosen)].sum()) if found.chosen else 0.0
                found = replace(found, bound=self._cost_bound(budget), objective=objective)
        except Infeasible as e:  # its lowest-peak plan, with that solve's bound
            lowest = replace(e.lowest, bound=self._peak_bound(math.inf), objective=float(e.lowest.peak_bytes))
            raise Infeasible(e.budget, self._reported(lowest)) from None
        finally:
            self.nodes_used += self._effort.nodes
            self.hit_time_limit |= self._effort.hit_time_limit
        return self._reported(found)

    def peak_bound(self, max_overhead: float | None = None) -> float | None:
        """Bytes no plan costing at most ``max_overhead`` (None: any) can go below: the LP
        relaxation of the lowest-peak problem (one LP, no search; None if it is infeasible)."""
        return self._peak_bound(math.inf if max_overhead is None else max_overhead)

    def _peak_bound(self, cap: float) -> float | None:
        """Bytes no plan within ``cap`` can go below: the relaxation of the lowest-peak rung at the
        cap (the search's own, where it ran one)."""
        if not self.model.n_choices:
            return float(self.unmodified.peak_bytes)
        relaxed = self._rung(cap).relax()
        return None if relaxed is None else float(relaxed[0][-1]) * self.model.scale

    def _cost_bound(self, budget: int) -> float | None:
        """The least cost (+ noise_weight x noise) any plan within ``budget`` could have."""
        if not self.model.n_choices:
            return 0.0
        relaxed = self._budget_program(budget).relax()
        return None if relaxed is None else max(relaxed[1], 0.0)

    def _memo(self, key, build) -> Program:
        """One Program per key and objective weights (its relaxation is then computed once)."""
        key = (key, self.options.noise_weight)
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    def _budget_program(self, budget: int) -> Program:
        m = self.model
        return self._memo(("budget", budget), lambda: m.program(
            self._objective(self._weights(), peak=False), None, live_upper=budget / m.scale))

    def _reported(self, found: Solution) -> Solution:
        """``found``, saying whether this solve's safety limit stopped a search."""
        return replace(found, hit_time_limit=self._effort.hit_time_limit)

    def _solution(self, chosen) -> Solution:
        return _solution(self.problem, chosen)

    def _weights(self) -> np.ndarray:
        """What a choice costs in the objective: its cost + noise_weight x its noise."""
        return self.model.cost + self.options.noise_weight * self.model.noise

    def _objective(self, weights: np.ndarray, *, peak: bool) -> np.ndarray:
        """``weights`` per choice; for a lowest-peak solve the peak column comes last and the
        choices only break ties (x 1e-4)."""
        m = self.model
        obj = np.zeros(m.n_var + (1 if peak else 0))
        obj[:m.n_choices] = 1e-4 * weights if peak else weights
        if peak:
            obj[-1] = 1.0
        return obj

    def _uncapped_support(self) -> np.ndarray:
        """The choices the LP relaxation of "lowest peak, any overhead" uses (1 s on ResNet-50 at
        batch 64, so computed once per Solver): plans with costly choices need them free."""
        if self._uncapped is None:
            m = self.model
            program = m.program(self._objective(m.cost, peak=True), m.peak_rows(range(m.n_steps)),
                                live_upper=np.inf)
            relaxed = program.relax()
            self._uncapped = (relaxed[0][:m.n_choices] > 1e-6 if relaxed is not None
                              else np.zeros(m.n_choices, bool))
        return self._uncapped

    def _search(self, program: Program, nodes: int, start=None, *, relax: bool = True, free=None):
        """The MILP of ``program`` within ``nodes`` branch-and-bound nodes, from the plan
        ``start`` (choice indices) if given: over ``reduce_above`` choices reduced first (see
        :meth:`_reduced`), then in full below ``also_full_below`` choices (with the nodes the
        reduced MILP left, at least its root, from the reduced MILP's plan: a better incumbent
        closes the full root sooner). Returns (chosen or None, the relaxation's support or
        None)."""
        o, nc, effort = self.options, self.model.n_choices, self._effort
        given = np.zeros(nc, bool)
        given[list(start or [])] = True
        hint = (np.arange(nc), given.astype(float)) if start is not None else None
        began = effort.nodes

        def mip(upper, start=hint):
            seconds = max(self._deadline - time.perf_counter(), 1e-3)  # the safety net only
            return program.mip(upper, o.mip_rel_gap, start, max_nodes=max(nodes - (effort.nodes - began), 1),
                               effort=effort, time_limit=seconds if math.isfinite(seconds) else None)
        res, wanted = self._reduced(program, mip, given, free, relax) if self._reduce else (None, None)
        if not self._reduce or nc < o.also_full_below:
            full = mip(program.upper, hint if res is None else (np.arange(nc), res[0][:nc].round()))
            if res is None or (full is not None and full[1] < res[1] - 1e-9):
                res = full
        return (None if res is None else [c for c in range(nc) if res[0][c] > 0.5]), wanted

    def _reduced(self, program: Program, mip, given: np.ndarray, free, relax: bool):
        """LP-guided reduction (as in RINS): choices at zero in the LP relaxation are fixed to
        zero, so the MILP branches over the ~10 % the relaxation wants; the ``free`` choices
        (other relaxations' supports) and the starting plan's (``given``) stay free too. Returns
        (the MILP's result or None, the relaxation's support or None); (None, None) when the
        relaxation is infeasible."""
        nc = self.model.n_choices
        relaxed = program.relax() if relax else None
        if relax and relaxed is None:
            return None, None
        upper = program.upper.copy()
        upper[:nc] = given if free is None else given | free
        upper[list(self.required)] = 1  # never fixed to zero: their lower bound is 1
        wanted = None
        if relaxed is not None:
            wanted = relaxed[0][:nc] > 1e-6
            upper[:nc] += wanted  # 2 where both: as it always was (taking a choice twice only costs)
        return mip(upper), wanted

    def _rung(self, cap: float) -> Program:
        """Lowest peak under overhead ``cap``: L[t] <= p at every step that could be the peak (one
        that can never exceed what some step must hold is none), and cost <= cap if finite."""
        return self._memo(("peak", cap), lambda: self._build_rung(cap))

    def _build_rung(self, cap: float) -> Program:
        m = self.model
        floor = float(np.max(m.fixed)) if m.n_steps else 0.0
        extra = m.peak_rows([t for t in range(m.n_steps) if m.most[t] > floor])
        if np.isfinite(cap) and m.n_choices:
            extra = m.cost_row(cap).under(extra, m.n_var + 1)
        return m.program(self._objective(self._weights(), peak=True), extra, live_upper=np.inf)

    def _lowest_peak(self, cap: float, nodes: int) -> Solution:
        """Minimise the peak, cost as a tie-break, climbing ``options.ladder`` up to ``cap``:
        ResNet-50 at 16x3x224x224 on meta inputs, one 2 s solve: 525 MiB at cap 0.1, 606 MiB
        uncapped; with the ladder 478 MiB at caps 0.15, 0.2 and uncapped. Each rung starts from
        the best plan so far, which every looser rung also admits; the rungs share ``nodes``
        (what a rung leaves goes to the rungs after it), and the rungs below the cap search small
        supports (their relaxations', pooled), which HiGHS explores fast. The last rung also
        frees the uncapped relaxation's support (ResNet-50 with CPU-timed costs: 857 MiB without
        it, 573 MiB with it)."""
        o, effort = self.options, self._effort
        rungs = [f for f in o.ladder if f < cap] + [cap]
        best = self.baseline
        began = effort.nodes
        pool = np.zeros(self.model.n_choices, bool) if self._reduce else None
        for k, rung in enumerate(rungs):
            free = pool
            if pool is not None and k == len(rungs) - 1:
                free = pool | self._uncapped_support()
            # the nodes left, shared by the rungs left (a tight rung often closes at its root)
            share = max((nodes - (effort.nodes - began)) // (len(rungs) - k), 1)
            chosen, wanted = self._search(self._rung(rung), share, best.chosen,
                                          relax=bool(np.isfinite(rung)), free=free)
            if pool is not None and wanted is not None:
                pool |= wanted
            if chosen is not None:
                found = self._solution(chosen)
                if (found.peak_bytes, found.cost) < (best.peak_bytes, best.cost):
                    best = found
        return best

    def _within(self, budget: int) -> Solution:
        """Least cost with peak <= budget. The uncapped relaxation's support stays free too: it
        keeps an integer plan within reach when the budget's own relaxation is too sparse
        (ResNet-50 at a loose budget went to the full MILP for lack of it, 9 s). If that finds
        nothing, the lowest-peak plan decides, and if it meets the budget it starts a second
        search for a cheaper plan that does."""
        o = self.options
        program = self._budget_program(budget)
        free = self._uncapped_support().copy() if self._reduce else None
        chosen, wanted = self._search(program, o.max_nodes, free=free)
        if chosen is not None:
            return self._solution(chosen)
        if free is not None and wanted is not None:
            free |= wanted
        best = self._lowest_peak(math.inf, o.max_nodes)
        if best.peak_bytes > budget:
            raise Infeasible(budget, best)
        chosen, _ = self._search(program, o.max_nodes, best.chosen, free=free)
        return best if chosen is None else min(best, self._solution(chosen), key=lambda s: s.cost)


def solve(problem: Problem, budget: int | None = None, *, max_overhead: float = 0.2,
          options: SolverOptions | None = None) -> Solution:
    """One solve on a fresh :class:`Solver` (see :meth:`Solver.solve`); to solve the same problem
    again (another budget, a tighter target), keep a Solver instead.

    >>> p = Problem(2, [1, 5], [Saved(10, 0, 0, (("a", 1),))], [Choice("a", 0.1, drops=((0, "a"),))])
    >>> sol = solve(p, 11)
    >>> sol.chosen, sol.peak_bytes, sol.live_bytes, sol.cost
    ((0,), 11, (11, 5), 0.1)
    >>> round(sol.gap, 2)  # the LP takes 0.4 of the choice: 0.04; an integer plan must take it all
    0.6
    """
    return Solver(problem, options).solve(budget, max_overhead=max_overhead)
