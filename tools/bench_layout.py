"""NCHW against channels_last on this machine: each conv's kernel workspace (measured in a fresh
process by fxsketch.passes.workspace, as plans do) and time, forward and backward, and the eager
training step of a whole model (tracker peak, process peak, median step time).

    .venv/bin/python tools/bench_layout.py                      # ResNet-50 layer1 convs at batch 16, a 3-d conv
    .venv/bin/python tools/bench_layout.py --step resnet50      # also the eager step, 16x3x224x224
    .venv/bin/python tools/bench_layout.py --step unet          # MONAI UNet 2x1x96^3
    .venv/bin/python tools/bench_layout.py --no-convs --ratio resnet50 --samples 1 2 4 8 16
        # the planner's own measure (passes.timing.whole_steps): the traced step as given against
        # the layout pass's graph, whole steps on synthetic sub-batches (docs/layout.md, "Step time")

What Config(memory_format="channels_last") changes (docs/layout.md).
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fxsketch
from _harness import call_times
from fxsketch.passes import workspace as ws
from fxsketch.units import format_bytes

aten = torch.ops.aten

CONVS = [  # (input shape, weight shape, padding)
    ((16, 64, 56, 56), (64, 64, 1, 1), 0),
    ((16, 64, 56, 56), (64, 64, 3, 3), 1),
    ((16, 64, 56, 56), (256, 64, 1, 1), 0),
    ((16, 256, 56, 56), (64, 256, 1, 1), 0),
    ((2, 16, 96, 96, 96), (16, 16, 3, 3, 3), 1),
]


def _fmt(dim: int):
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def _median_seconds(fn, repeat: int) -> float:
    return statistics.median(call_times(fn, repeat))


def conv_rows(repeat: int):
    print("| input | weight | layout | forward workspace | backward workspace | forward | backward (dX, dW) |")
    print("|---|---|---|---|---|---|---|")
    for xs, wshape, pad in CONVS:
        d = len(xs) - 2
        stride, padding, dil, outp = [1] * d, [pad] * d, [1] * d, [0] * d
        for layout in ("contiguous", "channels_last"):
            x, w = torch.randn(xs), torch.randn(wshape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=_fmt(x.dim()))
            y = aten.convolution(x, w, None, stride, padding, dil, False, outp, 1)
            dy = torch.randn_like(y)
            fwd_args = (x, w, None, stride, padding, dil, False, outp, 1)
            bwd_args = (dy, x, w, None, stride, padding, dil, False, outp, 1, [True, True, False])
            calls = [ws.kernel_call(aten.convolution.default, fwd_args),
                     ws.kernel_call(aten.convolution_backward.default, bwd_args)]
            got = ws.workspace_bytes(calls, source="measure")
            tf = _median_seconds(lambda: aten.convolution(*fwd_args), repeat)
            tb = _median_seconds(lambda: aten.convolution_backward(*bwd_args), repeat)
            print(f"| {'x'.join(map(str, xs))} | {'x'.join(map(str, wshape))} | {layout} "
                  f"| {format_bytes(got[calls[0]][0])} | {format_bytes(got[calls[1]][0])} "
                  f"| {1e3 * tf:.1f} ms | {1e3 * tb:.1f} ms |", flush=True)


def step_rows(name: str, repeat: int):
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision
        model, x = torchvision.models.resnet50(), torch.randn(16, 3, 224, 224)
    else:
        from monai.networks.nets import UNet
        model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                     strides=(2, 2, 2, 2), num_res_units=2)
        x = torch.randn(2, 1, 96, 96, 96)
    print(f"\n| eager step {name} {'x'.join(map(str, x.shape))} | layout | tracker peak | process peak | median step |")
    print("|---|---|---|---|---|")
    for layout in ("contiguous", "channels_last"):
        m, xx = model, x
        if layout == "channels_last":
            fmt = _fmt(x.dim())
            m, xx = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)  # in place: after the NCHW row
        r = fxsketch.measure(m, (xx,), level="process", repeat=repeat)
        print(f"| | {layout} | {format_bytes(r.peak_bytes)} | {format_bytes(r.process_peak_bytes)} "
              f"| {r.seconds:.2f} s |", flush=True)


def ratio_rows(name: str, samples, repeat: int):
    """Whole training steps of the traced graph as given and of the layout pass's graph (weights
    left contiguous), as fxsketch.passes.timing.layout_ratio times them, at each sub-batch."""
    from fxsketch import pipeline
    from fxsketch.config import Config
    from fxsketch.measurement import default_loss
    from fxsketch.passes.timing import whole_steps
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision
        model, shape = torchvision.models.resnet50(), (16, 3, 224, 224)
    else:
        from monai.networks.nets import UNet
        model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                     strides=(2, 2, 2, 2), num_res_units=2)
        shape = (2, 1, 96, 96, 96)
    print(f"\n| {name} sub-batch | step as given | relaid-out step | relaid / given - 1 |")
    print("|---|---|---|---|")
    for b in samples:
        x = torch.empty(b, *shape[1:], device="meta")
        a = pipeline.relayout(pipeline.analyse(model, (x,)), Config(memory_format="channels_last"))
        given, relaid = whole_steps((a.given_gm, a.gm), [((b, *shape[1:]), torch.float32)], default_loss, repeat)
        print(f"| {b} | {given:.3f} s | {relaid:.3f} s | {100 * (relaid / given - 1):+.1f} % |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--step", nargs="*", default=(), choices=("resnet50", "unet"))
    ap.add_argument("--no-convs", action="store_true")
    ap.add_argument("--ratio", nargs="*", default=(), choices=("resnet50", "unet"),
                    help="whole steps of the step as given against the relaid-out graph (the planner's layout_time; "
                         "best of 3 as the planner times them, whatever --repeat)")
    ap.add_argument("--samples", type=int, nargs="*", default=[1, 2, 4, 8], help="sub-batches for --ratio")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_convs:
        conv_rows(args.repeat)
    for name in args.step:
        step_rows(name, args.repeat)
    for name in args.ratio:
        ratio_rows(name, args.samples, 3)


if __name__ == "__main__":
    main()
