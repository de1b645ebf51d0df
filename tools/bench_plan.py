"""Benchmark the planner: planning time, predicted peak, measured peak (exact CPU tracker), error.

    .venv/bin/python tools/bench_plan.py            # prints a markdown table

Planning time is the median of ``--repeat`` calls after one warm-up call. The last row plans
ResNet-50 at 256x3x224x224 on a meta input (shapes only; nothing is allocated or measured).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import fxsketch
from fxsketch.units import format_bytes


def _tv(name):
    import torchvision
    return lambda: getattr(torchvision.models.video if name == "r3d_18" else torchvision.models, name)()


def _unet():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                strides=(2, 2, 2), num_res_units=2)


class _Recurrent(torch.nn.Module):
    """An RNN (its fused kernel is one node) and a linear head."""

    def __init__(self, cls, layers):
        super().__init__()
        self.rnn = cls(128, 128, layers, batch_first=True)
        self.fc = torch.nn.Linear(128, 4)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


class _Attention(torch.nn.Module):
    """One F.scaled_dot_product_attention over a QKV projection."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(64, 192)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (z.view(b, t, 4, 16).transpose(1, 2) for z in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 64)


class _Encoder(torch.nn.Module):
    """A TransformerEncoderLayer inside a model: one opaque node (torch.nn keeps it whole)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(64, 128)
        self.enc = torch.nn.TransformerEncoderLayer(128, 4, 256, batch_first=True, dropout=0.0)
        self.out = torch.nn.Linear(128, 4)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


# (row name, model factory, input shape, measure?)
CASES = [
    ("resnet18", _tv("resnet18"), (8, 3, 64, 64), True),
    ("resnet50", _tv("resnet50"), (8, 3, 64, 64), True),
    ("vgg11", _tv("vgg11"), (8, 3, 64, 64), True),
    ("mobilenet_v2", _tv("mobilenet_v2"), (8, 3, 64, 64), True),
    ("r3d_18", _tv("r3d_18"), (2, 3, 8, 64, 64), True),
    ("MONAI 3D UNet", _unet, (2, 1, 64, 64, 64), True),
    ("resnet50 (meta input)", _tv("resnet50"), (256, 3, 224, 224), False),
    ("LSTM 1 layer", lambda: _Recurrent(torch.nn.LSTM, 1), (32, 64, 128), True),
    ("LSTM 2 layers", lambda: _Recurrent(torch.nn.LSTM, 2), (32, 64, 128), True),
    ("GRU 2 layers", lambda: _Recurrent(torch.nn.GRU, 2), (32, 64, 128), True),
    ("attention (SDPA)", _Attention, (8, 128, 64), True),
    ("TransformerEncoderLayer (nested)", _Encoder, (32, 64, 64), True),
]


def plan_seconds(model, inputs, repeat: int) -> tuple[float, fxsketch.MemoryPlan]:
    p = fxsketch.plan(model, inputs)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        p = fxsketch.plan(model, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), p


def run(repeat: int, only: list[str] | None) -> list[tuple[str, ...]]:
    rows = []
    for name, make, shape, do_measure in CASES:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        try:
            torch.manual_seed(0)
            model = make()
        except ImportError as e:
            rows.append((name, "x".join(map(str, shape)), "-", "-", "-", f"skipped: {e}"))
            continue
        x = torch.randn(shape) if do_measure else torch.empty(shape, device="meta")
        seconds, p = plan_seconds(model, (x,), repeat)
        if do_measure:
            measured = fxsketch.measure(model, (x,), repeat=1).peak_bytes
            # the tracker sees tensors: compare the plan's tensor-level peak (no kernel workspace)
            cells = (format_bytes(measured), f"{100 * (p.tensor_peak_bytes / measured - 1):+.2f}")
        else:
            cells = ("-", "-")
        rows.append((name, "x".join(map(str, shape)) + ("" if do_measure else " (meta)"),
                     f"{seconds:.2f}", format_bytes(p.tensor_peak_bytes), *cells))
        print(f"  done {name}", flush=True)
    return rows


def markdown(rows) -> str:
    head = ("model", "input shape", "planning time (s)", "predicted peak", "measured peak (CPU tracker)", "error %")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed planning calls per model (median)")
    ap.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    args = ap.parse_args(argv)
    rows = run(args.repeat, args.only)
    print()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
