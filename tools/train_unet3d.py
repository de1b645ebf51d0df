"""3D segmentation toy: MONAI UNet (spatial_dims=3) on generated volumes, exact vs fxsketch.optimize.

Each volume is 1 x S^3 (S = 24 by default): 1-3 random spheres or axis-aligned cubes of intensity
+1 (radius / half-side 3-6 voxels) in Gaussian noise (std 0.6); the target
is the binary mask of the shapes. Fixed generated train/test sets (test from a different seed).
Loss: BCE-with-logits + soft Dice. Metric: Dice of the thresholded prediction (logit > 0) per
test volume, averaged. Reported: test Dice mean ± std over seeds, measured peak of one training
step (fxsketch.measure, exact CPU live-storage tracker), predicted peak, and the activation bytes
(measured peak - 2 x parameter bytes - input bytes) relative to exact.

    .venv/bin/python tools/train_unet3d.py --epochs 6 --seeds 2 --out docs/img
    .venv/bin/python tools/train_unet3d.py --methods --epochs 6 --seeds 3 --out docs/img

``--methods`` trains the rows of tools/train_methods.py instead (exact backprop, the default plan,
DFA, MEM-DFA, Mem-AOP-GD at K/D = 1/2 and 1/4) and adds the training time per step of seed 0.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import _harness as H

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
    pred = (H.eval_forward(model, x) > 0).float()
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


DICE = H.Metric(dice_score, short="dice", places=4, column="test Dice", axis="test Dice", title="test Dice")
PLAN = ("plan", lambda s0: s0["decisions"] or "-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--test", type=int, default=16)
    H.add_training_args(ap, epochs=6, seeds=2, lr=0.01)
    ap.add_argument("--methods", action="store_true",
                    help="the gradient methods side by side (tools/train_methods.py's rows)")
    H.add_output_args(ap)
    args = ap.parse_args(argv)
    settings = H.METHODS if args.methods else SETTINGS
    columns = [("train ms/step (seed 0)", H.step_ms), PLAN] if args.methods else [PLAN]
    xtr, ytr = make_volumes(args.train, args.size, 0)
    xte, yte = make_volumes(args.test, args.size, 1)
    data = xtr, ytr, xte, yte
    example = (xtr[:BATCH].clone(),)
    results = {}
    for name, setting in settings:
        runs = []
        for seed in range(args.seeds):
            model = H.seeded_model(make_model, seed)
            cur = {"y": ytr[:BATCH]}
            loss_fn = lambda out: seg_loss(out, cur["y"])  # noqa: E731
            gm, err = H.build(model, example, loss_fn, setting)
            if err is not None:
                results[name] = dict(error=H.error_text(err))
                print(f"{name}: {results[name]['error']}", file=sys.stderr)
                runs = None
                break
            rec = dict(seed=seed)
            if seed == 0:
                rec.update(H.measure_step(gm, model, example, loss_fn),
                           decisions=H.dec_text(H.decisions(gm), empty=""))
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            rec.update(H.train(name, seed, gm, model, opt, data, seg_loss, DICE,
                               epochs=args.epochs, batch=BATCH))
            runs.append(rec)
        if runs is not None:
            results[name] = dict(runs=runs)
    figure = "unet3d_methods_curves.png" if args.methods else "unet3d_curves.png"
    H.report(results, args, DICE, columns, figure, "3D UNet toy" + (", methods" if args.methods else ""))


if __name__ == "__main__":
    main()
