"""Benchmark probed_conv against the exact convolution on real layer shapes.

For each layer: forward+backward time, bytes saved for backward (seen through saved-tensor hooks),
and the relative error of dW, for the exact conv and for each mode at 1/4, 1/16 and 1/64 of X
stored. Prints a markdown table. Runs on CUDA when available, else on CPU with a small batch.

    python tools/bench_ops.py                 # default layers, batch 2 on CPU / 16 on CUDA
    python tools/bench_ops.py --layers r50.l1 vgg.c4 --ratios 0.0625 --repeat 5
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fxsketch.ops import probed_conv, rank_for_ratio

__all__ = ["LAYERS", "bench_layer", "main"]

# name: (C_in, C_out, spatial, kernel, stride, padding) — shapes from the published architectures.
LAYERS = {
    "r50.l1.3x3": (64, 64, (56, 56), 3, 1, 1),      # ResNet-50 layer1 bottleneck 3x3
    "r50.l2.3x3s2": (128, 128, (56, 56), 3, 2, 1),  # ResNet-50 layer2 first 3x3, stride 2
    "r50.l3.1x1": (1024, 256, (14, 14), 1, 1, 0),   # ResNet-50 layer3 bottleneck reduce 1x1
    "vgg.c1_2": (64, 64, (224, 224), 3, 1, 1),      # VGG-16 conv1_2
    "vgg.c4_2": (512, 512, (28, 28), 3, 1, 1),      # VGG-16 conv4_2
    "unet3d.l2": (64, 64, (32, 32, 32), 3, 1, 1),   # 3D U-Net level 2 (of a 128^3 input)
}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(fn, x, w, repeat, device):
    """(median seconds of forward+backward, bytes saved for backward, dW of the last run)."""
    times, saved = [], []
    for i in range(repeat + 1):
        saved.clear()
        _sync(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x, w)
        # loss = 0.5 * ||Y||^2, so dY = Y: a gradient correlated with the input, as in training.
        (dw,) = torch.autograd.grad(y, w, y.detach())
        _sync(device)
        if i:  # the first run warms up kernels and caches
            times.append(time.perf_counter() - t0)
    params = {w.data_ptr()}
    nbytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in params)
    return sorted(times)[len(times) // 2], nbytes, dw


def bench_layer(name, batch, ratios, repeat, device, dtype=torch.float32):
    """Rows (layer, variant, ms, saved MiB, dW rel. error) for one layer."""
    c_in, c_out, spatial, k, stride, pad = LAYERS[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Post-ReLU-like activations (non-negative), He-initialised weights.
    x = torch.randn((batch, c_in) + spatial, generator=gen).relu().to(device, dtype)
    fan_in = c_in * k ** len(spatial)
    w = (torch.randn((c_out, c_in) + (k,) * len(spatial), generator=gen) * (2 / fan_in) ** 0.5)
    w = w.to(device, dtype).requires_grad_(True)
    conv = CONV[len(spatial)]
    t, nbytes, exact = _run(lambda a, b: conv(a, b, None, stride, pad), x, w, repeat, device)
    rows = [(name, "exact", t * 1e3, nbytes / 2**20, 0.0)]
    for mode in ("spatial", "channel"):
        for ratio in ratios:
            rank = rank_for_ratio(x.shape, ratio, mode)
            fn = lambda a, b: probed_conv(a, b, None, stride, pad, rank=rank, mode=mode,  # noqa: E731
                                          probe="rademacher")
            t, nbytes, dw = _run(fn, x, w, repeat, device)
            err = float((dw.float() - exact.float()).norm() / exact.float().norm())
            rows.append((name, f"{mode} 1/{round(1 / ratio)} (r={rank})", t * 1e3, nbytes / 2**20, err))
    return rows


def main(argv=None):
    """Parse arguments, run the layers, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    parser.add_argument("--ratios", nargs="+", type=float, default=[1 / 4, 1 / 16, 1 / 64])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {batch}; torch {torch.__version__}; fp32; probe rademacher\n")
    print("| layer | variant | fwd+bwd ms | saved MiB (excl. W) | dW rel. error |")
    print("|---|---|---:|---:|---:|")
    for layer in args.layers:
        for row in bench_layer(layer, batch, args.ratios, args.repeat, device):
            print("| {} | {} | {:.1f} | {:.2f} | {:.3f} |".format(*row), flush=True)


if __name__ == "__main__":
    main()
