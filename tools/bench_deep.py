"""How far below the normalisation floor a plan goes: predicted reductions on large meta-input
steps, measured ones on CPU, and where each plan's peak now sits (issue 15's acceptance rows).

    .venv/bin/python tools/bench_deep.py --predict                 # meta inputs, predicted only
    .venv/bin/python tools/bench_deep.py --measure                 # CPU sizes, tracker-measured
    .venv/bin/python tools/bench_deep.py --predict --only resnet50 --methods probe lean recompute
    .venv/bin/python tools/bench_deep.py --predict --roofline       # GPU-like prices (no CPU node times)
    .venv/bin/python tools/bench_deep.py --predict --memory-format preserve  # NCHW convs (default: auto)
    .venv/bin/python tools/bench_deep.py --predict --quant-inputs norms      # no quantized conv inputs

Every row plans with ``budget=None, max_overhead`` (0.10 predicted, 0.15 measured) and
``seed=0``; probe (and quantized-norm) noise is calibrated on a real 2-sample batch
(``calibration_inputs``), as the CLI does. Printed per row: the unmodified and the planned peak,
their ratio, the estimated overhead, the wall time of planning and of the solver alone, the
solver's optimality gap (its note), the number of choices, how many replays run options inside
or a nested replay, and the step where the peak sits with what is alive there. ``--measure`` also runs the optimized
step under fxsketch's exact live-storage tracker (``fxsketch.measure``; tensor level, and process
level: peak RSS of a fresh process, kernel workspace included, against the plan's full peak) and
checks that the outputs equal eager (or how close they are: channels_last convs sum in another order).
"""
from __future__ import annotations

import argparse
import time

import torch

import fxsketch
from fxsketch.passes import solve as S
from fxsketch.units import format_bytes


def _unet(side):
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def _tv(name):
    def make(_):
        import torchvision
        return getattr(torchvision.models, name)()
    return make


PREDICT = {  # name -> (factory, meta input shape)
    "resnet50": (_tv("resnet50"), (184, 3, 224, 224)),
    "vgg16": (_tv("vgg16"), (64, 3, 224, 224)),
    "unet": (_unet, (2, 1, 128, 128, 128)),
    "resnet152": (_tv("resnet152"), (64, 3, 224, 224)),
    "densenet201": (_tv("densenet201"), (64, 3, 224, 224)),
}
MEASURE = {
    "resnet50": (_tv("resnet50"), (16, 3, 224, 224)),
    "unet": (_unet, (2, 1, 96, 96, 96)),
    "vgg16": (_tv("vgg16"), (16, 3, 224, 224)),
}


class _SolverClock:
    """Adds up the wall time of every Solver.solve while open."""

    def __enter__(self):
        self.seconds, self._orig = 0.0, S.Solver.solve
        clock = self

        def timed(solver, *a, **k):
            t = time.perf_counter()
            try:
                return clock._orig(solver, *a, **k)
            finally:
                clock.seconds += time.perf_counter() - t
        S.Solver.solve = timed
        return self

    def __exit__(self, *exc):
        S.Solver.solve = self._orig


