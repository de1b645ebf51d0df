"""The solver on literal problems (no fx): lifetimes written as numbers, one property per test."""
import contextlib
import itertools
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsketch.passes.solve import (Choice, Infeasible, Problem, Saved, Solver, SolverOptions, Span, evaluate,
                                   solve)


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
    with pytest.raises(Infeasible) as e:
        solve(p, 5)
    assert e.value.lowest.peak_bytes == 11


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
        with pytest.raises(Infeasible):
            solve(p, budget, options=SolverOptions(noise_weight=0))
    else:
        sol = solve(p, budget, options=SolverOptions(noise_weight=0))
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


def test_infeasible_carries_the_lowest_peak_plan():
    with pytest.raises(Infeasible, match="budget of 5 bytes .* 11 bytes") as e:
        solve(two_savers(), 5)
    assert e.value.budget == 5 and e.value.lowest == solve(two_savers(), None, max_overhead=float("inf"))


def _outcome(solve_for, budget):
    try:
        return solve_for(budget)
    except Infeasible as e:
        return "infeasible", e.lowest


@settings(max_examples=30, deadline=None)
@given(problems(), st.lists(st.one_of(st.none(), st.integers(0, 60)), min_size=2, max_size=3),
       st.sampled_from([0, 200]))
def test_a_reused_solver_plans_as_fresh_solves(p, budgets, reduce_above):
    """The caller's re-plan (a budget, then a tighter one) on one Solver gives the plans of fresh
    solves, on the model built once; reduce_above=0 takes the reduced MILP, whose cached uncapped
    relaxation support is then shared between the solves."""
    options = SolverOptions(reduce_above=reduce_above)
    solver = Solver(p, options)
    model = solver.model
    reused = [_outcome(lambda b: solver.solve(b, max_overhead=0.3), b) for b in budgets]
    fresh = [_outcome(lambda b: solve(p, b, max_overhead=0.3, options=options), b) for b in budgets]
    assert reused == fresh
    assert solver.model is model


@pytest.mark.parametrize("name, value", [
    ("ladder", (0.2, 0.1)), ("ladder", (0.1, 0.1)), ("ladder", (0.0,)), ("ladder", (float("inf"),)),
    ("ladder", 0.1), ("noise_weight", -1), ("noise_weight", float("nan")), ("max_nodes", 0),
    ("max_nodes", 2.0), ("safety_seconds", 0), ("safety_seconds", "60"), ("mip_rel_gap", -0.01),
    ("reduce_above", 1.5), ("reduce_above", True), ("also_full_below", -1)])
def test_solver_options_reject_bad_values(name, value):
    with pytest.raises(ValueError, match=f"SolverOptions.{name} must be .*, got "):
        SolverOptions(**{name: value})


def test_solver_options_are_frozen_with_a_tuple_ladder():
    assert SolverOptions(ladder=[0.05, 0.1]).ladder == (0.05, 0.1)
    assert SolverOptions(ladder=()).ladder == ()
    assert SolverOptions(safety_seconds=float("inf")).safety_seconds == float("inf")
    with pytest.raises(AttributeError):
        SolverOptions().max_nodes = 1


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


def chain(n: int, seed: int) -> Problem:
    """A forward/backward chain of ``n`` saved tensors, each saved by two nodes (a, b), with a
    sketch-like choice per a, a drop per b and a recompute-like choice over every 3 in a row."""
    rng = random.Random(seed)
    T = 2 * n + 1
    saved = [Saved(rng.randint(50, 200), i, i, ((f"a{i}", T - 1 - i), (f"b{i}", T - 1 - i - rng.randint(0, 2))))
             for i in range(n)]
    choices = []
    for i in range(n):
        choices.append(Choice(f"a{i}", rng.uniform(0.01, 0.1), noise=rng.uniform(0, 1), drops=((i, f"a{i}"),),
                              adds=(Span(rng.randint(5, 40), i, T - 1 - i),)))
        choices.append(Choice(f"b{i}", rng.uniform(0.01, 0.05), drops=((i, f"b{i}"),)))
        if i + 3 < n:
            seg = range(i, i + 3)
            choices.append(Choice(f"r{i}", rng.uniform(0.05, 0.2), drops=tuple((j, k + str(j)) for j in seg for k in "ab"),
                                  holds=((i, T - 3 - i),), adds=(Span(sum(saved[j].nbytes for j in seg), T - 4 - i, T - 1 - i),),
                                  covers=tuple(k + str(j) for j in seg for k in "ab")))
    return Problem(T, [rng.randint(0, 30) for _ in range(T)], saved, choices)


