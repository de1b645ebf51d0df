"""Which ops hold memory that no tensor tracker sees: the per-op gap of one training step.

    .venv/bin/python tools/op_gaps.py --only vgg16 resnet50

For each model of tools/bench_process_memory.py (eager, and the default ``fxsketch.optimize``
plan), one training step runs in a fresh process (``fxsketch.passes.workspace.run_fresh``: glibc
returns freed buffers of 64 KiB and more to the OS) under a dispatch mode that resets the peak
RSS before every op and reads it after: the op's gap is peak RSS - RSS before - the bytes of the
new storages it returns. Printed: each op whose largest gap exceeds ``--min`` (default 1 %) of
the step's process-level peak, with its largest gap and how many calls, and whether the plan
counts it: as kernel workspace (``fxsketch.passes.workspace.KERNEL_OPS``), or, for fxsketch's own
ops, as the tensors the fake step sees inside them (their gap here is those inner tensors).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fxsketch
from fxsketch.passes import workspace as W

sys.path.insert(0, os.path.dirname(__file__))


class _Gaps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gaps: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = W._rss()[0]
        out = func(*args, **(kwargs or {}))
        peak = W._rss()[1]
        new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs}
        self.gaps.setdefault(str(func), []).append(peak - before - sum(new.values()))
        return out


def _in_plan(op: str, counted: set[str]) -> str:
    """Whether the plan counts an op's hidden memory: kernel workspace (KERNEL_OPS), or fxsketch's
    own ops, whose temporaries are tensors the fake step sees inside them (``call_visibly``)."""
    if op in counted:
        return "yes (kernel workspace)"
    return "yes (inner tensors)" if op.startswith("fxsketch.") else "no"


def _child(path: str) -> None:
    from fxsketch.measurement import _step, default_loss
    model, inputs = torch.load(path, weights_only=False)
    _step(model, inputs, default_loss)  # warm-up
    for p in model.parameters():
        p.grad = None
    mode = _Gaps()
    with mode:
        _step(model, inputs, default_loss)
    for op, gaps in mode.gaps.items():
        print(f"{op}\t{max(gaps)}\t{len(gaps)}")


def main(argv=None):
    from bench_process_memory import models
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--min", type=float, default=0.01, help="smallest gap shown, a fraction of the step's peak")
    args = ap.parse_args(argv)
    counted = {str(op) for op in W.KERNEL_OPS}
    print("| model | step | op | largest gap MiB | % of process peak | calls | in the plan |")
    print("|---|---|---|---|---|---|---|")
    for name, model, x in models(args.only):
        gm = fxsketch.optimize(model, (x,), progress=False, seed=0)
        for which, module in (("eager", model), ("optimized", gm)):
            peak = fxsketch.measure(module, (x,), repeat=1, level="process").process_peak_bytes
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "step.pt")
                torch.save((module, (x,)), path)
                out = W.run_fresh([__file__, "--child", path])
            rows = [line.split("\t") for line in out.strip().splitlines()]
            for op, gap, calls in sorted(rows, key=lambda r: -int(r[1])):
                if int(gap) > args.min * peak:
                    print(f"| {name} | {which} | {op} | {int(gap) / 2**20:.1f} | {100 * int(gap) / peak:.1f} | "
                          f"{calls} | {_in_plan(op, counted)} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
