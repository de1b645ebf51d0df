"""Choose one option per node: least estimated overhead subject to predicted peak <= budget.

Pure Python over numbers (no fx): a :class:`Problem` lists the bytes alive at every step that no
choice changes, the saved storages whose lifetime depends on who still saves them, and the
choices. A storage saved by several nodes is freed only when every one of them lets go, so its
life after the forward pass is an OR over its savers: that is what the MILP encodes (variable
y >= "saver j still keeps it" for every saver j still ahead), never a per-node sum of savings.
Solved with HiGHS through ``highspy``, which takes a starting plan: a lowest-peak solve climbs a
ladder of overhead caps, each rung starting from the best plan found so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import time

import highspy
import numpy as np
from scipy.sparse import coo_matrix

__all__ = ["Span", "Saved", "Choice", "Problem", "Solution", "BudgetError", "evaluate", "solve"]


class BudgetError(ValueError):
    """The budget cannot be met; ``lowest`` is the lowest reachable predicted peak (bytes)."""

    def __init__(self, message: str, lowest: int):
        super().__init__(message)
        self.lowest = lowest


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


def evaluate(problem: Problem, chosen) -> list[int]:
    """Live bytes per step when the choices ``chosen`` (indices) are applied.

    >>> p = Problem(3, [0, 0, 0], [Saved(8, 0, 0, (("a", 2),))], [Choice("a", 0.1, drops=((0, "a"),))])
    >>> evaluate(p, []), evaluate(p, [0])
    ([8, 8, 8], [8, 0, 0])
    """
    chosen = set(chosen)
    delta = [0] * (problem.n_steps + 1)

    def add(n, a, b):
        delta[a] += n
        delta[b + 1] -= n

    dropped = {d for c in chosen for d in problem.choices[c].drops}
    for i, s in enumerate(problem.saved):
        end = max([s.base_end] + [step for key, step in s.savers if (i, key) not in dropped]
                  + [step for c in chosen for j, step in problem.choices[c].holds if j == i])
        add(s.nbytes, s.start, end)
    for c in chosen:
        for sp in problem.choices[c].adds:
            add(sp.nbytes, sp.start, sp.end)
    live, run = [], 0
    for t in range(problem.n_steps):
        run += delta[t]
        live.append(problem.fixed[t] + run)
    return live


def _solution(problem: Problem, chosen) -> Solution:
    live = evaluate(problem, chosen)
    return Solution(tuple(sorted(chosen)), max(live), tuple(live),
                    sum(problem.choices[c].cost for c in chosen))


# overhead caps (fractions of the step) that lowest-peak solves climb through, see solve()
LADDER = (0.1,)


def _highs(objective, A, lo, hi, lower, upper, integrality=None, *, time_limit=None, gap=None,
           start=None) -> tuple[np.ndarray, float] | None:
    """Solve min objective @ x, lo <= A x <= hi, lower <= x <= upper (x[i] integer where
    integrality[i]); ``start`` = (indices, values) of a known plan for the integer variables,
    which HiGHS completes and keeps as its first incumbent. Returns (x, objective) or None."""
    h = highspy._Highs()  # the base class: highspy.Highs() prints a banner to the process stdout
    h.setOptionValue("output_flag", False)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    if gap is not None:
        h.setOptionValue("mip_rel_gap", float(gap))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
    lp.col_cost_ = np.asarray(objective, dtype=float)
    lp.col_lower_, lp.col_upper_ = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    lp.row_lower_, lp.row_upper_ = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    csc = A.tocsc()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_ = csc.indptr, csc.indices
    lp.a_matrix_.value_ = csc.data.astype(float)
    if integrality is not None:
        lp.integrality_ = [highspy.HighsVarType.kInteger if v else highspy.HighsVarType.kContinuous
                           for v in integrality]
    h.passModel(lp)
    if start is not None:
        idx, val = start
        h.setSolution(len(idx), np.asarray(idx, dtype=np.int32), np.asarray(val, dtype=float))
    h.run()
    if h.getInfo().primal_solution_status != 2:  # 2: a feasible solution is at hand
        return None
    x = np.asarray(h.getSolution().col_value)
    return x, float(np.dot(lp.col_cost_, x))


def solve(problem: Problem, budget: int | None = None, *, max_overhead: float = 0.2,
          noise_weight: float = 0.01, time_limit: float = 2.0, mip_rel_gap: float = 0.02,
          reduce_above: int = 200, also_full_below: int = 400) -> Solution:
    """With a budget: least cost (+ noise_weight x noise) with peak <= budget.
    Without: the lowest peak whose cost stays <= max_overhead.

    Raises :class:`BudgetError` (with the lowest reachable peak) when the budget cannot be met.
    Problems with more than ``reduce_above`` choices are first solved as an LP; choices at zero
    there are fixed to zero and the MILP runs over the rest (LP-guided reduction; on ResNet-50 it
    finds the same plan as the full MILP in a fraction of the time). Up to ``also_full_below``
    choices the full MILP runs as well and the better plan is kept (the reduction can leave out
    what the optimum needs: r3d_18 lost 3 % of its peak that way). HiGHS stops at
    ``mip_rel_gap``, or after ``time_limit`` seconds with the best plan found so far (always
    feasible); a lowest-peak solve climbs the caps of ``LADDER`` up to ``max_overhead``, each rung
    starting from the best plan so far, the rungs sharing ``time_limit``.
    """
    nc = len(problem.choices)
    T = problem.n_steps
    fixed = np.asarray(problem.fixed, dtype=float)
    rows, cols, vals = [], [], []          # the constraint matrix, built row by row
    lo, hi = [], []

    def row(entries, lower, upper):
        r = len(lo)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(lower)
        hi.append(upper)

    drops_of: dict[tuple[int, str], list[int]] = {}
    holds_of: dict[int, list[tuple[int, int]]] = {}
    for c, ch in enumerate(problem.choices):
        for d in ch.drops:
            drops_of.setdefault(d, []).append(c)
        for i, step in ch.holds:
            holds_of.setdefault(i, []).append((c, step))

    n_var = nc
    spans: list[tuple[int, float, int, int]] = []  # (variable, bytes, first step, last step)
    diff = np.zeros(T + 1)
    for i, s in enumerate(problem.saved):
        const_end = max([s.base_end] + [st for key, st in s.savers if (i, key) not in drops_of])
        diff[s.start] += s.nbytes
        diff[const_end + 1] -= s.nbytes
        keepers = [(st, [(c, -1.0) for c in drops_of[(i, key)]], 1.0)
                   for key, st in s.savers if (i, key) in drops_of and st > const_end]
        keepers += [(st, [(c, 1.0)], 0.0) for c, st in holds_of.get(i, ()) if st > const_end]
        breaks = sorted({k[0] for k in keepers}, reverse=True)
        for k, b in enumerate(breaks):
            y = n_var
            n_var += 1
            for st, terms, const in keepers:
                if st >= b:  # y >= const + sum(terms): the storage lives while any keeper ahead keeps it
                    row([(y, 1.0)] + [(c, -v) for c, v in terms], const, np.inf)
            lower = breaks[k + 1] if k + 1 < len(breaks) else const_end
            spans.append((y, float(s.nbytes), lower + 1, b))
    fixed = fixed + np.cumsum(diff)[:T]
    for c, ch in enumerate(problem.choices):
        for sp in ch.adds:
            spans.append((c, float(sp.nbytes), sp.start, sp.end))
    groups: dict[str, list[int]] = {}
    for c, ch in enumerate(problem.choices):
        for g in (ch.group,) + ch.covers:
            groups.setdefault(g, []).append(c)
    for members in groups.values():
        if len(members) > 1:
            row([(c, 1.0) for c in members], -np.inf, 1.0)

    # Live bytes as a running sum: L[t] = L[t-1] + (bytes that start at t) - (bytes that ended at
    # t-1), so each span enters two rows instead of one row per step it is alive (a far sparser
    # matrix than "sum of everything alive at t", hence much faster LPs).
    scale = float(max(max(evaluate(problem, [])), 1))
    starts: list[list[tuple[int, float]]] = [[] for _ in range(T + 1)]
    ends: list[list[tuple[int, float]]] = [[] for _ in range(T + 1)]
    most = np.zeros(T + 1)  # the most each step could hold: the rows that can never bind are left out
    for v, w, a, b in spans:
        starts[a].append((v, w / scale))
        ends[b + 1].append((v, w / scale))
        most[a] += w
        most[b + 1] -= w
    most = fixed + np.cumsum(most)[:T]
    L = n_var
    n_var += T
    for t in range(T):
        entries = [(L + t, 1.0)] + ([(L + t - 1, -1.0)] if t else [])
        entries += [(v, -w) for v, w in starts[t]] + [(v, w) for v, w in ends[t]]
        step = (fixed[t] - (fixed[t - 1] if t else 0.0)) / scale
        row(entries, step, step)

    cost = np.array([ch.cost for ch in problem.choices])
    noise = np.array([ch.noise for ch in problem.choices])

    def run(objective, upper_live: float, peak_var: bool, n_rows_before: int, n_entries_before: int,
            limit: float, start: list[int] | None = None, relax: bool = True, free=None):
        nv = n_var + (1 if peak_var else 0)
        A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv)).tocsr()
        integrality = np.zeros(nv)
        integrality[:nc] = 1
        upper = np.ones(nv)
        upper[L:L + T] = upper_live
        lower = np.zeros(nv)
        lower[L:L + T] = -np.inf
        if peak_var:
            upper[-1] = np.inf
        given = np.zeros(nc, bool)
        given[start or []] = True
        hint = (np.arange(nc), given.astype(float)) if start is not None else None
        began = time.perf_counter()  # ``limit`` covers the relaxation too

        def solve_mip(up):
            left = max(limit - (time.perf_counter() - began), 0.1)
            return _highs(objective, A, lo, hi, lower, up, integrality, time_limit=left,
                          gap=mip_rel_gap, start=hint)
        res = None
        if nc > reduce_above:
            # LP-guided reduction (as in RINS): choices at zero in the LP relaxation are fixed to
            # zero, so the MILP branches over the ~10 % the relaxation wants; ``free`` choices
            # (other relaxations' supports) and the starting plan's stay free too; exact MILP if
            # that finds nothing
            relaxed = _highs(objective, A, lo, hi, lower, upper) if relax else None
            if relaxed is not None or not relax:
                fixed_upper = upper.copy()
                fixed_upper[:nc] = given if free is None else given | free
                if relaxed is not None:
                    fixed_upper[:nc] += relaxed[0][:nc] > 1e-6
                res = solve_mip(fixed_upper)
                if relaxed is not None and free is not None:
                    free |= relaxed[0][:nc] > 1e-6
        if res is None or nc < also_full_below:
            full = solve_mip(upper)
            if res is None or (full is not None and full[1] < res[1] - 1e-9):
                res = full
        del rows[n_entries_before:], cols[n_entries_before:], vals[n_entries_before:]
        del lo[n_rows_before:], hi[n_rows_before:]
        if res is None:
            return None
        return [c for c in range(nc) if res[0][c] > 0.5]

    n_rows, n_entries = len(lo), len(rows)
    cached: list[np.ndarray] = []

    def support() -> np.ndarray:
        # choices the LP relaxation of "lowest peak, any overhead" uses (computed once, on the
        # base rows: call it before any solve adds its own)
        assert len(lo) == n_rows
        if not cached:
            p = n_var
            entries_before, rows_before = len(rows), len(lo)
            for t in range(T):
                row([(L + t, 1.0), (p, -1.0)], -np.inf, 0.0)
            A = coo_matrix((vals, (rows, cols)), shape=(len(lo), n_var + 1)).tocsr()
            obj = np.zeros(n_var + 1)
            obj[-1] = 1.0
            obj[:nc] = 1e-4 * cost
            lower = np.zeros(n_var + 1)
            lower[L:L + T] = -np.inf
            upper = np.ones(n_var + 1)
            upper[L:L + T] = np.inf
            upper[-1] = np.inf
            relaxed = _highs(obj, A, lo, hi, lower, upper)
            del rows[entries_before:], cols[entries_before:], vals[entries_before:]
            del lo[rows_before:], hi[rows_before:]
            cached.append(relaxed[0][:nc] > 1e-6 if relaxed is not None else np.zeros(nc, bool))
        return cached[0]

    def lowest_peak(overhead_cap: float | None) -> Solution:
        """Minimise the peak (scaled to ~1), cost as a tie-break, over a ladder of overhead caps
        up to ``overhead_cap``: HiGHS finds good plans quickly under a tight cap and poorly under
        a loose one (ResNet-50 at 16x3x224x224 on meta inputs, one 2 s solve: 525 MiB at cap 0.1,
        606 MiB uncapped; with the ladder 478 MiB at caps 0.15, 0.2 and uncapped), so each rung
        starts from the best plan so far, which every looser rung also admits."""
        cap = np.inf if overhead_cap is None else overhead_cap
        rungs = [f for f in LADDER if f < cap] + [cap]
        best = _solution(problem, [])
        floor = float(np.max(fixed)) if T else 0.0
        deadline = time.perf_counter() + time_limit  # for everything below, LPs included
        # the choices the rungs' relaxations so far wanted: a rung's reduced MILP may use them
        pool = np.zeros(nc, bool) if nc > reduce_above else None
        for k, rung in enumerate(rungs):
            last = k == len(rungs) - 1
            # the uncapped relaxation (1 s on ResNet-50 at batch 64): for the last rung only
            uncapped = support() if last and pool is not None else None
            # the time left, shared by the rungs left (a tight rung often finishes early)
            limit = max((deadline - time.perf_counter()) / (len(rungs) - k), 0.1)
            p = n_var
            for t in range(T):
                if most[t] > floor:  # a step that can never exceed what some step must hold is no peak
                    row([(L + t, 1.0), (p, -1.0)], -np.inf, 0.0)
            if np.isfinite(rung) and nc:
                row([(c, cost[c]) for c in range(nc)], -np.inf, rung)
            obj = np.zeros(n_var + 1)
            obj[-1] = 1.0
            obj[:nc] = 1e-4 * (cost + noise_weight * noise)
            # The rungs below the cap search small supports (their relaxations', the pool's), which
            # HiGHS explores fast; the last rung also frees the uncapped relaxation's support,
            # which plans with costly choices need (ResNet-50 with CPU-timed costs: 857 MiB
            # without it, 573 MiB with it). Uncapped, the rung's relaxation is that one.
            free = None if pool is None else (pool | uncapped if last else pool)  # run() adds to it
            chosen = run(obj, np.inf, True, n_rows, n_entries, limit, list(best.chosen),
                         relax=bool(np.isfinite(rung)), free=free)
            if chosen is not None:
                found = _solution(problem, chosen)
                if (found.peak_bytes, found.cost) < (best.peak_bytes, best.cost):
                    best = found
        return best

    if budget is None:
        return lowest_peak(max_overhead)

    obj = np.zeros(n_var)
    obj[:nc] = cost + noise_weight * noise
    # the lowest-peak relaxation's support stays free too: it keeps an integer plan within reach
    # when the budget's own relaxation is too sparse (ResNet-50 at a loose budget went to the
    # full MILP for lack of it, 9 s)
    free = support().copy() if nc > reduce_above else None
    chosen = run(obj, budget / scale, False, n_rows, n_entries, time_limit, free=free)
    if chosen is None:
        # infeasible, or no plan found within the time limit: the lowest-peak plan decides, and
        # if it meets the budget it starts a second search for a cheaper plan that does
        best = lowest_peak(None)
        if best.peak_bytes > budget:
            raise BudgetError(f"budget of {budget} bytes is below the lowest reachable peak", best.peak_bytes)
        chosen = run(obj, budget / scale, False, n_rows, n_entries, time_limit, list(best.chosen), free=free)
        return best if chosen is None else min(best, _solution(problem, chosen), key=lambda s: s.cost)
    return _solution(problem, chosen)
