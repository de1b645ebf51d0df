"""The planner's single-node choices at some nodes of a step: option kind, estimated extra time
(fraction of the step), gradient noise (units of SGD noise) and detail, as ``pipeline.propose``
describes them on meta inputs with noise calibrated on a few real samples (docs/quant.md reads
the quantized conv inputs' prices and levels off it).

    .venv/bin/python tools/list_choices.py torchvision.models:resnet50 --input 184x3x224x224 \\
        --nodes layer1_0_conv1 layer1_0_bn1 layer1_1_conv1 layer3_0_conv2
"""
from __future__ import annotations

import argparse
import importlib

import torch

from fxsketch import pipeline
from fxsketch.config import Config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="module:factory, e.g. torchvision.models:resnet50")
    ap.add_argument("--input", required=True, help="input shape, e.g. 184x3x224x224 (meta)")
    ap.add_argument("--nodes", nargs="+", required=True, help="node names")
    ap.add_argument("--calibration-samples", type=int, default=2, help="real samples noise is calibrated on")
    ap.add_argument("--max-overhead", type=float, default=0.10)
    args = ap.parse_args(argv)
    mod, fn = args.model.split(":")
    torch.manual_seed(0)
    model = getattr(importlib.import_module(mod), fn)()
    shape = [int(s) for s in args.input.split("x")]
    config = Config.from_options(None, budget=None, max_overhead=args.max_overhead, seed=0)
    analysis = pipeline.relayout(pipeline.analyse(model, (torch.empty(shape, device="meta"),)), config)
    calib = (torch.randn(args.calibration_samples, *shape[1:]),)
    every = pipeline.propose(model, analysis, config, calibration_inputs=calib).every
    print("| node | option | extra time | noise | detail |")
    print("|---|---|---|---|---|")
    for ch, cand in zip(every.problem.choices, every.candidates):
        if len(cand.nodes) == 1 and cand.nodes[0] in args.nodes:
            print(f"| {cand.nodes[0]} | {cand.kind} | {100 * ch.cost:.3f} % | {ch.noise:.3f} | {cand.detail} |")


if __name__ == "__main__":
    main()
