"""Accuracy, memory and time of fxsketch's gradient methods side by side, on the digits data.

    .venv/bin/python tools/train_methods.py --epochs 5 --seeds 3 --out /tmp --json /tmp/methods.json

Data, split and models are those of tools/train_digits.py (sklearn's 8x8 digits upsampled to
32x32; ``--model small`` by default: conv-BN-ReLU x2, max-pool, conv-BN-ReLU, average pool,
linear; ``--model deep``: 8 conv-BN-ReLU blocks). Every setting trains the same architecture
from the same initialisation per seed with the same optimiser (SGD, momentum 0.9, weight decay
1e-4, cosine schedule, ``--lr``) and the training loop of tools/_harness.py; the plan is made
once on the seed-0 initialisation, and each seed loads its own initialisation into the shared
parameters. Settings (rows):

- exact: backprop, the model itself;
- probing: ``fxsketch.optimize(model, example)`` -- the default plan (probe, lean, recompute);
- DFA: ``methods=("dfa-plain",)``; MEM-DFA: ``methods=("dfa",)`` (the same updates, less memory);
- Mem-AOP-GD: ``methods=("aop",), aop_layers="all", aop_k=1/2`` and ``1/4`` (every conv and
  linear layer; top-K policy, decay 1; the memory of dropped outer products is cleared with
  ``fxsketch.reset_aop_memory`` before each seed).

Columns: final test accuracy (mean ± std over seeds), the measured and predicted peak memory of
one training step (``fxsketch.measure``, the plan's prediction), activation bytes and their
reduction against exact (as in tools/train_digits.py), and the training wall time per step of
seed 0 (the loop's time over its steps, per-epoch evaluation included). More settings are rows
added to ``SETTINGS``; tools/train_unet3d.py ``--methods`` trains the same rows on the 3D toy.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import fxsketch

import _harness as H
from _harness import dec_text, mib
from train_digits import BATCH, ACCURACY, load_digits_tensors, make_deep, make_small

SETTINGS = H.METHODS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("small", "deep"), default="small")
    H.add_training_args(ap, epochs=5, seeds=3, lr=0.05)
    H.add_output_args(ap, json_help="write raw results here")
    args = ap.parse_args(argv)
    make_model = dict(small=make_small, deep=make_deep)[args.model]
    data = xtr, ytr, _, _ = load_digits_tensors()
    steps = len(xtr) // BATCH
    example, example_y = (xtr[:BATCH].clone(),), ytr[:BATCH].clone()
    results = {}
    for name, setting in SETTINGS:
        model = H.seeded_model(make_model, 0)
        cur_y = {"y": example_y}
        loss_fn = lambda out: F.cross_entropy(out, cur_y["y"])  # noqa: E731
        gm, err = H.build(model, example, loss_fn, None if setting is None else dict(setting, progress=False, seed=0))
        if err is not None:
            results[name] = dict(error=H.error_text(err))
            print(f"{name}: {results[name]['error']}", file=sys.stderr)
            continue
        head = dict(H.measure_step(gm, model, example, loss_fn), decisions=H.decisions(gm))
        print(f"{name}: measured {mib(head['measured_peak'])} MiB, predicted {mib(head['predicted_peak'])} MiB; "
              f"{dec_text(head['decisions'])}", file=sys.stderr)
        runs = []
        for seed in range(args.seeds):
            model.load_state_dict(H.seeded_model(make_model, seed).state_dict())  # gm shares model's tensors
            fxsketch.reset_aop_memory(gm)  # each seed starts with an empty Mem-AOP-GD memory
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps)
            rec = dict(seed=seed, **H.train(name, seed, gm, model, opt, data, F.cross_entropy, ACCURACY,
                                            epochs=args.epochs, batch=BATCH, sched=sched, target=cur_y))
            if seed == 0:
                rec.update(head)
            runs.append(rec)
        results[name] = dict(runs=runs)
    columns = [("train ms/step (seed 0)", H.step_ms),
               ("plan", lambda s0: dec_text(s0["decisions"]))]
    H.report(results, args, ACCURACY, columns, f"methods_{args.model}_curves.png", "digits, methods")
    return results


if __name__ == "__main__":
    main()
