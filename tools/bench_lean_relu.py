"""What a lean ReLU costs on this machine over torch's (docs/ops.md): forward (the output and its
1-bit mask) and backward (the input gradient from the mask) of ``fxsketch::lean_relu`` against
``torch.relu`` and ``threshold_backward`` (what autograd runs for a plain ReLU), on ResNet-50's
largest ReLU activation at batch 16 (16x64x112x112, 51 MB fp32) laid out channels_last as a CPU
plan leaves it, and on a leaky ReLU. The ops take the fused CPU loops (fxsketch.ops.cpu_kernels)
where they built; ``--torch-path`` times the torch path (``FXSKETCH_CPU_KERNELS=0``). Best of
``--rounds`` after a warm-up; every call allocates its result, as in a training step.

    .venv/bin/python tools/bench_lean_relu.py [--torch-path] [--shape 16 64 112 112]
"""
import argparse
import os

import torch
import torch.nn.functional as F

from _harness import call_times
from fxsketch.ops import cpu_kernels
from fxsketch.ops import lean


def best(fn, rounds):
    return 1e3 * min(call_times(fn, rounds))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shape", type=int, nargs="*", default=[16, 64, 112, 112])
    ap.add_argument("--torch-path", action="store_true", help="FXSKETCH_CPU_KERNELS=0: no fused CPU loops")
    args = ap.parse_args(argv)
    if args.torch_path:
        os.environ["FXSKETCH_CPU_KERNELS"] = "0"
    torch.manual_seed(0)
    x = torch.randn(args.shape)
    if x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    g = torch.randn_like(x)
    order = lean.memory_order(x)
    r = args.rounds
    path = "fused CPU loops" if cpu_kernels.serves(x.device, x.dtype) else "torch path"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, X {tuple(x.shape)}, {path}")
    print("| op | torch | lean | extra |")
    print("|---|---|---|---|")
    for slope in (None, 0.01):
        name = "relu" if slope is None else f"leaky_relu({slope})"
        fwd = (lambda: torch.relu(x)) if slope is None else (lambda: F.leaky_relu(x, slope))
        ref_bwd = (lambda: torch.ops.aten.threshold_backward(g, x, 0)) if slope is None else \
            (lambda: torch.ops.aten.leaky_relu_backward(g, x, slope, False))
        _, mask = torch.ops.fxsketch.lean_relu(x, slope)
        rows = [(f"{name} forward", best(fwd, r), best(lambda: torch.ops.fxsketch.lean_relu(x, slope), r)),
                (f"{name} backward", best(ref_bwd, r),
                 best(lambda: torch.ops.fxsketch.lean_relu_backward(g, mask, slope, order), r))]
        for label, a, b in rows:
            print(f"| {label} | {a:.1f} ms | {b:.1f} ms | {b - a:+.1f} ms |")


if __name__ == "__main__":
    main()
