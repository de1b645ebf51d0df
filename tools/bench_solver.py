"""The solver alone on captured planning problems: plan, peak and wall time under the defaults.

    .venv/bin/python tools/bench_solver.py                      # ResNet-50 meta 16 and 64, small models
    .venv/bin/python tools/bench_solver.py --problems cpu16     # real inputs (calibrated, timed nodes)
    .venv/bin/python tools/bench_solver.py --burn               # run 2 of 3 beside a CPU burner
    .venv/bin/python tools/bench_solver.py --against 694381a    # also the solver of that commit

Each problem is the exact :class:`fxsketch.passes.solve.Problem` that ``optimize`` hands its
Solver (``pipeline.analyse`` + ``pipeline.propose``, ``max_overhead=0.15``, ``seed=0``): "meta" =
meta inputs (roofline costs, uncalibrated probes), "cpu" = real random inputs (probe noise
calibrated, costs from measured node times: that problem itself changes with load, the solve on
it does not). Every cell is solved ``--runs`` times on a fresh :class:`Solver` with
``SolverOptions()`` as shipped (``--max-nodes`` overrides the node limit): a lowest-peak solve
per ``--caps`` entry, and a budget solve per ``--budgets`` fraction of the unmodified peak.
Printed: the solver's predicted peak (its own model, not the rewritten graph's re-analysis), the
estimated overhead, the nodes used, the wall time of each run, the CPU time of the first (this
process, HiGHS's threads included: less sensitive to other load than wall time), and whether
every run chose the same plan (the solver is bounded by nodes, not seconds, so it should). ``--against REV`` also
solves every cell with ``passes/solve.py`` as it was at git revision REV (its own defaults), on the
same problem: the time-limited solver before this one, say. ``--highs-defaults`` runs HiGHS with
its own MIP settings instead of the ones ``passes/solver_model.py`` sets.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxsketch
from fxsketch import pipeline
from fxsketch.passes import solve as S
from fxsketch.passes import solver_model


def _resnet50():
    import torchvision
    return torchvision.models.resnet50()


def _torchvision(name):
    import torchvision
    return getattr(torchvision.models, name)()


def _unet3d():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


PROBLEMS = {  # name: (model factory, input shape, meta input, max_grad_noise)
    "meta16": (_resnet50, (16, 3, 224, 224), True, 1.0),
    "meta64": (_resnet50, (64, 3, 224, 224), True, 1.0),
    "cpu16": (_resnet50, (16, 3, 224, 224), False, 1.0),
    "cpu64n4": (_resnet50, (64, 3, 224, 224), False, 4.0),
    "resnet18": (lambda: _torchvision("resnet18"), (16, 3, 224, 224), True, 1.0),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), (32, 3, 224, 224), True, 1.0),
    "unet3d": (_unet3d, (2, 1, 128, 128, 128), True, 1.0),
}
DEFAULT = ["meta16", "meta64", "resnet18", "mobilenet_v2", "unet3d"]


def capture(make, shape, meta: bool, noise: float) -> S.Problem:
    """The problem ``optimize(model, (x,), None, max_overhead=0.15, seed=0)`` solves."""
    torch.manual_seed(0)
    model = make()
    x = torch.empty(shape, device="meta") if meta else torch.randn(shape)
    config = fxsketch.Config.from_options(max_overhead=0.15, seed=0, progress=False, max_grad_noise=noise)
    analysis = pipeline.analyse(model, (x,))
    return pipeline.propose(model, analysis, config).candidates.problem


def _solve(problem: S.Problem, budget: int | None, cap: float, options: S.SolverOptions):
    solver = S.Solver(problem, options)
    t, cpu = time.perf_counter(), time.process_time()
    try:
        sol = solver.solve(budget, max_overhead=cap)
    except S.Infeasible as e:
        sol = e.lowest
    return (sol, budget is not None and sol.peak_bytes > budget, solver.nodes_used, time.perf_counter() - t,
            time.process_time() - cpu)


def _solver_at(rev: str):
    """``passes/solve.py`` (with the solver_model and sweep it imports) as of git revision ``rev``,
    imported as a package of its own from a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="fxsketch_solver_"))
    (root / "_solver_at").mkdir()
    (root / "_solver_at" / "__init__.py").write_text("")
    repo = Path(__file__).resolve().parents[1]
    for name in ("solve", "solver_model", "sweep"):
        text = subprocess.run(["git", "show", f"{rev}:passes/{name}.py"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
        (root / "_solver_at" / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("_solver_at.solve")


def _solve_with(old, problem: S.Problem, budget: int | None, cap: float):
    """One solve with the module ``old`` (see :func:`_solver_at`) on ``problem``, rebuilt from its
    own dataclasses. Returns (chosen, peak bytes, infeasible, wall seconds, CPU seconds)."""
    choices = [old.Choice(c.group, c.cost, c.noise, c.drops, tuple(old.Span(a.nbytes, a.start, a.end) for a in c.adds),
                          c.holds, c.covers) for c in problem.choices]
    saved = [old.Saved(s.nbytes, s.start, s.base_end, s.savers) for s in problem.saved]
    p = old.Problem(problem.n_steps, list(problem.fixed), saved, choices)
    t, cpu = time.perf_counter(), time.process_time()
    try:
        sol = old.solve(p, budget, max_overhead=cap)
    except old.Infeasible as e:
        sol = e.lowest
    return (sol.chosen, sol.peak_bytes, budget is not None and sol.peak_bytes > budget, time.perf_counter() - t,
            time.process_time() - cpu)


class _Burner:
    """A subprocess spinning on every core (at most 4) while it is open."""

    def __enter__(self):
        import os
        n = min(len(os.sched_getaffinity(0)), 4)
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="*", default=DEFAULT, choices=list(PROBLEMS))
    ap.add_argument("--caps", nargs="*", type=float, default=[0.15, 0.2, float("inf")])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.6, 0.35],
                    help="budget solves at these fractions of the unmodified peak")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--burn", action="store_true", help="run 2 beside a CPU burner on every core")
    ap.add_argument("--max-nodes", type=int, default=S.SolverOptions().max_nodes)
    ap.add_argument("--against", metavar="REV", help="also solve with passes/solve.py of this git revision")
    ap.add_argument("--highs-defaults", action="store_true",
                    help="HiGHS's own MIP settings (RENS, RINS, restarts on), not fxsketch's")
    args = ap.parse_args(argv)
    if args.highs_defaults:
        solver_model._MIP_SETTINGS.clear()
    options = S.SolverOptions(max_nodes=args.max_nodes)
    old = _solver_at(args.against) if args.against else None
    extra = f" {args.against}: peak | wall s | CPU s | same plan |" if old else ""
    print(f"| problem | choices | solve | peak | est. overhead | nodes | wall s (runs) | CPU s | same plan |{extra}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if old else ""))
    for name in args.problems:
        problem = capture(*PROBLEMS[name])
        base = S.evaluate(problem, [])
        cells = [(None, cap, f"cap {cap:g}") for cap in args.caps]
        cells += [(int(f * max(base)), float("inf"), f"budget {f:g}") for f in args.budgets]
        for budget, cap, label in cells:
            runs = [_run(args, k, lambda: _solve(problem, budget, cap, options)) for k in range(args.runs)]
            sol, infeasible, nodes, _, cpu = runs[0]
            same = all(r[0] == sol for r in runs)
            timed_out = " (safety limit hit)" if any(r[0].hit_time_limit for r in runs) else ""
            row = (f"| {name} | {len(problem.choices)} | {label} | {_peak(sol.peak_bytes, infeasible)} | "
                   f"{100 * sol.cost:.1f} % | {nodes} | {_seconds(r[3] for r in runs)} | {cpu:.1f} | "
                   f"{'yes' if same else 'NO'}{timed_out} |")
            if old:
                before = [_run(args, k, lambda: _solve_with(old, problem, budget, cap)) for k in range(args.runs)]
                peaks = sorted({_peak(r[1], r[2]) for r in before})
                row += (f" {' or '.join(peaks)} | {_seconds(r[3] for r in before)} | {before[0][4]:.1f} | "
                        f"{'yes' if len({r[0] for r in before}) == 1 else 'NO'} |")
            print(row, flush=True)


def _run(args, k: int, solve):
    """Run ``k`` of a cell: beside the CPU burner if ``--burn`` and it is the second."""
    if args.burn and k == 1:
        with _Burner():
            return solve()
    return solve()


def _peak(nbytes: int, infeasible: bool) -> str:
    return f"{nbytes / 2**20:.1f} MiB" + (" (infeasible: lowest)" if infeasible else "")


def _seconds(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
