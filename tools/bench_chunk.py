"""What a chunked conv backward costs: one conv's forward + backward, whole against in chunks
(``fxsketch.ops.chunked_conv``), timed in alternating rounds (best of ``--rounds``), beside what
the planner charges for it (``passes.options.chunk.CALL_SECONDS`` per extra call).

    .venv/bin/python tools/bench_chunk.py                 # VGG-16 and UNet layers, docs/replays.md
    .venv/bin/python tools/bench_chunk.py --rounds 7
"""
import argparse
import time

import torch
from torch import nn

from fxsketch.ops import chunked_conv
from fxsketch.passes.options.chunk import CALL_SECONDS

CASES = {  # name: (conv, input shape)
    "vgg16 features_2, 16x64x224^2": (lambda: nn.Conv2d(64, 64, 3, padding=1), (16, 64, 224, 224)),
    "vgg16 features_7, 16x128x112^2": (lambda: nn.Conv2d(128, 128, 3, padding=1), (16, 128, 112, 112)),
    "unet 3d conv, 2x16x64^3": (lambda: nn.Conv3d(16, 32, 3, padding=1), (2, 16, 64, 64, 64)),
}


def _step(fn, x, g):
    t = time.perf_counter()
    y = fn(x)
    y.backward(g)
    x.grad = None
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="*", default=[4, 16])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| conv | chunks | whole | chunked | measured extra | planner's estimate |")
    print("|---|---|---|---|---|---|")
    for name, (make, shape) in CASES.items():
        conv = make()
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn_like(conv(x))
        done = set()
        for k in args.chunks:
            b = -(-shape[0] // k)
            if b >= shape[0] or b in done:
                continue
            done.add(b)
            fns = (conv, lambda t: chunked_conv(t, conv, chunk=b))
            for fn in fns:
                _step(fn, x, g)  # warm-up
            whole, chunked = [], []
            for _ in range(args.rounds):
                whole.append(_step(fns[0], x, g))
                chunked.append(_step(fns[1], x, g))
            calls = -(-shape[0] // b) - 1
            print(f"| {name} | {-(-shape[0] // b)} of {b} | {min(whole):.3f} s | {min(chunked):.3f} s "
                  f"| {min(chunked) - min(whole):+.3f} s | {calls * CALL_SECONDS:.4f} s |", flush=True)


if __name__ == "__main__":
    main()
