"""The MILP of a planning problem as matrices: a base model built once, the rows each kind of solve
adds to it, and the call to HiGHS.

Columns, in this order: one binary per choice; one OR variable per (saved storage, break step),
y >= "a saver still ahead keeps it", so the storage lives while any of its savers keeps it; the
live bytes L[t] of every step, in units of the unmodified peak (a well-scaled LP); and, for a
lowest-peak solve, the peak p. A solve never changes the base model: it stacks its own rows (peak
rows, a cost cap) under a copy, so one :class:`BaseModel` serves every solve on its problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Iterable

import highspy
import numpy as np
from scipy.sparse import coo_matrix, csr_matrix, vstack

from .sweep import live_bytes

if TYPE_CHECKING:
    from .solve import Problem

__all__ = ["Rows", "BaseModel", "Program", "Effort", "build_model"]

Entries = Iterable[tuple[int, float]]  # (column, coefficient) of one row

# HiGHS's MIP settings. With its RENS and RINS sub-MIP heuristics and its root restarts on, the
# problems of docs/optimize.md took 1.3-5x the CPU time for peaks within 0.7 % either way: the
# solver's own LP-guided reduction already does what RINS does.
_MIP_SETTINGS = {"mip_heuristic_run_rens": False, "mip_heuristic_run_rins": False,
                 "mip_allow_restart": False}


@dataclass
class Effort:
    """What the MILPs of a solve have used, added up by :func:`_highs`: branch-and-bound nodes
    (the work limit), and whether the wall-clock safety limit stopped one of them."""

    nodes: int = 0
    hit_time_limit: bool = False


def _highs(objective, A, lo, hi, lower, upper, integrality=None, *, time_limit=None, gap=None,
           start=None, max_nodes=None, effort: Effort | None = None) -> tuple[np.ndarray, float] | None:
    """Solve min objective @ x, lo <= A x <= hi, lower <= x <= upper (x[i] integer where
    integrality[i]); ``start`` = (indices, values) of a known plan for the integer variables,
    which HiGHS completes and keeps as its first incumbent. A MILP stops at ``max_nodes``
    branch-and-bound nodes (the root is one: it always runs), which HiGHS counts the same way on
    any load, or at ``time_limit`` seconds, which only a safety net should set; ``effort`` adds
    up what it used. Returns (x, objective) or None."""
    h = highspy._Highs()  # the base class: highspy.Highs() prints a banner to the process stdout
    h.setOptionValue("output_flag", False)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    if gap is not None:
        h.setOptionValue("mip_rel_gap", float(gap))
    if integrality is not None:
        for name, value in _MIP_SETTINGS.items():
            h.setOptionValue(name, value)
    if max_nodes is not None:
        h.setOptionValue("mip_max_nodes", int(max_nodes))
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
    if effort is not None and integrality is not None:
        effort.nodes += max(int(h.getInfo().mip_node_count), 0)  # -1 / 0: solved before the root
        effort.hit_time_limit |= h.getModelStatus() == highspy.HighsModelStatus.kTimeLimit
    if h.getInfo().primal_solution_status != 2:  # 2: a feasible solution is at hand
        return None
    x = np.asarray(h.getSolution().col_value)
    return x, float(np.dot(lp.col_cost_, x))


@dataclass(frozen=True)
class Rows:
    """Constraint rows ``lo <= A x <= hi``; ``A`` is as wide as the columns its rows use, and
    :meth:`under` widens both blocks to the solve's column count."""

    A: csr_matrix
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def of(cls, rows: Iterable[tuple[Entries, float, float]], n_cols: int) -> Rows:
        """Rows from (entries, lower, upper) triples. Entries of one column in one row add up;
        explicit zeros are kept (HiGHS sees the same matrix as it always did)."""
        r, c, v, lo, hi = [], [], [], [], []
        for k, (entries, lower, upper) in enumerate(rows):
            for col, val in entries:
                r.append(k)
                c.append(col)
                v.append(val)
            lo.append(lower)
            hi.append(upper)
        A = coo_matrix((v, (r, c)), shape=(len(lo), n_cols), dtype=float).tocsr()
        return cls(A, np.asarray(lo, dtype=float), np.asarray(hi, dtype=float))

    def widen(self, n_cols: int) -> Rows:
        """The same rows over ``n_cols`` columns (the new ones empty)."""
        return Rows(csr_matrix((self.A.data, self.A.indices, self.A.indptr), shape=(self.A.shape[0], n_cols)),
                    self.lo, self.hi)

    def under(self, top: Rows, n_cols: int) -> Rows:
        """``top``'s rows, then these, over ``n_cols`` columns (a new matrix: neither changes)."""
        return Rows(vstack([top.widen(n_cols).A, self.widen(n_cols).A], format="csr"),
                    np.concatenate([top.lo, self.lo]), np.concatenate([top.hi, self.hi]))


