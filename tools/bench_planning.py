"""What planning itself costs on real inputs: optimize()'s wall time and its own peak memory.

    .venv/bin/python tools/bench_planning.py                    # every row below
    .venv/bin/python tools/bench_planning.py --rows resnet18    # one row

Per row: the eager training step's measured peak (fxsketch.measure, exact live-storage tracker),
then ``fxsketch.optimize(model, (x,), budget)`` timed on its own (wall seconds) and, in a second
call (a fresh model, nothing cached), run under the same tracker: the peak of live tensor bytes
during the whole call, parameters and the example batch included. Printed beside them: the
optimized step's predicted peak and the planner's notes on calibration. Planning is within
memory when its own peak is at most max(budget, the optimized step's predicted peak).
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone

import torch

import fxsketch
from fxsketch.calibrate import clear_cache
from fxsketch.measurement import LiveStorageTracker
from fxsketch.units import format_bytes


def _resnet(name):
    import torchvision
    return getattr(torchvision.models, name)()


def _unet():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2, norm="batch")


ROWS = {  # name: (model factory, input shape, budget)
    "resnet18": (lambda: _resnet("resnet18"), (16, 3, 128, 128), 0.8),
    "resnet50": (lambda: _resnet("resnet50"), (8, 3, 224, 224), 0.6),
    "unet3d": (_unet, (2, 1, 96, 96, 96), 0.6),
}


def run(name: str) -> str:
    make, shape, budget = ROWS[name]
    torch.manual_seed(0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    eager = fxsketch.measure(make(), x, repeat=1).peak_bytes
    torch.manual_seed(0)
    model = make()
    clear_cache()
    t = time.perf_counter()
    gm = fxsketch.optimize(model, (x,), budget)
    wall = time.perf_counter() - t
    torch.manual_seed(0)
    model = make()
    clear_cache()
    resident = list(model.parameters()) + list(model.buffers()) + [x]
    with LiveStorageTracker(resident) as tracker:
        fxsketch.optimize(model, (x,), budget)
    plan = gm.memory_plan
    limit = max(plan.budget_bytes or 0, plan.timeline.peak_bytes)
    cal = next((n for n in plan.notes if n.startswith(("probe noise calibrated", "uncalibrated"))), "-")
    return (f"| {name} {'x'.join(map(str, shape))} | {budget} | {format_bytes(eager)} | {wall:.1f} s | "
            f"{format_bytes(tracker.peak_bytes)} | {format_bytes(plan.timeline.peak_bytes)} | "
            f"{'yes' if tracker.peak_bytes <= limit else 'NO'} | {cal} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| model, input | budget | eager step peak | optimize() wall | optimize() peak | "
          "optimized step predicted | within | calibration |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.rows:
        print(run(name), flush=True)


if __name__ == "__main__":
    main()
