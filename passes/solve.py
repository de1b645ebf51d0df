"""Choose one option per node: least estimated overhead subject to predicted peak <= budget.

Pure Python over numbers (no fx): a :class:`Problem` lists the bytes alive at every step that no
choice changes, the saved storages whose lifetime depends on who still saves them, and the
choices. A storage saved by several nodes is freed only when every one of them lets go, so its
life after the forward pass is an OR over its savers: that is what the MILP encodes (variable
y >= "saver j still keeps it" for every saver j still ahead), never a per-node sum of savings.
Solved with HiGHS through ``scipy.optimize.milp``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
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


def solve(problem: Problem, budget: int | None = None, *, max_overhead: float = 0.2,
          noise_weight: float = 0.01, time_limit: float = 4.0) -> Solution:
    """With a budget: least cost (+ noise_weight x noise) with peak <= budget.
    Without: the lowest peak whose cost stays <= max_overhead.

    Raises :class:`BudgetError` (with the lowest reachable peak) when the budget cannot be met.
    HiGHS stops after ``time_limit`` seconds per solve with the best plan found so far (the gap
    to optimal is small in practice; the plan is always feasible).
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
    step_terms: list[list[tuple[int, float]]] = [[] for _ in range(T)]
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
            for t in range(lower + 1, b + 1):
                step_terms[t].append((y, float(s.nbytes)))
    fixed = fixed + np.cumsum(diff)[:T]
    for c, ch in enumerate(problem.choices):
        for sp in ch.adds:
            for t in range(sp.start, sp.end + 1):
                step_terms[t].append((c, float(sp.nbytes)))
    groups: dict[str, list[int]] = {}
    for c, ch in enumerate(problem.choices):
        for g in (ch.group,) + ch.covers:
            groups.setdefault(g, []).append(c)
    for members in groups.values():
        if len(members) > 1:
            row([(c, 1.0) for c in members], -np.inf, 1.0)

    cost = np.array([ch.cost for ch in problem.choices])
    noise = np.array([ch.noise for ch in problem.choices])
    base_peak = max(evaluate(problem, []))
    scale = float(max(base_peak, 1))

    def run(objective, extra_rows, peak_var: bool, n_rows_before: int):
        nv = n_var + (1 if peak_var else 0)
        A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv)).tocsr() if lo else None
        cons = [LinearConstraint(A, lo, hi)] if A is not None else []
        integrality = np.zeros(nv)
        integrality[:nc] = 1
        upper = np.ones(nv)
        if peak_var:
            upper[-1] = np.inf
        res = milp(objective, constraints=cons, integrality=integrality,
                   bounds=Bounds(np.zeros(nv), upper),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-2, "disp": False})
        del rows[n_rows_before:], cols[n_rows_before:], vals[n_rows_before:]
        del lo[extra_rows:], hi[extra_rows:]
        if res.x is None:
            return None
        return [c for c in range(nc) if res.x[c] > 0.5]

    n_rows, n_entries = len(lo), len(rows)

    def lowest_peak(overhead_cap: float | None):
        # minimise the peak (scaled to ~1), cost as a tie-break
        p = n_var
        # a step whose live bytes can never exceed what some step must hold anyway cannot be the
        # peak: leave its row out (most steps, on real models; the MILP gets much smaller)
        floor = float(np.max(fixed)) if T else 0.0
        for t in range(T):
            if fixed[t] + sum(w for _, w in step_terms[t]) <= floor:
                continue
            row([(v, w / scale) for v, w in step_terms[t]] + [(p, -1.0)], -np.inf, -fixed[t] / scale)
        if overhead_cap is not None and nc:
            row([(c, cost[c]) for c in range(nc)], -np.inf, overhead_cap)
        obj = np.zeros(n_var + 1)
        obj[-1] = 1.0
        obj[:nc] = 1e-4 * (cost + noise_weight * noise)
        return run(obj, n_rows, True, n_entries)

    if budget is None:
        chosen = lowest_peak(max_overhead)
        return _solution(problem, chosen or [])

    for t in range(T):
        if fixed[t] + sum(w for _, w in step_terms[t]) > budget:  # rows that can never bind are left out
            row([(v, w) for v, w in step_terms[t]], -np.inf, budget - fixed[t])
    obj = np.zeros(n_var)
    obj[:nc] = cost + noise_weight * noise
    chosen = run(obj, n_rows, False, n_entries)
    if chosen is None:
        # infeasible, or no plan found within the time limit: the lowest-peak plan decides
        best = _solution(problem, lowest_peak(None) or [])
        if best.peak_bytes <= budget:
            return best
        raise BudgetError(f"budget of {budget} bytes is below the lowest reachable peak", best.peak_bytes)
    return _solution(problem, chosen)
