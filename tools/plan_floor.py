"""One planned step's reduction at a given ``max_overhead``, where its peak sits and what is
alive there. At a large overhead (e.g. 100) it is the floor of the option set itself, not of
this machine's prices. Meta inputs, ``budget=None``, ``seed=0``, noise calibrated on 2 real
samples, as ``tools/bench_deep.py`` plans.

    .venv/bin/python tools/plan_floor.py unet 100        # MONAI UNet 2x1x96^3
    .venv/bin/python tools/plan_floor.py resnet50 0.15   # ResNet-50 16x3x224^2
    .venv/bin/python tools/plan_floor.py resnet50 100 --methods probe lean recompute
    .venv/bin/python tools/plan_floor.py resnet50 100 --measure   # and the real step, tracked

``--measure`` runs the planned step (``fxsketch.optimize`` on the same meta inputs) once on real
inputs of that shape under fxsketch's live-storage tracker and prints its tensor-level peak
against the plan's, and the op at which it peaks.
"""
from __future__ import annotations

import argparse
import time

import torch

import fxsketch
from fxsketch.units import format_bytes

from bench_deep import MEASURE, PREDICT


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MEASURE))
    ap.add_argument("max_overhead", type=float)
    ap.add_argument("--large", action="store_true", help="bench_deep's predicted (large) shape, not its measured one")
    ap.add_argument("--methods", nargs="+", help="option kinds (default: the default methods)")
    ap.add_argument("--top", type=int, default=25, help="storages alive at the peak to print")
    ap.add_argument("--measure", action="store_true", help="also run the planned step on real inputs, tracked")
    args = ap.parse_args(argv)
    make, shape = (PREDICT if args.large else MEASURE)[args.model]
    torch.manual_seed(0)
    model = make(shape[-1])
    opts = dict(max_overhead=args.max_overhead, seed=0, progress=False,
                calibration_inputs=(torch.randn(2, *shape[1:]),))
    if args.methods:
        opts["methods"] = tuple(args.methods)
    t = time.perf_counter()
    p = fxsketch.plan(model, (torch.empty(shape, device="meta"),), None, optimized=True, **opts)
    print(f"{args.model} {'x'.join(map(str, shape))} at max_overhead {args.max_overhead}: "
          f"{format_bytes(p.baseline_peak_bytes)} -> {format_bytes(p.peak_bytes)} "
          f"({p.baseline_peak_bytes / p.peak_bytes:.2f}x; tensor level {format_bytes(p.tensor_peak_bytes)}), "
          f"est. overhead {100 * p.overhead:+.1f} % (options {100 * p.extra_time:.1f} %, layout {100 * p.layout_time:+.1f} %), planned in {time.perf_counter() - t:.0f} s")
    print(f"peak at {p.peak_node}:")
    for owner, category, nbytes in p.alive_at_peak[:args.top]:
        print(f"  {owner} ({category}) {format_bytes(nbytes)}")
    for note in p.notes:
        print(f"note: {note}")
    if args.measure:
        _measure(model, shape, opts, p)


def _measure(model, shape, opts, p):
    """The planned step on real inputs under the live-storage tracker: its peak and where."""
    from fxsketch.measurement import LiveStorageTracker, default_loss
    gm = fxsketch.optimize(model, (torch.empty(shape, device="meta"),), None, **opts)
    x = torch.randn(shape)
    with LiveStorageTracker(list(gm.parameters()) + list(gm.buffers()) + [x], record=True) as tr:
        default_loss(gm(x)).backward()
    k = max(range(len(tr.timeline)), key=lambda i: tr.timeline[i][1])
    print(f"measured: {format_bytes(tr.peak_bytes)} at op {tr.timeline[k][0]} ({k} of {len(tr.timeline)}); "
          f"plan {format_bytes(gm.memory_plan.tensor_peak_bytes)}, predicted/measured "
          f"{gm.memory_plan.tensor_peak_bytes / tr.peak_bytes:.3f}")


if __name__ == "__main__":
    main()
