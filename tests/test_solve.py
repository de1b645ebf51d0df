"""The solver on literal problems (no fx): lifetimes written as numbers, one property per test."""
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsketch.passes.solve import BudgetError, Choice, Problem, Saved, Span, evaluate, solve


def two_savers():
    # a 10-byte tensor saved by two nodes: freed only when both let go
    return Problem(5, [1, 1, 1, 1, 5], [Saved(10, 0, 1, (("a", 4), ("b", 3)))],
                   [Choice("a", 0.1, drops=((0, "a"),)), Choice("b", 0.1, drops=((0, "b"),))])


def test_evaluate_frees_only_when_every_saver_lets_go():
    p = two_savers()
    assert evaluate(p, []) == [11, 11, 11, 11, 15]
    assert evaluate(p, [0]) == [11, 11, 11, 11, 5]   # b still keeps it until step 3
    assert evaluate(p, [1]) == [11, 11, 11, 11, 15]  # a keeps it until step 4
    assert evaluate(p, [0, 1]) == [11, 11, 1, 1, 5]


def test_budget_picks_the_saver_that_matters():
    p = two_savers()
    assert solve(p, 15).chosen == ()
    sol = solve(p, 11)  # the peak at step 4 must go: dropping a alone does it
    assert sol.chosen == (0,) and sol.peak_bytes == 11
    with pytest.raises(BudgetError) as e:
        solve(p, 5)
    assert e.value.lowest == 11


def test_adds_and_exclusive_groups():
    p = Problem(4, [0, 0, 6, 6], [Saved(8, 1, 1, (("n", 3),))],
                [Choice("n", 0.5, drops=((0, "n"),), adds=(Span(2, 2, 3),)),
                 Choice("n", 0.1, drops=((0, "n"),), adds=(Span(5, 2, 3),))])
    assert evaluate(p, []) == [0, 8, 14, 14]
    assert solve(p, 11).chosen == (1,)   # cheaper, and 6 + 5 <= 11
    assert solve(p, 10).chosen == (0,)   # only the smaller sketch fits


def test_holds_keep_segment_inputs_alive():
    p = Problem(4, [0] * 4, [Saved(6, 0, 0, (("x", 1),))],
                [Choice("seg", 0.2, holds=((0, 3),))])
    assert evaluate(p, [0]) == [6, 6, 6, 6]


def test_no_budget_lowest_peak_within_overhead():
    p = two_savers()
    assert solve(p, None, max_overhead=0.05).chosen == ()
    assert solve(p, None, max_overhead=0.1).peak_bytes == 11


@st.composite
def problems(draw):
    T = draw(st.integers(2, 6))
    saved = []
    for _ in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, T - 1))
        base = draw(st.integers(start, T - 1))
        savers = tuple((k, draw(st.integers(base, T - 1))) for k in draw(st.sets(st.sampled_from("abc"), min_size=1)))
        saved.append(Saved(draw(st.integers(1, 20)), start, base, savers))
    choices = []
    for g in "abc":
        drops = tuple((i, g) for i, s in enumerate(saved) if any(k == g for k, _ in s.savers))
        a = draw(st.integers(0, T - 1))
        choices.append(Choice(g, draw(st.floats(0.01, 1)), drops=drops,
                              adds=(Span(draw(st.integers(0, 5)), a, draw(st.integers(a, T - 1))),)))
    return Problem(T, [draw(st.integers(0, 5)) for _ in range(T)], saved, choices)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 60))
def test_solver_matches_brute_force(p, budget):
    best = None
    for k in range(len(p.choices) + 1):
        for combo in itertools.combinations(range(len(p.choices)), k):
            if max(evaluate(p, combo)) <= budget:
                cost = sum(p.choices[c].cost for c in combo)
                best = cost if best is None else min(best, cost)
    if best is None:
        with pytest.raises(BudgetError):
            solve(p, budget, noise_weight=0)
    else:
        sol = solve(p, budget, noise_weight=0)
        assert sol.peak_bytes <= budget
        assert sol.cost == pytest.approx(best, rel=2e-2, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([0.0, 0.03, 0.3, 1.0, float("inf")]))
def test_lowest_peak_matches_brute_force(p, cap):
    """budget=None: the lowest peak over plans whose cost is within the cap (ladder included)."""
    best = min(max(evaluate(p, combo)) for k in range(len(p.choices) + 1)
               for combo in itertools.combinations(range(len(p.choices)), k)
               if sum(p.choices[c].cost for c in combo) <= cap)
    sol = solve(p, None, max_overhead=cap)
    assert sol.cost <= cap + 1e-9
    assert sol.peak_bytes == best


def test_a_starting_plan_is_kept_when_the_solver_has_no_time():
    """HiGHS takes the given plan as its first incumbent: with no time to search, it returns that
    plan, where without one it has none to return."""
    import numpy as np
    from scipy.sparse import csr_matrix

    from fxsketch.passes.solve import _highs
    # max x0 + x1 + x2 subject to x0 + x1 <= 1, x1 + x2 <= 1 (binary); the start (0, 1, 0) is feasible
    A = csr_matrix(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    args = (-np.ones(3), A, [-np.inf] * 2, [1.0, 1.0], np.zeros(3), np.ones(3), np.ones(3))
    assert _highs(*args, time_limit=1e-6) is None
    x, obj = _highs(*args, time_limit=1e-6, start=(np.arange(3), np.array([0.0, 1.0, 0.0])))
    assert obj == pytest.approx(-1.0) and x.round().tolist() == [0.0, 1.0, 0.0]
    x, obj = _highs(*args, time_limit=10.0, start=(np.arange(3), np.array([0.0, 1.0, 0.0])))
    assert obj == pytest.approx(-2.0)
