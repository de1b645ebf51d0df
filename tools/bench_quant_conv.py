"""What a quantized conv input costs on this machine over the plain conv (docs/quant.md): forward +
backward (dX and dW) of ``fxsketch.ops.quant_conv`` at 8 bits against ``F.conv2d``, on ResNet-50
layer1 shapes, channels_last, at the batch the planner times (5 samples) and at 16. Best of
``--rounds`` after a warm-up.

    .venv/bin/python tools/bench_quant_conv.py [--rounds 9]
"""
import argparse

import torch
import torch.nn.functional as F

from _harness import call_times
from fxsketch.ops import quant_conv

LAYERS = [(256, 64, 1), (64, 64, 3)]  # (C_in, C_out, kernel) at 56x56


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| input | conv | plain | 8-bit quantized | extra |")
    print("|---|---|---|---|---|")
    for n in (5, 16):
        for cin, cout, k in LAYERS:
            x = torch.randn(n, cin, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_()
            w = torch.randn(cout, cin, k, k, requires_grad=True)
            g = torch.randn_like(F.conv2d(x, w, padding=k // 2))
            plain = 1e3 * min(call_times(lambda: torch.autograd.grad(F.conv2d(x, w, padding=k // 2), (x, w), g),
                                         args.rounds))
            quant = 1e3 * min(call_times(lambda: torch.autograd.grad(quant_conv(x, w, padding=k // 2, bits=8), (x, w), g),
                                         args.rounds))
            print(f"| {n}x{cin}x56x56 | {cin}->{cout} {k}x{k} | {plain:.1f} ms | {quant:.1f} ms | {quant - plain:+.1f} ms |")


if __name__ == "__main__":
    main()
