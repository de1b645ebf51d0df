"""Time the probe-noise calibration of fxsketch.optimize on torchvision's ResNet-50 (CPU).

    .venv/bin/python tools/bench_calibrate.py                      # batch 8x3x64x64
    .venv/bin/python tools/bench_calibrate.py --shape 16x3x224x224

Plans the same model twice with ``methods=("probe",)`` and ``time_nodes=False``: once with
calibration (the default, progress bar on stderr) and once with ``calibrate=False``. The
difference is the calibration's cost: one exact forward+backward, then per conv the SGD noise
and the probe noise of each candidate sketch size (fxsketch.calibrate.calibrate_convs).
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone

import torch
import torchvision

import fxsketch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8x3x64x64", help="input shape (default 8x3x64x64)")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fxsketch.plan(model, (x,), None, optimized=True, methods=("probe",), time_nodes=False, calibrate=False)  # warm-up
    times = {}
    for calibrate in (False, True):
        t = time.perf_counter()
        p = fxsketch.plan(model, (x,), None, optimized=True, methods=("probe",), time_nodes=False, calibrate=calibrate)
        times[calibrate] = time.perf_counter() - t
    n = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"resnet50 {args.shape}: {n} convs; plan without calibration {times[False]:.1f} s, "
          f"with calibration {times[True]:.1f} s -> calibration {times[True] - times[False]:.1f} s; "
          f"{sum(d.option.value == 'probe' for d in p.decisions)} convs probed at max_grad_noise=1")


if __name__ == "__main__":
    main()
