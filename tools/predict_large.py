"""Predicted (not measured) peaks of optimize() at GPU-sized inputs, planned on meta tensors.

    .venv/bin/python tools/predict_large.py

Prints a markdown table: unmodified and optimized predicted peak, reduction, the planner's
estimated overhead, and the decisions by kind. Planning allocates nothing, so it runs on a CPU;
"planning s" is the wall time of the optimize() call alone (the model is built before the clock
starts; after a warm-up call), i.e. the time to
plan, rewrite and re-predict; the figures are predictions of the liveness model (within 1 % of measurement on the CPU models
in docs/liveness.md), not measurements: measure them on a GPU with tools/bench_gpu.py.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

import fxsketch
from fxsketch.units import format_bytes


def models():
    import torchvision
    from monai.networks.nets import UNet
    return {
        "resnet50": (torchvision.models.resnet50, (64, 3, 224, 224)),
        "resnet50 ": (torchvision.models.resnet50, (16, 3, 224, 224)),  # the CPU benchmark's size
        "vgg16": (torchvision.models.vgg16, (64, 3, 224, 224)),
        "unet3d": (lambda: UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                                strides=(2, 2, 2, 2), num_res_units=2), (2, 1, 128, 128, 128)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-overhead", type=float, default=0.15)
    args = ap.parse_args(argv)
    print(f"| model | input | unmodified | optimized (budget=None, max_overhead={args.max_overhead}) | "
          "reduction | est. overhead | decisions | planning s |")
    print("|---|---|---|---|---|---|---|---|")
    # warm-up (imports, first-call costs), so "planning s" is what a user's call takes
    fxsketch.plan(models()["resnet50"][0](), (torch.empty(2, 3, 32, 32, device="meta"),), None)
    for name, (make, shape) in models().items():
        torch.manual_seed(0)
        x = torch.empty(shape, device="meta")
        model = make()  # built outside the timing: "planning s" is the optimize() call alone
        t = time.perf_counter()
        gm = fxsketch.optimize(model, (x,), None, max_overhead=args.max_overhead)
        p = gm.memory_plan
        kinds = Counter(d.option.value for d in p.decisions)
        print(f"| {name.strip()} | {'x'.join(map(str, shape))} | {format_bytes(p.baseline_peak_bytes)} | "
              f"{format_bytes(p.peak_bytes)} | {p.baseline_peak_bytes / p.peak_bytes:.2f}x | "
              f"{100 * p.overhead:+.1f} % | "
              f"{', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))} | {time.perf_counter() - t:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