def _row(name, make, shape, meta: bool, max_overhead: float, methods, roofline: bool = False,
         memory_format: str = "auto", quant_inputs: str = "all", chunked_replays: bool = True,
         overhead_against: str = "given"):
    torch.manual_seed(0)
    model = make(shape[-1])
    x = torch.empty(shape, device="meta") if meta else torch.randn(shape)
    cal = torch.randn(2, *shape[1:])
    opts = dict(max_overhead=max_overhead, seed=0, progress=False, calibration_inputs=(cal,))
    if methods:
        opts["methods"] = tuple(methods)
    if roofline:
        opts["time_nodes"] = False
    opts["memory_format"] = memory_format
    opts["quant_inputs"] = quant_inputs
    opts["chunked_replays"] = chunked_replays
    opts["overhead_against"] = overhead_against
    t = time.perf_counter()
    with _SolverClock() as clock:
        if meta:
            plan, gm = fxsketch.plan(model, (x,), None, optimized=True, **opts), None
        else:
            gm = fxsketch.optimize(model, (x,), None, **opts)
            plan = gm.memory_plan
    seconds = time.perf_counter() - t
    gap = next((n for n in plan.notes if n.startswith("solver:")), "-")
    inside = sum("inside:" in d.detail for d in plan.decisions)
    nested = sum("nested replay" in d.detail for d in plan.decisions)
    chunked = sum(" chunks of " in d.detail for d in plan.decisions)
    alive = ", ".join(f"{o} ({c}, {format_bytes(b)})" for o, c, b in plan.alive_at_peak[:3])
    print(f"| {name} {'x'.join(map(str, shape))}{' meta' if meta else ''} | {format_bytes(plan.baseline_peak_bytes)} "
          f"| {format_bytes(plan.peak_bytes)} | {plan.baseline_peak_bytes / plan.peak_bytes:.2f}x "
          f"| {100 * plan.overhead:+.1f} % (options {100 * plan.extra_time:.1f} %, layout {100 * plan.layout_time:+.1f} %) | {seconds:.1f} s | {clock.seconds:.1f} s | {len(plan.decisions)} "
          f"({inside} replays with options inside, {nested} nested, {chunked} in batch chunks) | {gap} | {plan.peak_node}: {alive} |", flush=True)
    if gm is not None:
        eager = fxsketch.measure(model, (x,), level="process")
        got = fxsketch.measure(gm, (x,), level="process")
        with torch.no_grad():
            a, b = gm.eval()(x[:2]), model.eval()(x[:2])
            same = "yes" if torch.equal(a, b) else f"within {(a - b).abs().max().item() / b.abs().max().item():.1e} (max rel.)"
        print(f"|   measured | {format_bytes(eager.peak_bytes)} | {format_bytes(got.peak_bytes)} "
              f"| {eager.peak_bytes / got.peak_bytes:.2f}x | predicted/measured {plan.tensor_peak_bytes / got.peak_bytes:.3f} "
              f"| outputs equal eager (eval): {same} | | | | |", flush=True)
        print(f"|   measured, process | {format_bytes(eager.process_peak_bytes)} | {format_bytes(got.process_peak_bytes)} "
              f"| {eager.process_peak_bytes / got.process_peak_bytes:.2f}x | predicted/measured "
              f"{plan.peak_bytes / got.process_peak_bytes:.3f} | kernel workspace included | | | | |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predict", action="store_true", help="meta-input rows (predicted)")
    ap.add_argument("--measure", action="store_true", help="CPU rows (tracker-measured)")
    ap.add_argument("--only", nargs="*", default=None, help="model names")
    ap.add_argument("--methods", nargs="*", default=None, help="option kinds (default: the default methods)")
    ap.add_argument("--roofline", action="store_true",
                    help="price extra time by the roofline (time_nodes=False), not this CPU's node times")
    ap.add_argument("--memory-format", default="auto", choices=fxsketch.config.MEMORY_FORMATS,
                    help="Config.memory_format (auto: channels_last convs on CPU, no oneDNN reorders)")
    ap.add_argument("--quant-inputs", default="all", choices=("all", "norms"),
                    help="Config.quant_inputs (norms: no quantized conv inputs, the A/B of docs/quant.md)")
    ap.add_argument("--no-chunked-replays", action="store_true",
                    help="Config.chunked_replays=False (no replays in batch chunks: the A/B of docs/replays.md)")
    ap.add_argument("--overhead-against", default="given", choices=("given", "relaid"),
                    help="Config.overhead_against (relaid: the layout's change not counted, the A/B of docs/layout.md)")
    ap.add_argument("--max-overhead", type=float, default=None,
                    help="instead of 0.10 (predicted rows) and 0.15 (measured rows)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; methods {args.methods or fxsketch.Config().methods}; "
          f"extra time {'roofline' if args.roofline else 'from node times'}; "
          f"memory_format {args.memory_format}; quant_inputs {args.quant_inputs}; "
          f"chunked_replays {not args.no_chunked_replays}; overhead against {args.overhead_against}")
    print("| step | unmodified | planned | reduction | est. overhead | plan time | solver | decisions | gap | peak at |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for meta, table, cap in ((True, PREDICT, 0.10), (False, MEASURE, 0.15)):
        if (args.predict if meta else args.measure):
            for name, (make, shape) in table.items():
                if args.only is None or name in args.only:
                    try:
                        _row(name, make, shape, meta, args.max_overhead or cap, args.methods, args.roofline,
                             args.memory_format, args.quant_inputs, not args.no_chunked_replays,
                             args.overhead_against)
                    except Exception as e:  # one row's failure is a row, not the end of the table
                        print(f"| {name} | {type(e).__name__}: {str(e).splitlines()[0][:200]} |", flush=True)


if __name__ == "__main__":
    main()
