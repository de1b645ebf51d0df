"""Calibrated probe/SGD noise ratios against the prior for uncalibrated plans (PriorNoise).

    .venv/bin/python tools/bench_prior.py --json /tmp/prior.json

A plan that cannot calibrate (meta inputs without ``calibration_inputs``) judges each conv by
``fxsketch.calibrate.PriorNoise``: ratio(r) = scale * sqrt(positions / r). This script measures
what calibration finds instead, on the models of docs/training.md at their initialisation: the
digits CNNs of tools/train_digits.py (real digits, cross-entropy, batch 64), torchvision's
resnet18 at small sizes (random images, cross-entropy on random labels over 1000 classes) and the
small MONAI 3D UNet of tools/train_unet3d.py (its generated volumes and loss, batch 4 and 8).

Each model runs as planning runs it: ``calibrate_convs`` on the first b = min(8, B / 2) samples,
stated for the batch B, spatial mode, Gaussian probes, every ``nn.Conv1d/2d/3d``. For each storage
ratio f of ``fxsketch.Config().ratios`` the rank is r = rank_for_ratio(X, f) and the conv's
*implied scale* is ratio(r) / sqrt(positions / r): the prior's scale at which that conv would lie
exactly on the prior. A conv whose sketch at f would not be smaller than X (r = positions) is
left out at that f: the planner gains nothing from it. Printed: per model the median and largest
implied scale per f and the share of convs at or below the current prior (PRIOR_SCALE); over all
models the quantiles per f, and the smallest multiple of 0.05 that puts at least ``--coverage`` of
the convs at or below the prior at every f (the rule docs/training.md states).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.calibrate import PRIOR_SCALE, calibrate_convs
from fxsketch.ops.probes import rank_for_ratio

BATCH_DIGITS = 64


def _digits(make):
    from train_digits import load_digits_tensors
    xtr, ytr, _, _ = load_digits_tensors()
    return make, xtr[:BATCH_DIGITS].clone(), ytr[:BATCH_DIGITS].clone(), F.cross_entropy


def _resnet18(shape):
    import torchvision
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, 1000, (shape[0],), generator=g)
    return torchvision.models.resnet18, x, y, F.cross_entropy


def _unet(batch):
    import train_unet3d as U
    x, y = U.make_volumes(batch, 24, seed=0)
    return U.make_model, x, y, U.seg_loss


def cases():
    """(name, builder) per model and shape; a builder gives (make_model, x, y, loss(out, y))."""
    import train_digits as D
    return [
        ("digits plain 32ch 12+2 (64x1x32x32)", lambda: _digits(D.make_plain)),
        ("digits plain 16ch 6+2 (64x1x32x32)", lambda: _digits(lambda: D.make_plain(16, 6, 2))),
        ("digits deep BN (64x1x32x32)", lambda: _digits(D.make_deep)),
        ("digits small BN (64x1x32x32)", lambda: _digits(D.make_small)),
        ("resnet18 (16x3x32x32)", lambda: _resnet18((16, 3, 32, 32))),
        ("resnet18 (16x3x64x64)", lambda: _resnet18((16, 3, 64, 64))),
        ("resnet18 (8x3x128x128)", lambda: _resnet18((8, 3, 128, 128))),
        ("MONAI UNet 3D (4x1x24^3)", lambda: _unet(4)),
        ("MONAI UNet 3D (8x1x24^3)", lambda: _unet(8)),
    ]


def implied_scales(name, builder, ratios) -> dict:
    """Calibrate one model; per storage ratio f, the implied prior scale of every conv."""
    make_model, x, y, loss = builder()
    torch.manual_seed(0)
    model = make_model()
    big = x.shape[0]
    b = min(8, big // 2)
    convs = {n: m for n, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros"}
    t = time.time()
    noise = calibrate_convs(model, (x[:b],), convs, batch=big, loss_fn=lambda out: loss(out, y[:b]), cache=False)
    seconds = time.time() - t
    scales = {}
    for f in ratios:
        vals = []
        for c in noise.values():
            positions = math.prod(c.shape[2:])
            r = rank_for_ratio(c.shape, f, "spatial")
            if r < positions:
                vals.append(c.ratio(r) / math.sqrt(positions / r))
        scales[f] = vals
    print(f"{name}: {len(convs)} convs calibrated on {b} of {big} samples in {seconds:.1f} s", file=sys.stderr)
    return dict(batch=big, samples=b, convs=len(convs), seconds=seconds, scales=scales)


def quantile(vals, q: float) -> float:
    """The q-quantile (linear interpolation) of vals."""
    s = sorted(vals)
    i = q * (len(s) - 1)
    lo = int(math.floor(i))
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)


def fmt_f(f: float) -> str:
    return f"1/{round(1 / f)}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coverage", type=float, default=0.9, help="share of convs the prior must lie above")
    ap.add_argument("--only", default=None, help="comma-separated case indices")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ratios = sorted(fxsketch.Config().ratios, reverse=True)
    todo = cases()
    if args.only:
        todo = [todo[int(i)] for i in args.only.split(",")]
    results = {name: implied_scales(name, builder, ratios) for name, builder in todo}

    heads = ["model (input)", "B / b", "convs"] + [f"f = {fmt_f(f)}: median / max, below prior" for f in ratios]
    print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for name, r in results.items():
        cells = [name, f"{r['batch']} / {r['samples']}", str(r["convs"])]
        for f in ratios:
            v = r["scales"][f]
            cells.append(f"{statistics.median(v):.3f} / {max(v):.3f}, "
                         f"{sum(s <= PRIOR_SCALE for s in v)}/{len(v)}" if v else "-")
        print("| " + " | ".join(cells) + " |")

    print(f"\n| storage ratio f | convs | implied scale: median | 75 % | 90 % | max | "
          f"below prior {PRIOR_SCALE:g} |\n|---|---|---|---|---|---|---|")
    need = 0.0
    for f in ratios:
        v = [s for r in results.values() for s in r["scales"][f]]
        need = max(need, quantile(v, args.coverage))
        print(f"| {fmt_f(f)} | {len(v)} | {statistics.median(v):.3f} | {quantile(v, 0.75):.3f} | "
              f"{quantile(v, 0.9):.3f} | {max(v):.3f} | {100 * sum(s <= PRIOR_SCALE for s in v) / len(v):.0f} % |")
    scale = math.ceil(need / 0.05 - 1e-9) * 0.05
    print(f"\nsmallest multiple of 0.05 with >= {100 * args.coverage:.0f} % of the convs at or below the prior "
          f"at every f: {scale:.2f} (the {100 * args.coverage:.0f} % quantile reaches {need:.3f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({n: dict(r, scales={str(f): v for f, v in r["scales"].items()}) for n, r in results.items()},
                      fh, indent=1)


if __name__ == "__main__":
    main()
