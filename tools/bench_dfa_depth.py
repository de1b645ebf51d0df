"""Measured peak memory of one training step against depth: backprop, probing, DFA, MEM-DFA.

    .venv/bin/python tools/bench_dfa_depth.py                      # depths 4 8 16 32, markdown table
    .venv/bin/python tools/bench_dfa_depth.py --depths 4 8 --batch 8 --json /tmp/dfa_depth.json

Model: a plain conv chain, ``depth`` weight layers: conv 3->C, (depth-2) x conv CxC (3x3, pad 1,
each followed by ReLU), global average pool, linear C->10, on N x 3 x S x S inputs (default
C=16, S=32, N=16), loss = cross-entropy on fixed random labels. Per depth and setting,
``fxsketch.measure(module, (x,), loss_fn=..., repeat=R)`` gives the measured peak (the exact
CPU live-storage tracker) and the median step time; the settings are

- backprop: the model itself;
- probing: ``fxsketch.optimize(model, (x,), loss_fn=..., seed=0)`` -- the default plan (probe,
  lean, recompute; budget=None: the lowest peak within the default max_overhead);
- DFA: ``methods=("dfa-plain",)`` (the same gradients as MEM-DFA, activations saved as usual);
- MEM-DFA: ``methods=("dfa",)``, with its predicted peak (``gm.memory_plan.peak_bytes``) beside.

A column whose optimize() fails shows the error. Whose memory stays flat is read off the table:
the parameters and their gradients grow with depth for every setting (they are in the peak).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fxsketch


def chain(depth: int, channels: int) -> nn.Module:
    layers = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


SETTINGS = {
    "backprop": None,
    "probing": {},
    "DFA": {"methods": ("dfa-plain",)},
    "MEM-DFA": {"methods": ("dfa",)},
}


def run(depth: int, args) -> dict:
    torch.manual_seed(0)
    model = chain(depth, args.channels)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    row = {"depth": depth, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    for name, options in SETTINGS.items():
        try:
            gm = model if options is None else fxsketch.optimize(model, (x,), loss_fn=loss_fn, seed=0,
                                                                progress=False, **options)
        except Exception as e:  # shown in the table, not hidden
            row[name] = {"error": f"{type(e).__name__}: {e}".replace("\n", " ")}
            continue
        m = fxsketch.measure(gm, (x,), loss_fn=loss_fn, repeat=args.repeat)
        plan = getattr(gm, "memory_plan", None)
        row[name] = {"measured": m.peak_bytes, "seconds": m.seconds,
                     "predicted": plan.peak_bytes if plan is not None else None}
        print(f"depth {depth} {name}: {m}", file=sys.stderr)
    return row


def mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def table(rows: list[dict]) -> str:
    head = ["depth", "params+grads MiB", *(f"{n} MiB" for n in SETTINGS), "MEM-DFA predicted MiB",
            *(f"{n} ms/step" for n in SETTINGS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["depth"]), mib(2 * r["param_bytes"])]
        cells += [r[n].get("error", "")[:80] or mib(r[n]["measured"]) for n in SETTINGS]
        mem = r["MEM-DFA"]
        cells.append(mib(mem["predicted"]) if "predicted" in mem else "-")
        cells += ["-" if "error" in r[n] else f"{1e3 * r[n]['seconds']:.0f}" for n in SETTINGS]
        lines.append("| " + " | ".join(cells) + " |")
    first, last = rows[0], rows[-1]
    growth = [f"{n} x{last[n]['measured'] / first[n]['measured']:.2f}" for n in SETTINGS
              if "measured" in first[n] and "measured" in last[n]]
    lines.append("")
    lines.append(f"measured peak at depth {last['depth']} / depth {first['depth']}: " + ", ".join(growth))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if min(args.depths) < 2:
        ap.error("--depths: every depth must be at least 2 (first conv and the linear head)")
    rows = [run(d, args) for d in args.depths]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
