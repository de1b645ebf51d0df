"""Peak memory and step time of one training step: eager, optimized, optimized + torch.compile.

    .venv/bin/python tools/bench_compile.py                       # resnet18, 8x3x64x64, inductor
    .venv/bin/python tools/bench_compile.py --model torchvision.models:resnet50 --input 8x3x64x64

For a model (an importable ``module:callable`` that builds it, seeded), four modules are
measured on the same seeded batch: the model itself, ``torch.compile(model)``, ``gm =
fxsketch.optimize(model, (x,), seed=0, progress=False)`` (default settings otherwise) and
``torch.compile(gm)``. A step is ``loss = fxsketch.measurement.default_loss(module(x));
loss.backward()`` (what the plans predict; no optimizer step).

* memory: ``fxsketch.measure(module, (x,), level="process")`` for every row: resident bytes +
  the rise of peak RSS during one step in a fresh process (a compiled module is pickled and
  compiles again there, in its warm-up step, from the inductor cache this run filled). The
  live-tensor tracker (``level="tensor"``) is shown for the uncompiled rows only: it is a
  TorchDispatchMode, and dynamo does not run compiled code while one is active, so under it a
  compiled module runs eagerly and the tracker would report the uncompiled step.
* time: the median of ``--steps`` steps after ``--warmup`` steps in this process; the first
  step, which traces and compiles a compiled module, is reported apart. Inductor compiles into
  a fresh cache directory unless TORCHINDUCTOR_CACHE_DIR is set: a cold compile.
* predicted: ``fxsketch.plan(model, (x,))`` and ``gm.memory_plan``, process level (kernel
  workspace included). A plan models the eager step; the compiled rows show what inductor
  makes of it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# before torch is imported: inductor fixes its cache directory (this variable) on first use
FRESH_CACHE = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_compile-inductor-"))

import torch  # noqa: E402

import fxsketch  # noqa: E402
from fxsketch.measurement import default_loss  # noqa: E402


def build(spec: str):
    """The callable named by ``module:attr`` (e.g. torchvision.models:resnet18)."""
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model must be module:callable, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def step(module, x) -> float:
    """Seconds of one forward + loss + backward (gradients cleared first, outside the timing)."""
    for p in module.parameters():
        p.grad = None
    t = time.perf_counter()
    default_loss(module(x)).backward()
    return time.perf_counter() - t


def timed(module, x, warmup: int, steps: int) -> tuple[float, float]:
    """(first step's seconds, median of ``steps`` steps after ``warmup`` steps)."""
    first = step(module, x)
    for _ in range(warmup - 1):
        step(module, x)
    return first, statistics.median(step(module, x) for _ in range(steps))


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="torchvision.models:resnet18", help="module:callable building the model")
    ap.add_argument("--input", default="8x3x64x64", help="input shape, e.g. 8x3x64x64")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=2, help="steps before timing (the first compiles)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    torch.manual_seed(0)
    model = build(args.model)()
    x = torch.randn(*(int(s) for s in args.input.split("x")))
    t = time.time()
    gm = fxsketch.optimize(model, (x,), seed=0, progress=False)
    plan_seconds = time.time() - t
    compiled = torch.compile(gm, backend=args.backend)
    print(gm.memory_plan, file=sys.stderr)

    rows = []
    base_plan = fxsketch.plan(model, (x,))
    eager_compiled = torch.compile(model, backend=args.backend)
    for name, module, plan in [("eager (unmodified)", model, base_plan),
                               (f"eager + torch.compile ({args.backend})", eager_compiled, None),
                               ("optimized", gm, gm.memory_plan),
                               (f"optimized + torch.compile ({args.backend})", compiled, None)]:
        first, seconds = timed(module, x, args.warmup, args.steps)
        m = fxsketch.measure(module, (x,), repeat=1, level="process")
        compiled_row = plan is None  # the tracker would see the eager step (see the docstring)
        rows.append(dict(row=name, predicted=None if compiled_row else plan.peak_bytes,
                         predicted_tensor=None if compiled_row else plan.tensor_peak_bytes,
                         process=m.process_peak_bytes, tensor=None if compiled_row else m.peak_bytes,
                         seconds=seconds, first_seconds=first))
        print(f"{name}: process {mib(m.process_peak_bytes)} MiB, step {1e3 * seconds:.0f} ms "
              f"(first {first:.1f} s)", file=sys.stderr, flush=True)

    base = rows[0]
    kinds = ", ".join(sorted({d.option.value for d in gm.memory_plan.decisions}))
    print(f"\n`{' '.join(['python', 'tools/bench_compile.py', *(argv if argv is not None else sys.argv[1:])])}`: "
          f"{args.model} at {args.input}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; optimize() planned in {plan_seconds:.1f} s; "
          f"{len(gm.memory_plan.decisions)} decisions ({kinds or 'none'})\n")
    heads = ["step", "predicted peak MiB", "measured peak, process level MiB",
             "measured peak, live tensors MiB", "process peak / eager", "step time ms (median)",
             "vs eager", "first step s"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for r in rows:
        print(f"| {r['row']} | {mib(r['predicted'])} | {mib(r['process'])} | {mib(r['tensor'])} | "
              f"{r['process'] / base['process']:.2f}x | {1e3 * r['seconds']:.0f} | "
              f"{100 * (r['seconds'] / base['seconds'] - 1):+.0f} % | {r['first_seconds']:.1f} |")
    print(f"\nPredicted: the plans of the eager steps (unmodified, gm.memory_plan); compiled rows have none. "
          f"Live tensors: fxsketch's tracker, uncompiled rows only (under a TorchDispatchMode dynamo runs a "
          f"compiled module eagerly). First step: tracing and compiling, "
          f"{'a cold compile (a fresh' if FRESH_CACHE else 'with the given'} inductor cache {cache}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, input=args.input, backend=args.backend, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
