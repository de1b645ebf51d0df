"""Benchmark the planner's estimated step-time overhead against the measured one, on CPU.

    .venv/bin/python tools/bench_overhead.py --repeat 5                 # markdown table on stdout
    .venv/bin/python tools/bench_overhead.py --quick --models resnet18  # one fast row
    .venv/bin/python tools/bench_overhead.py --threads 2                # torch.set_num_threads(2)

For each (model, input, setting) row:

- ``gm = fxsketch.optimize(model, (x,), budget, max_overhead=m, seed=0, progress=False)``;
- step times: eager and optimized training steps (``model(x).sum().backward()``, grads cleared)
  timed alternately, ``--rounds`` times ``--repeat`` steps each after a warm-up step, and each
  side's time is its fastest step (interference on a shared machine only ever adds time);
- estimated overhead: ``gm.memory_plan.overhead`` (against the step as given: the layout's measured
  change and the decisions' estimates, ``extra_time``, together) and
  ``gm.memory_plan.cost_estimator`` ("measured" or "roofline");
- measured overhead: optimized / eager - 1;
- target met?: the open issue's target, |measured - estimated| <= max(0.05, 0.3 * estimated), and
  for budget=None rows also measured <= max_overhead + 0.05 (max_overhead as a bound);
- decisions: the count by option (``d.option.value``).

With ``--split``, every budget=None setting also gets one row per single method
(``methods=("lean",)``, ``methods=("recompute",)``, ``methods=("probe",)``), so the measured gap
of each option kind can be seen on its own.

After the table, the estimated extra time of each row is broken down by option, so a gap can be
traced to the kinds of decisions that row made. A row whose optimize() raises BudgetError (or any
other error) prints the error in the row instead of numbers.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

import fxsketch

# name -> (input shape, quick input shape, settings); a setting is (budget, max_overhead)
SETTINGS_R18 = [(None, 0.1), (None, 0.2), (0.85, 0.2)]
MODELS = {
    "resnet18": ((8, 3, 128, 128), (4, 3, 64, 64), SETTINGS_R18),
    "vgg11": ((4, 3, 64, 64), (2, 3, 32, 32), [(None, 0.2)]),
    "unet3d": ((2, 1, 48, 48, 48), (1, 1, 32, 32, 32), [(None, 0.2)]),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "unet3d":
        from monai.networks.nets import UNet
        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                    strides=(2, 2, 2), num_res_units=2)
    import torchvision
    return getattr(torchvision.models, name)()


@dataclass
class Row:
    model: str
    setting: str
    budget: object
    max_overhead: float
    estimated: float | None = None
    estimator: str = ""
    measured: float | None = None
    eager_s: float | None = None
    opt_s: float | None = None
    decisions: Counter = field(default_factory=Counter)
    est_by_option: dict = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0  # wall time of the whole row (optimize + measurements)

    def target(self) -> str:
        if self.measured is None:
            return "-"
        gap = abs(self.measured - self.estimated)
        ok_gap = gap <= max(0.05, 0.3 * self.estimated)
        parts = [f"gap {'yes' if ok_gap else 'no'}"]
        ok = ok_gap
        if self.budget is None:
            ok_bound = self.measured <= self.max_overhead + 0.05
            parts.append(f"bound {'yes' if ok_bound else 'no'}")
            ok = ok and ok_bound
        return f"{'**yes**' if ok else '**no**'} ({', '.join(parts)})"


SPLIT_METHODS = (("lean",), ("recompute",), ("probe",))


def setting_name(budget, max_overhead, methods=None) -> str:
    s = f"budget={budget}, max_overhead={max_overhead}"
    return s if methods is None else s + f", methods={'+'.join(methods)}"


def run_row(name: str, model: nn.Module, x: torch.Tensor, budget, max_overhead: float,
            repeat: int, rounds: int, methods=None) -> Row:
    row = Row(f"{name} ({'x'.join(map(str, x.shape))})", setting_name(budget, max_overhead, methods),
              budget, max_overhead)
    extra = {} if methods is None else {"methods": methods}
    t0 = time.perf_counter()
    try:
        gm = fxsketch.optimize(model, (x,), budget, max_overhead=max_overhead, seed=0, progress=False,
                               **extra)
    except fxsketch.BudgetError as e:
        row.error = f"BudgetError: {str(e).splitlines()[0]}"
        row.seconds = time.perf_counter() - t0
        return row
    except Exception as e:  # noqa: BLE001 -- report, do not abort the other rows
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row.seconds = time.perf_counter() - t0
        return row
    plan = gm.memory_plan
    row.estimated = float(plan.overhead)  # against the step as given, the layout's change included
    row.estimator = plan.cost_estimator or "roofline"
    row.decisions = Counter(d.option.value for d in plan.decisions)
    by_opt = defaultdict(float)
    for d in plan.decisions:
        by_opt[d.option.value] += d.extra_time
    row.est_by_option = dict(by_opt)
    eager, opt = [], []
    for _ in range(rounds):  # interleaved: drift of the machine hits both sides alike
        eager += step_times(model, x, repeat)
        opt += step_times(gm, x, repeat)
    # the fastest step of each: interference on a shared machine only ever adds time
    row.eager_s = min(eager)
    row.opt_s = min(opt)
    row.measured = row.opt_s / row.eager_s - 1
    row.seconds = time.perf_counter() - t0
    return row


def step_times(model: nn.Module, x: torch.Tensor, repeat: int) -> list[float]:
    """Seconds of ``repeat`` training steps (sum of outputs backpropagated, grads cleared before
    each) after one warm-up step; the model's buffers are restored afterwards."""
    from fxsketch._state import preserved
    times = []
    with preserved(model, grads=True):
        for i in range(repeat + 1):
            for p in model.parameters():
                p.grad = None
            t0 = time.perf_counter()
            model(x).sum().backward()
            if i:
                times.append(time.perf_counter() - t0)
    return times