@contextlib.contextmanager
def cpu_burner():
    """Every core this process may use kept busy by a spinning subprocess (at most 4)."""
    n = min(len(os.sched_getaffinity(0)), 4)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_the_same_problem_gives_the_same_plan_under_load():
    """Work limits, not time limits: a search stopped by its node limit (gap 0, so it cannot
    close first) returns the same plan while a CPU burner runs beside it."""
    p = chain(30, 0)
    options = SolverOptions(mip_rel_gap=0.0, max_nodes=8)
    budget = int(0.35 * max(evaluate(p, [])))
    quiet = Solver(p, options)
    first = quiet.solve(budget)
    with cpu_burner():
        loaded = Solver(p, options)
        second = loaded.solve(budget)
    assert second == first and not first.hit_time_limit
    assert loaded.nodes_used == quiet.nodes_used > 1


def test_the_safety_limit_is_reported():
    """The wall-clock safety net only stops a search that ran past it, and says so."""
    p = chain(30, 0)
    options = SolverOptions(safety_seconds=1e-9)
    sol = solve(p, None, max_overhead=0.5, options=options)
    assert sol.hit_time_limit and sol.cost <= 0.5  # the MILPs stopped at once: the best start plan
    with pytest.raises(Infeasible) as e:  # no time to find a plan under the budget
        solve(p, int(0.35 * max(evaluate(p, []))), options=options)
    assert e.value.lowest.hit_time_limit
    assert not solve(p, None, max_overhead=0.5).hit_time_limit


def small_cnn():
    """Six conv-BN-ReLU blocks (16 channels) and a linear head, and a meta input batch for it."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    for _ in range(5):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return model, torch.empty(8, 3, 32, 32, device="meta")


def test_optimize_plans_a_small_cnn_the_same_under_load():
    """The whole planner, twice on meta inputs (roofline costs: no timing on the batch), the
    second time beside a CPU burner: the same decisions (a budget that makes it re-plan)."""
    import fxsketch
    first = fxsketch.optimize(*small_cnn(), 0.55, seed=0).memory_plan
    with cpu_burner():
        second = fxsketch.optimize(*small_cnn(), 0.55, seed=0).memory_plan
    assert first.decisions and second.decisions == first.decisions
    assert second.peak_bytes == first.peak_bytes
    assert not any("safety limit" in n for n in first.notes)


def test_a_plan_notes_the_safety_limit():
    import fxsketch
    plan = fxsketch.optimize(*small_cnn(), solver=SolverOptions(safety_seconds=1e-9)).memory_plan
    assert any("safety limit" in n and "differ from run to run" in n for n in plan.notes), plan.notes


def test_a_required_choice_is_in_every_plan():
    # choice 1 costs and adds bytes, so no search would take it; required, every plan holds it
    p = Problem(2, [1, 5], [Saved(10, 0, 0, (("a", 1),))],
                [Choice("a", 0.1, drops=((0, "a"),)), Choice("b", 0.3, adds=(Span(2, 0, 1),), required=True)])
    s = Solver(p)
    assert s.solve(None, max_overhead=1.0).chosen == (0, 1)
    assert s.solve(100).chosen == (1,)                 # a loose budget: the required one alone
    assert s.solve(13).chosen == (0, 1)
    with pytest.raises(Infeasible) as e:
        s.solve(12)                                     # 11 without it: the required bytes count
    assert e.value.lowest.chosen == (0, 1)
