"""The solver alone on ResNet-50's planning problems: one solve per cap vs the cap ladder.

    .venv/bin/python tools/bench_solver.py                 # meta 16 and 64, CPU-timed 16
    .venv/bin/python tools/bench_solver.py --problems cpu64n4   # + the 64x224^2 max_grad_noise=4 one

Each problem is the exact :class:`fxsketch.passes.solve.Problem` that ``optimize`` builds (captured
where it makes its Solver): "meta" = meta inputs (roofline costs, uncalibrated probes), "cpu" =
real random inputs (probe ranks calibrated, costs from measured node times). It is then solved
with the ladder of ``SolverOptions()`` as shipped and with an empty ladder (a single solve at the
cap, as before the ladder), at ``--time-limit`` seconds. Printed: the solver's predicted peak (its
own model, not the rewritten graph's re-analysis) and wall time. Results depend on machine load.
"""
from __future__ import annotations

import argparse
import time

import torch

import fxsketch
from fxsketch import pipeline
from fxsketch.passes import solve as S

PROBLEMS = {  # name: (batch, meta input, max_grad_noise)
    "meta16": (16, True, 1.0), "meta64": (64, True, 1.0),
    "cpu16": (16, False, 1.0), "cpu64n4": (64, False, 4.0),
}


class _Captured(Exception):
    pass


def capture(batch: int, meta: bool, noise: float) -> S.Problem:
    import torchvision
    got = []

    class Grab:  # stands in for the Solver that optimize makes: keeps its problem, stops optimize
        def __init__(self, problem, *args, **kwargs):
            got.append(problem)
            raise _Captured

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x = torch.empty(batch, 3, 224, 224, device="meta") if meta else torch.randn(batch, 3, 224, 224)
    real = pipeline.Solver
    pipeline.Solver = Grab
    try:
        fxsketch.optimize(model, (x,), None, max_overhead=0.15, seed=0, progress=False, max_grad_noise=noise)
    except _Captured:
        pass
    finally:
        pipeline.Solver = real
    return got[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="*", default=["meta16", "meta64", "cpu16"], choices=list(PROBLEMS))
    ap.add_argument("--caps", nargs="*", type=float, default=[0.15, 0.2, float("inf")])
    ap.add_argument("--time-limit", type=float, default=2.0)
    args = ap.parse_args(argv)
    shipped = S.SolverOptions().ladder
    print(f"| problem | choices | cap | single solve | ladder {shipped} |")
    print("|---|---|---|---|---|")
    for name in args.problems:
        problem = capture(*PROBLEMS[name])
        for cap in args.caps:
            cells = []
            for ladder in ((), shipped):
                options = S.SolverOptions(ladder=ladder, time_limit=args.time_limit)
                t = time.perf_counter()
                sol = S.solve(problem, None, max_overhead=cap, options=options)
                cells.append(f"{sol.peak_bytes / 2**20:.0f} MiB ({time.perf_counter() - t:.1f} s)")
            print(f"| {name} | {len(problem.choices)} | {cap:g} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