@dataclass(frozen=True)
class Program:
    """One MILP, ready for HiGHS: ``min objective @ x`` over the rows and the column bounds; the
    first ``n_choices`` columns are the binary choices."""

    objective: np.ndarray
    rows: Rows
    lower: np.ndarray
    upper: np.ndarray
    n_choices: int

    def relax(self) -> tuple[np.ndarray, float] | None:
        """The LP relaxation (no limit: simplex runs to the optimum; LPs here take about a
        second), computed once per Program."""
        return self._relaxation

    @cached_property
    def _relaxation(self) -> tuple[np.ndarray, float] | None:
        r = self.rows
        return _highs(self.objective, r.A, r.lo, r.hi, self.lower, self.upper)

    def mip(self, upper: np.ndarray, gap: float, start=None, *, max_nodes: int, effort: Effort,
            time_limit: float | None = None):
        """The MILP with column upper bounds ``upper`` (this program's, or a reduced copy),
        stopped at ``max_nodes`` nodes (see :func:`_highs`)."""
        integrality = np.zeros(len(self.objective))
        integrality[:self.n_choices] = 1
        r = self.rows
        return _highs(self.objective, r.A, r.lo, r.hi, self.lower, upper, integrality,
                      time_limit=time_limit, gap=gap, start=start, max_nodes=max_nodes, effort=effort)


@dataclass(frozen=True)
class BaseModel:
    """The rows every solve on one problem shares: OR-over-savers rows, one "at most one" row per
    group, and the running-sum rows that define L[t]. Built once by :func:`build_model`."""

    rows: Rows
    n_choices: int
    n_steps: int
    live: int                  # column of L[0]
    scale: float               # bytes per unit of L: the unmodified peak
    fixed: np.ndarray          # bytes alive at each step whatever is chosen
    most: np.ndarray           # the most each step could hold, every choice's bytes included
    cost: np.ndarray
    noise: np.ndarray
    required: np.ndarray       # choices every plan takes (their column's lower bound is 1)

    @property
    def n_var(self) -> int:
        """Columns without the peak: choices, OR variables, L."""
        return self.live + self.n_steps

    def peak_rows(self, steps: Iterable[int]) -> Rows:
        """L[t] <= p for each step t in ``steps`` (p: the column after L)."""
        p = self.n_var
        return Rows.of([([(self.live + t, 1.0), (p, -1.0)], -np.inf, 0.0) for t in steps], p + 1)

    def cost_row(self, cap: float) -> Rows:
        """Total cost <= ``cap`` (every choice listed, zero costs included)."""
        return Rows.of([(list(enumerate(self.cost)), -np.inf, cap)], self.n_choices)

    def program(self, objective: np.ndarray, extra: Rows | None, *, live_upper: float) -> Program:
        """The base rows with ``extra`` under them and L[t] <= ``live_upper``; one column more than
        :attr:`n_var` (the peak, unbounded above) when ``objective`` has one."""
        nv = len(objective)
        upper = np.ones(nv)
        upper[self.live:self.n_var] = live_upper
        lower = np.zeros(nv)
        lower[self.live:self.n_var] = -np.inf
        lower[:self.n_choices][self.required] = 1.0
        if nv > self.n_var:
            upper[-1] = np.inf
        rows = self.rows.widen(nv) if extra is None else extra.under(self.rows, nv)
        return Program(np.asarray(objective, dtype=float), rows, lower, upper, self.n_choices)


def _keepers(problem: Problem, i: int, drops_of, holds_of):
    """Storage ``i``'s last step that no choice can cut short, and the keepers after it: (step,
    terms, constant) with "keeps it" = constant + sum of coefficient x choice over terms."""
    s = problem.saved[i]
    const_end = max([s.base_end] + [st for key, st in s.savers if (i, key) not in drops_of])
    keepers = [(st, [(c, -1.0) for c in drops_of[(i, key)]], 1.0)
               for key, st in s.savers if (i, key) in drops_of and st > const_end]
    keepers += [(st, [(c, 1.0)], 0.0) for c, st in holds_of.get(i, ()) if st > const_end]
    return const_end, keepers