def fmt_counts(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def table(rows: list[Row]) -> str:
    out = ["| model (input) | setting | estimated overhead | measured overhead | target met? | "
           "decisions | eager ms | optimized ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.model} | {r.setting} | - | - | - | {r.error} | - | - |")
            continue
        out.append(f"| {r.model} | {r.setting} | {100 * r.estimated:+.1f} % ({r.estimator}) | "
                   f"{100 * r.measured:+.1f} % | {r.target()} | {fmt_counts(r.decisions)} | "
                   f"{1e3 * r.eager_s:.1f} | {1e3 * r.opt_s:.1f} |")
    return "\n".join(out)


def breakdown(rows: list[Row]) -> str:
    out = ["| model (input) | setting | estimated extra by option | measured - estimated | row wall s |",
           "|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.model} | {r.setting} | - | - | {r.seconds:.0f} |")
            continue
        parts = ", ".join(f"{k} {100 * v:+.1f} %" for k, v in sorted(r.est_by_option.items())) or "none"
        out.append(f"| {r.model} | {r.setting} | {parts} | {100 * (r.measured - r.estimated):+.1f} pp | "
                   f"{r.seconds:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per measure() call")
    ap.add_argument("--rounds", type=int, default=4,
                    help="interleaved eager/optimized measure() calls per row")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smaller inputs, first setting per model only, --rounds 1")
    ap.add_argument("--split", action="store_true",
                    help="also one row per single method for every budget=None setting")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) (default: leave torch's setting)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    rounds = 1 if args.quick else args.rounds

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeat={args.repeat}, "
          f"rounds={rounds}{', quick' if args.quick else ''}", file=sys.stderr)
    rows = []
    for name in names:
        shape, quick_shape, settings = MODELS[name]
        if args.quick:
            shape, settings = quick_shape, settings[:1]
        model = build(name)
        torch.manual_seed(0)
        x = torch.randn(shape)
        runs = []
        for budget, m in settings:
            runs.append((budget, m, None))
            if args.split and budget is None:
                runs.extend((budget, m, meth) for meth in SPLIT_METHODS)
        for budget, m, meth in runs:
            row = run_row(name, model, x, budget, m, args.repeat, rounds, meth)
            rows.append(row)
            print(f"[{row.seconds:6.1f} s] {row.model} {row.setting}: "
                  + (row.error or f"est {100 * row.estimated:+.1f} %, meas {100 * row.measured:+.1f} %"),
                  file=sys.stderr, flush=True)
    print(table(rows))
    print()
    print(breakdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
