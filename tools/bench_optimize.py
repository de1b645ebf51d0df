"""Benchmark fxsketch.optimize against eager and torch.utils.checkpoint on CPU: memory, time, gradients.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_optimize.py            # markdown table on stdout
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_optimize.py --quick --models resnet18

Per model (small CPU sizes) and method, one row:

- predicted peak: ``fxsketch.plan`` of the eager model, ``gm.memory_plan.peak_bytes`` of an
  optimized one (no prediction for torch.utils.checkpoint, which fx does not trace);
- measured peak: ``fxsketch.measure`` (exact CPU live-storage tracker), and step time, the
  median of ``--repeat`` timed steps after one warm-up and one tracked step;
- reduction = eager measured peak / measured peak; overhead = step time / eager step time - 1;
- est. overhead: the planner's own estimate against the step as given (``memory_plan.overhead``: the
  layout's measured change and the decisions' ``extra_time``);
- gradients: one step on the same batch and seed as eager. "dW err (probed)" is the max over the
  probed conv weights of ||g - g_exact|| / ||g_exact||; "max rel err (exact params)" is the worst
  such ratio over every other parameter (expected ~1e-6, must be <= 1e-4).

Methods: eager; checkpoint (checkpoint_sequential over ceil(sqrt(n)) segments of the model's
top-level blocks; skipped for the UNet, whose skip connections are not a sequence); fxsketch with
methods ("recompute",), ("probe", "lean"), ("probe", "lean", "recompute") at budget=None and
("probe", "lean", "recompute") at budget=1/3, all with max_overhead=0.15 and seed=0 (a private
probe generator, so probes do not shift the dropout masks that eager draws from the same seed).
Every cell catches its own exception and reports the error class and first line.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import traceback
from datetime import datetime, timezone

import torch
from torch import nn

import fxsketch
from fxsketch.units import format_bytes

MAX_OVERHEAD = 0.15

# name -> (factory, full input shape, quick input shape)
MODELS = {
    "resnet18": ("resnet18", (16, 3, 224, 224), (8, 3, 64, 64)),
    "resnet50": ("resnet50", (16, 3, 224, 224), (4, 3, 64, 64)),
    "vgg16": ("vgg16", (16, 3, 224, 224), (4, 3, 64, 64)),
    "mobilenet_v2": ("mobilenet_v2", (32, 3, 224, 224), (8, 3, 64, 64)),
    "r3d_18": ("r3d_18", (2, 3, 8, 112, 112), (1, 3, 4, 56, 56)),
    "unet3d": ("unet3d", (2, 1, 96, 96, 96), (1, 1, 32, 32, 32)),
}

# method -> fxsketch.optimize arguments (None: not an fxsketch method)
METHODS = {
    "eager": None,
    "checkpoint sqrt(n)": None,
    "fxsketch recompute": dict(budget=None, methods=("recompute",)),
    "fxsketch probe+lean": dict(budget=None, methods=("probe", "lean")),
    "fxsketch all": dict(budget=None, methods=("probe", "lean", "recompute")),
    "fxsketch all, budget=1/3": dict(budget=1 / 3, methods=("probe", "lean", "recompute")),
}


def build(name: str) -> nn.Module:
    if name == "unet3d":
        from monai.networks.nets import UNet
        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128),
                    strides=(2, 2, 2), num_res_units=2)
    import torchvision
    if name == "r3d_18":
        return torchvision.models.video.r3d_18()
    return getattr(torchvision.models, name)()


# ------------------------------------------------------------------------------------------------
# torch.utils.checkpoint baseline


def block_sequence(name: str, m: nn.Module) -> list[nn.Module] | None:
    """The model as a flat list of blocks run one after another; None where it is not a sequence."""
    if name.startswith("resnet"):
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        return [stem, *m.layer1, *m.layer2, *m.layer3, *m.layer4, m.avgpool, nn.Flatten(1), m.fc]
    if name == "vgg16":
        return [*m.features, m.avgpool, nn.Flatten(1), *m.classifier]
    if name == "mobilenet_v2":
        return [*m.features, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), *m.classifier]
    if name == "r3d_18":
        return [m.stem, *m.layer1, *m.layer2, *m.layer3, *m.layer4, m.avgpool, nn.Flatten(1), m.fc]
    return None  # MONAI UNet: nested SkipConnections, not a sequence


class CheckpointSequential(nn.Module):
    """checkpoint_sequential over ceil(sqrt(n)) segments; shares the original modules (and parameters)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.segments = max(1, math.ceil(math.sqrt(len(blocks))))
        size = len(blocks) // self.segments
        # An in-place ReLU starting a segment would overwrite the input that segment's checkpoint
        # keeps (VGG): a fresh out-of-place ReLU replaces it (the original module is not touched).
        blocks = [nn.ReLU() if i % size == 0 and isinstance(b, nn.ReLU) and b.inplace else b
                  for i, b in enumerate(blocks)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint_sequential(self.blocks, self.segments, x,
                                                            use_reentrant=False)


# ------------------------------------------------------------------------------------------------
# gradients


def _default_loss(out):
    from fxsketch.measurement import default_loss
    return default_loss(out)


def grads_of(module, params, x):
    for p in params:
        p.grad = None
    torch.manual_seed(0)
    with torch.enable_grad():
        out = module(x)
        _default_loss(out).backward()
    del out
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def probed_weight_names(gm) -> set[str]:
    """Parameter names of the weights that the rewritten graph passes to ops.probed_conv."""
    from fxsketch import ops
    names = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is getattr(ops, "probed_conv", None):
            w = n.args[1]
            if getattr(w, "op", None) == "get_attr":
                names.add(w.target)
    return names


def grad_errors(names, exact, got, probed: set[str]) -> tuple[float | None, float, str]:
    """(max rel. error over probed weights or None, max rel. error over the others, worst other name)."""
    probe_err, other_err, other_name = None, 0.0, "-"
    for name, g0, g1 in zip(names, exact, got):
        if g0 is None and g1 is None:
            continue
        if g0 is None or g1 is None:
            err = math.inf
        else:
            denom = g0.norm().item()
            err = (g1 - g0).norm().item() / denom if denom > 0 else (g1 - g0).norm().item()
        if name in probed:
            probe_err = err if probe_err is None else max(probe_err, err)
        elif err >= other_err:
            other_err, other_name = err, name
    return probe_err, other_err, other_name


# ------------------------------------------------------------------------------------------------


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def _choices(plan) -> str:
    counts = {}
    for d in plan.decisions:
        counts[d.option.value] = counts.get(d.option.value, 0) + 1
    return " ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


def run_model(name: str, shape, methods: list[str], repeat: int, log, options=None) -> list[dict]:
    """One row per method; ``options`` are extra fxsketch.optimize keywords (e.g. max_grad_noise)."""
    rows = []
    torch.manual_seed(0)
    try:
        model = build(name)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return [dict(model=name, shape=shape, method=m, error=f"model: {_why(e)}") for m in methods]
    model.train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    names, params = zip(*model.named_parameters())
    exact = None
    eager = None
    for method in methods:
        row = dict(model=name, shape=shape, method=method)
        rows.append(row)
        t0 = time.perf_counter()
        stage = "setup"
        try:
            spec = METHODS[method]
            probed: set[str] = set()
            if method == "eager":
                run = model
                stage = "plan"
                row["pred"] = fxsketch.plan(model, (x,)).peak_bytes
            elif method.startswith("checkpoint"):
                blocks = block_sequence(name, model)
                if blocks is None:
                    row["skip"] = "not a sequence of blocks (skip connections); skipped"
                    log(f"  {name:13s} {method:26s} skipped")
                    continue
                run = CheckpointSequential(blocks)
            else:
                stage = "optimize"
                run = fxsketch.optimize(model, (x,), spec["budget"], methods=spec["methods"],
                                        max_overhead=MAX_OVERHEAD, seed=0, **(options or {}))
                p = run.memory_plan
                row["pred"] = p.peak_bytes
                row["pred_base"] = p.baseline_peak_bytes
                row["est_overhead"] = p.overhead
                row["choices"] = _choices(p)
                row["notes"] = list(p.notes)
                probed = probed_weight_names(run)
            row["plan_s"] = time.perf_counter() - t0
            stage = "measure"
            m = fxsketch.measure(run, (x,), repeat=repeat)
            row["peak"], row["seconds"] = m.peak_bytes, m.seconds
            stage = "gradients"
            if method == "eager":
                exact = grads_of(model, params, x)
                eager = row
            elif exact is not None:
                got = grads_of(run, params, x)
                row["probe_err"], row["other_err"], row["other_name"] = grad_errors(names, exact, got, probed)
                row["n_probed"] = len(probed)
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the table
            row["error"] = f"{stage}: {_why(e)}"
            log(f"  {name:13s} {method:26s} ERROR {row['error']}")
            log("".join(traceback.format_exception(e)[-3:]).rstrip())
            continue
        if eager is not None and "peak" in row:
            row["reduction"] = eager["peak"] / row["peak"]
            row["overhead"] = row["seconds"] / eager["seconds"] - 1
        log(f"  {name:13s} {method:26s} peak {format_bytes(row['peak']):>11} "
            f"{row['seconds'] * 1e3:8.0f} ms  ({time.perf_counter() - t0:.0f} s)")
    return rows


def _fmt_err(v):
    if v is None:
        return "-"
    return f"{v:.1e}" if v < 0.01 else f"{v:.2f}"


def markdown(rows) -> str:
    head = ("model (input)", "method", "predicted peak", "measured peak", "step time", "reduction",
            "overhead", "est. overhead", "choices", "dW err (probed)", "max rel err (exact params)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        first = f"{r['model']} ({'x'.join(map(str, r['shape']))})"
        if "error" in r or "skip" in r:
            cells = [first, r["method"], format_bytes(r["pred"]) if "pred" in r else "-",
                     f"**failed** — {r['error']}" if "error" in r else r["skip"]] + ["-"] * (len(head) - 4)
        else:
            probe = "-"
            if r.get("n_probed"):
                probe = f"{_fmt_err(r.get('probe_err'))} ({r['n_probed']} convs)"
            other = "-"
            if "other_err" in r:
                other = _fmt_err(r["other_err"]) + (" **> 1e-4**" if r["other_err"] > 1e-4 else "")
            cells = [first, r["method"], format_bytes(r["pred"]) if "pred" in r else "-",
                     format_bytes(r["peak"]), f"{r['seconds'] * 1e3:.0f} ms",
                     f"{r['reduction']:.2f}x" if "reduction" in r else "-",
                     f"{100 * r['overhead']:+.0f} %" if "overhead" in r else "-",
                     f"{100 * r['est_overhead']:.1f} %" if "est_overhead" in r else "-",
                     r.get("choices", "-"), probe, other]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS),
                    help="models to run (default: all)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="methods to run (default: all; eager is always added first)")
    ap.add_argument("--quick", action="store_true", help="smaller inputs, one timed step")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per cell (default 3; 1 with --quick)")
    ap.add_argument("--shape", default=None, help="input shape for every model run, e.g. 64x3x224x224")
    ap.add_argument("--max-grad-noise", type=float, default=None,
                    help="fxsketch.optimize's max_grad_noise (default: its own, 1.0)")
    args = ap.parse_args(argv)
    options = {} if args.max_grad_noise is None else dict(max_grad_noise=args.max_grad_noise)
    repeat = args.repeat or (1 if args.quick else 3)
    methods = ["eager"] + [m for m in args.methods if m != "eager"]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows = []
    for name in args.models:
        _, full, quick = MODELS[name]
        shape = tuple(int(v) for v in args.shape.split("x")) if args.shape else (quick if args.quick else full)
        rows += run_model(name, shape, methods, repeat, log, options)
    print(f"torch {torch.__version__}, fxsketch from {fxsketch.__file__}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {repeat} timed step(s) per cell (median), "
          f"total {time.perf_counter() - start:.0f} s"
          + "".join(f", {k}={v}" for k, v in options.items()))
    print()
    print(markdown(rows))
    notes = [(r["model"], r["method"], n) for r in rows for n in r.get("notes", ())]
    if notes:
        print()
        for model, method, n in notes:
            print(f"- {model}, {method}: planner note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