def _or_rows(problem: Problem, first: int):
    """OR rows of every saved storage, its OR variables numbered from ``first``. Returns the rows,
    the spans (variable, bytes, first step, last step) they make live, and the (bytes, first,
    last) spans that live whatever is chosen."""
    drops_of: dict[tuple[int, str], list[int]] = {}
    holds_of: dict[int, list[tuple[int, int]]] = {}
    for c, ch in enumerate(problem.choices):
        for d in ch.drops:
            drops_of.setdefault(d, []).append(c)
        for i, step in ch.holds:
            holds_of.setdefault(i, []).append((c, step))
    rows, spans, always, y = [], [], [], first
    for i, s in enumerate(problem.saved):
        const_end, keepers = _keepers(problem, i, drops_of, holds_of)
        always.append((s.nbytes, s.start, const_end))
        breaks = sorted({k[0] for k in keepers}, reverse=True)
        for k, b in enumerate(breaks):
            # between the next break and b it lives while a keeper ahead keeps it: y >= constant +
            # terms of each keeper whose step is in [b, previous break), and y >= the previous
            # break's y (which covers every keeper further ahead): rows linear in the keepers, not
            # quadratic (a DenseNet input held by dozens of replays), the same LP
            rows += [([(y, 1.0)] + [(c, -v) for c, v in terms], const, np.inf)
                     for st, terms, const in keepers if st >= b and (k == 0 or st < breaks[k - 1])]
            if k:
                rows.append(([(y, 1.0), (y - 1, -1.0)], 0.0, np.inf))
            spans.append((y, s.nbytes, (breaks[k + 1] if k + 1 < len(breaks) else const_end) + 1, b))
            y += 1
    return rows, spans, always


def _group_rows(problem: Problem):
    """At most one choice per group (a choice's ``covers`` count as its groups too)."""
    groups: dict[str, list[int]] = {}
    for c, ch in enumerate(problem.choices):
        for g in (ch.group,) + ch.covers:
            groups.setdefault(g, []).append(c)
    return [([(c, 1.0) for c in members], -np.inf, 1.0) for members in groups.values() if len(members) > 1]


def _running_sum_rows(spans, fixed: np.ndarray, live: int, scale: float):
    """L[t] = L[t-1] + (bytes that start at t) - (bytes that ended at t-1) + the change in fixed
    bytes: each span enters two rows, not one per step it is alive (a far sparser matrix than
    "sum of everything alive at t", hence much faster LPs)."""
    T = len(fixed)
    starts: list[list[tuple[int, float]]] = [[] for _ in range(T + 1)]
    ends: list[list[tuple[int, float]]] = [[] for _ in range(T + 1)]
    for v, nbytes, a, b in spans:
        starts[a].append((v, nbytes / scale))
        ends[b + 1].append((v, nbytes / scale))
    rows = []
    for t in range(T):
        entries = [(live + t, 1.0)] + ([(live + t - 1, -1.0)] if t else [])
        entries += [(v, -w) for v, w in starts[t]] + [(v, w) for v, w in ends[t]]
        step = (fixed[t] - (fixed[t - 1] if t else 0.0)) / scale
        rows.append((entries, step, step))
    return rows


def build_model(problem: Problem, scale: float) -> BaseModel:
    """The base model of ``problem``, L in units of ``scale`` bytes (the unmodified peak)."""
    nc, T = len(problem.choices), problem.n_steps
    or_rows, spans, always = _or_rows(problem, nc)
    live = nc + len(spans)
    fixed = np.asarray(live_bytes(T, always, problem.fixed), dtype=float)
    spans += [(c, sp.nbytes, sp.start, sp.end) for c, ch in enumerate(problem.choices) for sp in ch.adds]
    # the most a step could hold: every choice's bytes, none of the negative ones (workspace a
    # choice frees, passes.options.chunk)
    most = np.asarray(live_bytes(T, [(w, a, b) for _, w, a, b in spans if w > 0], fixed), dtype=float)
    rows = Rows.of(or_rows + _group_rows(problem) + _running_sum_rows(spans, fixed, live, scale), live + T)
    cost = np.array([ch.cost for ch in problem.choices])
    noise = np.array([ch.noise for ch in problem.choices])
    required = np.array([ch.required for ch in problem.choices], dtype=bool)
    for a in (rows.lo, rows.hi, fixed, most, cost, noise, required):  # shared by every solve: nobody writes to them
        a.flags.writeable = False
    return BaseModel(rows, nc, T, live, scale, fixed, most, cost, noise, required)
