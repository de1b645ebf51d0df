"""3D segmentation toy: MONAI UNet (spatial_dims=3) on generated volumes, exact vs fxsketch.optimize.

Each volume is 1 x S^3 (S = 24 by default): 1-3 random spheres or axis-aligned cubes of intensity
+1 (radius / half-side 3-6 voxels) in Gaussian noise (std 0.6); the target
is the binary mask of the shapes. Fixed generated train/test sets (test from a different seed).
Loss: BCE-with-logits + soft Dice. Metric: Dice of the thresholded prediction (logit > 0) per
test volume, averaged. Reported: test Dice mean ± std over seeds, measured peak of one training
step (fxsketch.measure, exact CPU live-storage tracker), predicted peak, and the activation bytes
(measured peak - 2 x parameter bytes - input bytes) relative to exact.

    .venv/bin/python tools/train_unet3d.py --epochs 6 --seeds 2 --out docs/img
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxsketch

BATCH = 4


def make_volumes(n: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    masks = torch.zeros(n, 1, size, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            r = float(torch.randint(3, 7, (), generator=g))
            c = torch.randint(int(r), size - int(r), (3,), generator=g).float()
            if torch.rand((), generator=g) < 0.5:
                m = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
            else:
                m = ((zz - c[0]).abs() <= r) & ((yy - c[1]).abs() <= r) & ((xx - c[2]).abs() <= r)
            masks[i, 0] = torch.maximum(masks[i, 0], m.float())
    vols = masks + 0.6 * torch.randn(masks.shape, generator=g)
    return vols, masks


def make_model():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=1)


def seg_loss(logits, target):
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3, 4))
    dice = (2 * inter + 1) / (p.sum((1, 2, 3, 4)) + target.sum((1, 2, 3, 4)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


def dice_score(model, x, y) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = (model(x) > 0).float()
    model.train(was)
    inter = (pred * y).sum((1, 2, 3, 4))
    d = 2 * inter / (pred.sum((1, 2, 3, 4)) + y.sum((1, 2, 3, 4))).clamp_min(1)
    return float(d.mean())


SETTINGS = [
    ("exact", None),
    ("optimize budget=None", dict(budget=None)),
    ("optimize budget=0.5", dict(budget=0.5)),
    ("optimize budget=0.35", dict(budget=0.35)),
    ("optimize budget=0.62", dict(budget=0.62)),
    ("probe+lean, probe_rank=1 (forced)", dict(budget=None, methods=("probe", "lean"), probe_rank=1)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    xtr, ytr = make_volumes(args.train, args.size, 0)
    xte, yte = make_volumes(args.test, args.size, 1)
    example = (xtr[:BATCH].clone(),)
    steps = args.train // BATCH
    results = {}
    for name, setting in SETTINGS:
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = make_model()
            cur = {"y": ytr[:BATCH]}
            loss_fn = lambda out: seg_loss(out, cur["y"])  # noqa: E731
            gm = model
            if setting is not None:
                try:
                    gm = fxsketch.optimize(model, example, loss_fn=loss_fn, **setting)
                except Exception as e:
                    results[name] = dict(error=f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/"))
                    print(f"{name}: {results[name]['error']}", file=sys.stderr)
                    runs = None
                    break
            rec = dict(seed=seed)
            if seed == 0:
                rec["measured_peak"] = fxsketch.measure(gm, example, loss_fn=loss_fn, repeat=1).peak_bytes
                rec["predicted_peak"] = (gm.memory_plan.timeline.peak_bytes if setting is not None
                                         else fxsketch.plan(model, example, loss_fn=loss_fn).timeline.peak_bytes)
                rec["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
                rec["input_bytes"] = example[0].numel() * example[0].element_size()
                rec["decisions"] = "; ".join(f"{d.node}:{d.option.value}({d.detail})"
                                             for d in getattr(getattr(gm, "memory_plan", None), "decisions", ()))
            g = torch.Generator().manual_seed(1000 + seed)
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            losses, dices = [], []
            t0 = time.time()
            for epoch in range(args.epochs):
                perm = torch.randperm(args.train, generator=g)
                tot = 0.0
                for i in range(steps):
                    idx = perm[i * BATCH:(i + 1) * BATCH]
                    loss = seg_loss(gm(xtr[idx]), ytr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot += float(loss.detach())
                losses.append(tot / steps)
                dices.append(dice_score(model, xte, yte))
            rec.update(losses=losses, dices=dices, final_dice=dices[-1], seconds=time.time() - t0)
            runs.append(rec)
            print(f"{name} seed {seed}: dice {dices[-1]:.4f} loss {losses[-1]:.4f} ({rec['seconds']:.0f} s)",
                  file=sys.stderr)
        if runs is not None:
            results[name] = dict(runs=runs)
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "unet3d_curves.png")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def table(results) -> str:
    lines = ["| setting | test Dice (mean ± std) | measured peak MiB | predicted peak MiB | activation MiB | "
             "act. reduction vs exact | plan |", "|" + "---|" * 7]
    b = results["exact"]["runs"][0]
    act0 = b["measured_peak"] - 2 * b["param_bytes"] - b["input_bytes"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        d = [x["final_dice"] for x in r["runs"]]
        s0 = r["runs"][0]
        act = s0["measured_peak"] - 2 * s0["param_bytes"] - s0["input_bytes"]
        lines.append(f"| {name} | {statistics.mean(d):.4f} ± {statistics.stdev(d) if len(d) > 1 else 0:.4f} "
                     f"(n={len(d)}) | {s0['measured_peak'] / 2**20:.2f} | {s0['predicted_peak'] / 2**20:.2f} | "
                     f"{act / 2**20:.2f} | {act0 / act:.2f}x | {s0['decisions'] or '-'} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        if "error" in r:
            continue
        L = torch.tensor([x["losses"] for x in r["runs"]]).mean(0)
        D = torch.tensor([x["dices"] for x in r["runs"]]).mean(0)
        a.plot(range(1, len(L) + 1), L, label=name)
        b.plot(range(1, len(D) + 1), D, label=name)
    a.set(xlabel="epoch", ylabel="train loss (mean over seeds)", title="3D UNet toy: training loss")
    b.set(xlabel="epoch", ylabel="test Dice (mean over seeds)", title="3D UNet toy: test Dice")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
