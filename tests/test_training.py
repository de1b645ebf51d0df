"""Training with probed gradients on real data (scikit-learn's bundled digits), on CPU.

A short run (well under a minute): the optimized model, with probed convs whose sketch size the
calibration chose, must learn as the exact model does from the same initialisation. And a larger
``max_grad_noise`` must never give a conv a larger sketch.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.report import Option

datasets = pytest.importorskip("sklearn.datasets")


def digits(n_test=360):
    """Digits 8x8 -> 16x16 (bilinear), standardised; a fixed shuffled train/test split."""
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def plain_cnn(c=16, n=4):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, c, 3, padding=1), nn.ReLU()]
    for _ in range(n - 1):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, 10))


def ranks(plan) -> dict[str, int]:
    return {d.node: int(re.search(r"r=(\d+)", d.detail).group(1))
            for d in plan.decisions if d.option is Option.PROBE}


def train(module, xtr, ytr, steps, batch=64, lr=2e-3):
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)  # the same batches for every run
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (batch,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(module(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(module, x, y):
    return 100.0 * (module(x).argmax(1) == y).float().mean().item()


def test_optimized_model_learns_as_the_exact_one_does():
    xtr, ytr, xte, yte = digits()
    exact = plain_cnn()
    model = copy.deepcopy(exact)
    xb, yb = xtr[:64], ytr[:64]
    gm = fxsketch.optimize(model, (xb,), None, loss_fn=lambda out: F.cross_entropy(out, yb),
                           methods=("probe", "lean"), max_overhead=10.0, max_grad_noise=2.0,
                           seed=0, progress=False)
    probed = ranks(gm.memory_plan)
    assert probed, "the plan should probe some convs for this test to mean anything"
    assert all(0 < d.grad_noise <= 2.0 for d in gm.memory_plan.decisions if d.option is Option.PROBE)

    steps = 150
    torch.manual_seed(2)
    loss_exact = train(exact, xtr, ytr, steps)
    torch.manual_seed(2)
    loss_opt = train(gm, xtr, ytr, steps)
    first_exact, first_opt = (sum(v[:5]) / 5 for v in (loss_exact, loss_opt))
    last_exact, last_opt = (sum(v[-10:]) / 10 for v in (loss_exact, loss_opt))
    # both learn: the loss falls to well under half of its start
    assert last_exact < 0.5 * first_exact
    assert last_opt < 0.5 * first_opt
    # ... and the probed run follows the exact one. Probe noise (here up to 2x the SGD noise)
    # slows it a little this early: after 150 steps loss 0.33 vs 0.28, test accuracy 89.2 vs
    # 89.7 %; over probe seeds 1-4 the loss is 0.36-0.39 and the accuracy 0.5-2.8 points lower
    assert last_opt < 1.5 * last_exact + 0.1, (last_opt, last_exact)
    acc_exact, acc_opt = accuracy(exact, xte, yte), accuracy(gm, xte, yte)
    assert acc_opt > acc_exact - 5.0, (acc_opt, acc_exact)


def test_a_larger_max_grad_noise_never_yields_a_larger_sketch():
    xtr, ytr, _, _ = digits()
    model = plain_cnn()
    xb, yb = xtr[:64], ytr[:64]
    found = {}
    for limit in (0.5, 1.0, 2.0, 4.0, 16.0):
        plan = fxsketch.plan(model, (xb,), None, optimized=True, loss_fn=lambda out: F.cross_entropy(out, yb),
                             methods=("probe", "lean"), max_overhead=10.0, max_grad_noise=limit,
                             ratios=(1 / 2, 1 / 4, 1 / 16, 1 / 64), progress=False)
        found[limit] = ranks(plan)
    limits = sorted(found)
    assert found[limits[-1]], "the loosest limit should let some conv probe"
    for lo, hi in zip(limits, limits[1:]):
        for node, r in found[lo].items():
            # a conv probed under the tighter limit stays probed, with a sketch no larger
            assert node in found[hi] and found[hi][node] <= r, (node, lo, r, hi, found[hi].get(node))
