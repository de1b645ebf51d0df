"""Predicted against process-level measured step memory, eager and optimized (kernel workspace).

    .venv/bin/python tools/bench_process_memory.py --json /tmp/process_memory.json

For each model: the plan of the unmodified step and of ``fxsketch.optimize(model, (x,))`` (the
default plan, budget=None), each predicted with kernel workspace (``workspace="measure"``, the
default) and without it (the plan's tensor-level peak), against ``fxsketch.measure(...,
level="process")``: the live-tensor peak (exact tracker) and the process-level peak (resident
bytes + the rise of peak RSS during the step in a fresh process that returns freed buffers to
the OS). Errors are predicted / process-level - 1. ``--only`` picks models by name;
``--also-off`` adds the default plan made with ``workspace="off"`` (tensor bytes only), to see
whether knowing the workspace changes what the plan costs in process memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torchvision

import fxsketch


def _unet():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=2)


MODELS = {
    "resnet18 32x3x128x128": (lambda: torchvision.models.resnet18(), (32, 3, 128, 128)),
    "resnet50 16x3x224x224": (lambda: torchvision.models.resnet50(), (16, 3, 224, 224)),
    "vgg16 16x3x224x224": (lambda: torchvision.models.vgg16(), (16, 3, 224, 224)),
    "monai UNet 2x1x96^3": (_unet, (2, 1, 96, 96, 96)),
}


def models(only):
    """(name, model, seeded random input) of each model whose name contains one of ``only`` (all if None)."""
    for name, (make, shape) in MODELS.items():
        if only and not any(o in name for o in only):
            continue
        torch.manual_seed(0)
        model = make()
        yield name, model, torch.randn(*shape)


def mib(b) -> str:
    return f"{b / 2**20:.1f}"


def row(name: str, which: str, plan, m: fxsketch.Measurement) -> dict:
    return dict(model=name, step=which, predicted=plan.peak_bytes, predicted_tensor=plan.tensor_peak_bytes,
                workspace_at_peak=plan.breakdown.get("workspace", 0), measured_tensor=m.peak_bytes,
                measured_process=m.process_peak_bytes, seconds=m.seconds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="model names (substrings) to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--also-off", action="store_true",
                    help="add the default plan made without kernel workspace (workspace='off'), measured the same way")
    args = ap.parse_args(argv)
    rows = []
    for name, model, x in models(args.only):
        t = time.time()
        base = fxsketch.plan(model, (x,))
        gm = fxsketch.optimize(model, (x,), progress=False, seed=0)
        planned = time.time() - t
        steps = [("eager", model, base), ("optimized", gm, gm.memory_plan)]
        if args.also_off:
            off = fxsketch.optimize(model, (x,), progress=False, seed=0, workspace="off")
            steps.append(("optimized, planned without workspace", off, off.memory_plan))
        for which, module, plan in steps:
            m = fxsketch.measure(module, (x,), repeat=1, level="process")
            rows.append(dict(row(name, which, plan, m), plan_seconds=planned))
            r = rows[-1]
            print(f"{name} {which}: predicted {mib(r['predicted'])} MiB (tensor {mib(r['predicted_tensor'])}), "
                  f"measured process {mib(r['measured_process'])} MiB, tensor {mib(r['measured_tensor'])}",
                  file=sys.stderr, flush=True)
    heads = ["model", "step", "predicted MiB", "of which workspace at peak", "process-level measured MiB",
             "error", "tensor-level predicted MiB", "its error vs process", "tensor-level measured MiB"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for r in rows:
        err = r["predicted"] / r["measured_process"] - 1
        err_t = r["predicted_tensor"] / r["measured_process"] - 1
        print(f"| {r['model']} | {r['step']} | {mib(r['predicted'])} | {mib(r['workspace_at_peak'])} | "
              f"{mib(r['measured_process'])} | {100 * err:+.1f} % | {mib(r['predicted_tensor'])} | "
              f"{100 * err_t:+.1f} % | {mib(r['measured_tensor'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
