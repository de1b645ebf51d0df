"""What each forward node of a step allocates, read off fxsketch's fake-step profile (no activation
is allocated): outputs, internals, the step's workspace and its kernels' workspace, per node in a
range. docs/replays.md reads ResNet-50's floor off it (what a replay's forward holds at once).

    .venv/bin/python tools/step_profile.py torchvision.models:resnet50 --input 184x3x224x224 \\
        --first layer1_0_conv1 --last add_1
"""
from __future__ import annotations

import argparse
import importlib

import torch

from fxsketch import pipeline
from fxsketch.config import Config
from fxsketch.units import format_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="module:factory, e.g. torchvision.models:resnet50")
    ap.add_argument("--input", required=True, help="input shape, e.g. 184x3x224x224 (meta)")
    ap.add_argument("--first", help="first node name (default: the first)")
    ap.add_argument("--last", help="last node name (default: the last)")
    args = ap.parse_args(argv)
    mod, fn = args.model.split(":")
    torch.manual_seed(0)
    model = getattr(importlib.import_module(mod), fn)()
    x = torch.empty([int(s) for s in args.input.split("x")], device="meta")
    with Config().planning_context():  # kernel workspace measured, as a plan does
        a = pipeline.analyse(model, (x,))
    sched = a.schedule
    names = [n.name for n in a.gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    i = names.index(args.first) if args.first else 0
    j = names.index(args.last) if args.last else len(names) - 1
    print("| node | allocates (kind: bytes) | reads |")
    print("|---|---|---|")
    for name in names[i:j + 1]:
        st = sched.steps[sched.index("forward", name)]
        made = ", ".join(f"{sched.storages[s].kind.value}: {format_bytes(sched.storages[s].nbytes)}" for s in st.allocs)
        reads = ", ".join(format_bytes(sched.storages[s].nbytes) for s in st.reads)
        print(f"| {name} | {made} | {reads} |")


if __name__ == "__main__":
    main()
