"""How far planning's small calibration batch is from calibrating on the whole batch (the 1/B law).

    .venv/bin/python tools/bench_calibration_batch.py

Planning measures probe and SGD noise on b = 8, 4 or 2 samples and states them for the training
batch B: SGD noise by the 1/B law, probe noise by extrapolating its same-sample and cross-sample
parts by the number of samples and of pairs (fxsketch/calibrate.py). This script calibrates the
digits CNN of tools/train_noise_limits.py (make_plain(16, 6, 2), real digits, cross-entropy)
at its initialisation (summed cross-entropy) on each disjoint sub-batch of b samples of one batch
of B = 64, for b = 2, 4, 8, 16, 32, and on all 64 (no extrapolation), every figure stated for
B = 64, and prints per b: the median over convs of the probe/SGD ratio at each storage ratio
(mean over the sub-batches), and the relative difference of a conv's ratio and of its SGD noise
from the b = 64 figures (mean over convs and storage ratios; its mean and spread over sub-batches).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.calibrate import calibrate_convs
from fxsketch.ops.probes import rank_for_ratio
from train_digits import load_digits_tensors, make_plain


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    xtr, ytr, _, _ = load_digits_tensors()
    x, y = xtr[:args.batch], ytr[:args.batch]
    torch.manual_seed(0)
    model = make_plain(16, 6, 2)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    ratios = sorted(fxsketch.Config().ratios, reverse=True)
    sizes = [b for b in (2, 4, 8, 16, 32) if b < args.batch] + [args.batch]

    def calibrate(xs, ys):  # a summed loss: the SGD noise of every sub-batch is in the same units
        return calibrate_convs(model, (xs,), convs, batch=args.batch, cache=False,
                               loss_fn=lambda out: F.cross_entropy(out, ys, reduction="sum"))

    def ratio(c, f):
        return c.ratio(rank_for_ratio(c.shape, f, "spatial"))

    full = calibrate(x, y)
    heads = ["b", "sub-batches"] + [f"median ratio f=1/{round(1 / f)}" for f in ratios] + \
        ["ratio / b=B ratio - 1: mean, std over sub-batches", "SGD noise / b=B - 1: mean, std"]
    print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for b in sizes:
        chunks = [calibrate(x[k:k + b], y[k:k + b]) for k in range(0, args.batch - b + 1, b)]
        med = [statistics.mean(statistics.median(ratio(c, f) for c in got.values()) for got in chunks)
               for f in ratios]
        dr = [statistics.mean(ratio(got[n], f) / ratio(full[n], f) - 1 for n in convs for f in ratios)
              for got in chunks]
        ds = [statistics.mean(got[n].sgd_noise / full[n].sgd_noise - 1 for n in convs) for got in chunks]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        cells = [str(b), str(len(chunks))] + [f"{m:.2f}" for m in med] + \
            [f"{100 * statistics.mean(dr):+.0f} %, {100 * sd(dr):.0f} %",
             f"{100 * statistics.mean(ds):+.0f} %, {100 * sd(ds):.0f} %"]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{len(convs)} convs; ratios at b=B (f = " + ", ".join(f"1/{round(1 / f)}" for f in ratios) + "): "
          + ", ".join(f"{n}: " + "/".join(f"{ratio(full[n], f):.2f}" for f in ratios) for n in convs))

if __name__ == "__main__":
    main()
