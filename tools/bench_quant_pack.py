"""What the quantized norm's packing costs on this machine (docs/quant.md): at ResNet-50's largest
BatchNorm input (16x256x56x56, 51 MB fp32), the 8- and 4-bit packing and unpacking alone, a
quantized BatchNorm forward + backward against the plain one (also with its backward forced into
chunks, and reading a whole dequantized X as before its chunks: ``--shape 1 256 56 56`` shows why
small inputs are read whole), and the two passes that explain the
block design (an in-place pass over X against a new result of X's size). Best of ``--rounds``
after a warm-up. The ops take the fused CPU loops (fxsketch.ops.cpu_kernels) where they built;
``--torch-path`` times the torch path instead (``FXSKETCH_CPU_KERNELS=0``), ``--channels-last``
lays X out as the convs of a CPU plan leave it (packed in memory order).

    .venv/bin/python tools/bench_quant_pack.py [--torch-path] [--channels-last]
"""
import argparse
import os

import torch

from _harness import call_times
from fxsketch.ops import quant as q
from fxsketch.ops.quant import quant_norm_module


def best(fn, rounds):
    return 1e3 * min(call_times(fn, rounds))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs="*", default=[16, 256, 56, 56])
    ap.add_argument("--torch-path", action="store_true", help="FXSKETCH_CPU_KERNELS=0: no fused CPU loops")
    ap.add_argument("--channels-last", action="store_true", help="X channels_last (packed as it lies)")
    args = ap.parse_args(argv)
    if args.torch_path:
        os.environ["FXSKETCH_CPU_KERNELS"] = "0"
    torch.manual_seed(0)
    x = torch.randn(args.shape)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    order = q.pack_order("batch", x.shape, x.stride())
    xo = x.permute(order)  # what the norm packs: X in its memory order, a view
    groups = [q.quant_groups(x.shape, "batch")[d] for d in order]
    seed, r = torch.tensor(3), args.rounds
    path = "fused CPU loops" if q.fused(x.device, x.dtype) else "torch path"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, X {tuple(x.shape)}"
          f"{' channels_last' if args.channels_last else ''}, {path}")
    print(f"| in-place pass over X (mul_) | {best(lambda: x.mul_(1.0), r):.1f} ms |")
    print(f"| new result of X's size (x - 1) | {best(lambda: x - 1.0, r):.1f} ms |")
    for bits in q.QUANT_BITS:
        packed = q.quant_pack(xo, seed, bits, groups)
        print(f"| {bits}-bit pack | {best(lambda: q.quant_pack(xo, seed, bits, groups), r):.1f} ms |")
        print(f"| {bits}-bit unpack | {best(lambda: q.quant_unpack(*packed, bits, list(xo.shape), x.dtype), r):.1f} ms |")
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)  # laid out as x
    bn = torch.nn.BatchNorm2d(x.shape[1])

    def step(fn):
        fn().backward(g)
        xg.grad = None
    plain = best(lambda: step(lambda: bn(xg)), r)
    print(f"| BatchNorm forward + backward | {plain:.1f} ms |")
    # the backward as it runs (chunked from BACKWARD_MIN_ELEMENTS on), forced into chunks, and
    # reading a whole dequantized X (before its chunks)
    forms = (("", {}), (", backward in chunks", {"BACKWARD_MIN_ELEMENTS": 0}),
             (", X read whole in backward", {"backward_chunks": lambda *a, **k: None}))
    for label, patch in forms:
        saved = {k: getattr(q, k) for k in patch}
        for k, v in patch.items():
            setattr(q, k, v)
        try:
            for bits in q.QUANT_BITS:
                quant = best(lambda: step(lambda: quant_norm_module(xg, bn, bits=bits)), r)
                print(f"| {bits}-bit quantized BatchNorm forward + backward{label} | {quant:.1f} ms ({quant - plain:+.1f}) |")
        finally:
            for k, v in saved.items():
                setattr(q, k, v)

if __name__ == "__main__":
    main()
