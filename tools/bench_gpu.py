"""GPU benchmark: memory and time of one training step under each memory-saving method.

    python tools/bench_gpu.py                    # ResNet-50, VGG-16, MONAI 3D UNet; markdown to stdout
    python tools/bench_gpu.py --out bench.md     # also write the report to a file
    python tools/bench_gpu.py --probe-ops        # probed conv (Triton / torch reference) vs cuDNN, per layer
    python tools/bench_gpu.py --cpu-smoke        # tiny shapes on CPU: checks the code paths, measures nothing

Methods per model: eager; torch.utils.checkpoint (ceil(sqrt(n)) segments of the block sequence for
ResNet-50 / VGG-16, one checkpoint per residual unit for the UNet, whose skips are not sequential);
torch.compile with torch._functorch.config.activation_memory_budget 0.5 and 0.1; fxsketch.optimize
at several budgets. A method that raises is reported as skipped with the reason. For each: measured
peak (torch.cuda.max_memory_allocated over the timed steps, parameters and gradients included),
median step time over --steps steps after --warmup, and fxsketch's predicted peak
(gm.memory_plan.peak_bytes). Then the largest batch that fits for each method on the 3D UNet.

Needs CUDA: without it, it prints why and exits with status 2.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

GiB = 1 << 30


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class 0 (classification logits or per-voxel logits): no label tensor,
    so fxsketch can trace it on fake tensors."""
    return (torch.logsumexp(out.float(), 1) - out[:, 0].float()).mean()


# ------------------------------------------------------------------------------------------------
# models


def build_model(name: str, smoke: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """(model, input shape without batch)."""
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50(num_classes=10 if smoke else 1000), (3, 32, 32) if smoke else (3, 224, 224)
    if name == "vgg16":
        import torchvision
        m = torchvision.models.vgg16(num_classes=10 if smoke else 1000)
        if smoke:
            m.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 10))
        return m, (3, 32, 32) if smoke else (3, 224, 224)
    if name == "unet3d":
        from monai.networks.nets import UNet
        m = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                 strides=(2, 2, 2, 2), num_res_units=2)
        return m, (1, 32, 32, 32) if smoke else (1, ARGS.unet_size, ARGS.unet_size, ARGS.unet_size)
    raise ValueError(f"unknown model {name!r}: use resnet50, vgg16 or unet3d")


def _block_sequence(name: str, model: nn.Module) -> list[nn.Module]:
    """The model as a flat list of blocks run one after another (ResNet: bottlenecks; VGG: layers)."""
    if name == "resnet50":
        m = model
        return [m.conv1, m.bn1, m.relu, m.maxpool, *m.layer1, *m.layer2, *m.layer3, *m.layer4,
                m.avgpool, nn.Flatten(1), m.fc]
    if name == "vgg16":
        return [*model.features, model.avgpool, nn.Flatten(1), *model.classifier]
    raise ValueError(name)


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


# checkpoint_sequential over ceil(sqrt(n)) segments: the same baseline as the CPU benchmark
from bench_optimize import CheckpointSequential as _CheckpointSequential  # noqa: E402


def checkpointed(name: str, model: nn.Module) -> nn.Module:
    if name in ("resnet50", "vgg16"):
        return _CheckpointSequential(_block_sequence(name, model))
    from monai.networks.blocks import ResidualUnit
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ResidualUnit):
                setattr(parent, child_name, _Checkpointed(child))
    return model


# ------------------------------------------------------------------------------------------------
# methods: each returns (step function, predicted peak bytes or None)


def _functorch_config():
    return importlib.import_module("torch._functorch.config")


def _reset_compile():
    importlib.import_module("torch._dynamo").reset()


def prepare(method: str, name: str, base: nn.Module, x: torch.Tensor):
    model = copy.deepcopy(base)
    kind, _, arg = method.partition(":")
    predicted = None
    if kind == "eager":
        run = model
    elif kind == "checkpoint":
        run = checkpointed(name, model)
    elif kind == "compile":
        _reset_compile()
        _functorch_config().activation_memory_budget = float(arg)
        run = torch.compile(model, dynamic=False)
    elif kind == "fxsketch":
        import fxsketch
        budget = float(arg)
        run = fxsketch.optimize(model, (x,), budget=budget, loss_fn=loss_fn)
        plan = getattr(run, "memory_plan", None)
        predicted = getattr(plan, "peak_bytes", None)
    else:
        raise ValueError(f"unknown method {method!r}")
    params = [p for p in run.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(run(x)).backward()
        opt.step()

    return step, predicted


def _cleanup():
    _functorch_config().activation_memory_budget = 1.0
    _reset_compile()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_method(method, name, base, x, steps, warmup):
    """(peak bytes, median seconds, predicted bytes); the model and optimizer are freed after."""
    device = x.device
    step, predicted = prepare(method, name, base, x)
    try:
        for _ in range(warmup):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        return peak, statistics.median(times), predicted
    finally:
        del step
        _cleanup()


def fits(method, name, base, shape, batch, device) -> bool:
    try:
        x = torch.randn(batch, *shape, device=device)
        step, _ = prepare(method, name, base, x)
        step()
        step()
        _sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        step = x = None  # noqa: F841 (free before the next attempt)
        _cleanup()


def largest_batch(method, name, base, shape, device, cap: int) -> int:
    """Largest batch in [1, cap] that runs two steps without OOM (doubling, then bisection)."""
    if not fits(method, name, base, shape, 1, device):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(method, name, base, shape, hi, device):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(method, name, base, shape, mid, device) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------------------
# report


def _gib(b):
    return "-" if b is None else f"{b / GiB:.2f}"


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:160]


def model_table(names, methods, batches, device, steps, warmup, smoke) -> list[str]:
    lines = ["| model | batch | method | measured peak GiB | predicted peak GiB | predicted/measured "
             "| median step ms | vs eager peak | vs eager time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        base, shape = build_model(name, smoke)
        base = base.to(device)
        batch = batches[name]
        x = torch.randn(batch, *shape, device=device)
        eager = None
        for method in methods:
            try:
                peak, sec, pred = measure_method(method, name, base, x, steps, warmup)
            except torch.cuda.OutOfMemoryError as exc:
                lines.append(f"| {name} | {batch} | {method} | OOM | | | | | |")
                print(f"[{name}/{method}] out of memory: {_why(exc)}", file=sys.stderr)
                _cleanup()
                continue
            except Exception as exc:  # a method that cannot handle this model is skipped, with why
                lines.append(f"| {name} | {batch} | {method} | skipped: {_why(exc)} | | | | | |")
                print(f"[{name}/{method}] skipped: {_why(exc)}", file=sys.stderr)
                if ARGS.verbose:
                    traceback.print_exc()
                _cleanup()
                continue
            if method == "eager":
                eager = (peak, sec)
            ratio = f"{pred / peak:.2f}" if pred and peak else "-"
            rel_peak = f"{peak / eager[0]:.2f}x" if eager and eager[0] and peak else "-"
            rel_time = f"{sec / eager[1]:.2f}x" if eager else "-"
            lines.append(f"| {name} | {batch} | {method} | {_gib(peak)} | {_gib(pred)} | {ratio} "
                         f"| {sec * 1e3:.1f} | {rel_peak} | {rel_time} |")
            print(lines[-1], file=sys.stderr)
        del base, x
        _cleanup()
    return lines


def batch_table(methods, device, cap, smoke) -> list[str]:
    name = "unet3d"
    base, shape = build_model(name, smoke)
    base = base.to(device)
    lines = [f"| method | largest batch (UNet 3D, {'x'.join(map(str, shape[1:]))}, cap {cap}) |", "|---|---|"]
    for method in methods:
        try:
            b = largest_batch(method, name, base, shape, device, cap)
            lines.append(f"| {method} | {b} |")
        except Exception as exc:
            lines.append(f"| {method} | skipped: {_why(exc)} |")
        print(lines[-1], file=sys.stderr)
    return lines


# ------------------------------------------------------------------------------------------------
# --probe-ops: probed conv forward+backward at 1/16 storage vs the exact conv


PROBE_LAYERS = [  # (label, x shape, weight shape, stride, padding)
    ("resnet50 layer1 3x3", (64, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ("resnet50 layer2 3x3", (64, 128, 28, 28), (128, 128, 3, 3), 1, 1),
    ("resnet50 layer3 3x3", (64, 256, 14, 14), (256, 256, 3, 3), 1, 1),
    ("resnet50 layer4 3x3", (64, 512, 7, 7), (512, 512, 3, 3), 1, 1),
    ("resnet50 layer2 1x1", (64, 512, 28, 28), (128, 512, 1, 1), 1, 0),
    ("vgg16 conv1_2", (64, 64, 224, 224), (64, 64, 3, 3), 1, 1),
    ("vgg16 conv3_2", (64, 256, 56, 56), (256, 256, 3, 3), 1, 1),
    ("unet3d down1", (2, 16, 96, 96, 96), (32, 16, 3, 3, 3), 2, 1),
    ("unet3d res 48^3", (2, 32, 48, 48, 48), (32, 32, 3, 3, 3), 1, 1),
]


def _time(fn, device, steps, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe_ops_table(device, dtype, steps, warmup, smoke) -> list[str]:
    pc = importlib.import_module("fxsketch.ops.probed")
    from fxsketch.ops.probes import rank_for_ratio, sketch_nbytes
    from fxsketch.ops import triton_kernels as tk

    probe, seed = "gaussian", 12345
    lines = [f"| layer | x shape | rank (1/16) | saved MiB exact -> sketch | exact fwd+bwd ms (cuDNN) "
             f"| probed fwd+bwd ms, Triton | probed fwd+bwd ms, torch ref | Triton sketch ms | Triton dW ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    layers = PROBE_LAYERS
    if smoke:
        layers = [("smoke 2d", (2, 3, 8, 8), (4, 3, 3, 3), 1, 1), ("smoke 3d", (2, 2, 6, 6, 6), (3, 2, 3, 3, 3), 2, 1)]
    use_triton = tk.triton_available(device)
    for label, xs, ws, stride, padding in layers:
        x = torch.randn(xs, device=device, dtype=dtype)
        w = torch.randn(ws, device=device, dtype=dtype) * 0.05
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(ws)]
        geo = pc.conv_geometry(ws, stride, padding, 1, 1)
        y = conv(x, w, None, stride, padding)
        dy = torch.randn_like(y)
        rank = rank_for_ratio(xs, 1 / 16, "spatial")

        def exact():
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            conv(xr, wr, None, stride, padding).backward(dy)

        def probed(sketch_fn, dw_fn):
            def run():
                conv(x, w, None, stride, padding)
                xbar = sketch_fn(x, seed, rank, "spatial", probe)
                pc._input_and_bias_grad(dy, xs, w, False, True, False, geo)
                dw_fn(dy, xbar, seed, rank, probe, xs[2:], ws, geo)
            return run

        t_exact = _time(exact, device, steps, warmup)
        t_ref = _time(probed(pc.sketch, pc.dw_spatial), device, max(3, steps // 4), 1)
        if use_triton:
            t_tri = _time(probed(tk.sketch_triton, tk.dw_spatial_triton), device, steps, warmup)
            t_sk = _time(lambda: tk.sketch_triton(x, seed, rank, "spatial", probe), device, steps, warmup)
            xbar = tk.sketch_triton(x, seed, rank, "spatial", probe)
            t_dw = _time(lambda: tk.dw_spatial_triton(dy, xbar, seed, rank, probe, xs[2:], ws, geo),
                         device, steps, warmup)
            tri = [f"{t_tri * 1e3:.2f}", f"{t_sk * 1e3:.2f}", f"{t_dw * 1e3:.2f}"]
        else:
            tri = ["n/a (no Triton)"] * 3
        saved = f"{x.numel() * x.element_size() / 2**20:.1f} -> {sketch_nbytes(xs, rank, 'spatial', dtype) / 2**20:.1f}"
        lines.append(f"| {label} | {'x'.join(map(str, xs))} | {rank} | {saved} | {t_exact * 1e3:.2f} "
                     f"| {tri[0]} | {t_ref * 1e3:.2f} | {tri[1]} | {tri[2]} |")
        print(lines[-1], file=sys.stderr)
        del x, w, y, dy
        _cleanup()
    return lines


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,vgg16,unet3d")
    p.add_argument("--batch", type=int, default=64, help="batch of ResNet-50 and VGG-16 (default 64)")
    p.add_argument("--unet-batch", type=int, default=2)
    p.add_argument("--unet-size", type=int, default=96, choices=(96, 128))
    p.add_argument("--budgets", default="0.5,0.3,0.2,0.1", help="fxsketch budgets (fractions of the eager peak)")
    p.add_argument("--compile-budgets", default="0.5,0.1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-cap", type=int, default=64, help="upper bound of the UNet batch search")
    p.add_argument("--no-batch-search", action="store_true")
    p.add_argument("--probe-ops", action="store_true", help="only the per-layer probed conv benchmark")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the --probe-ops tensors")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU to check code paths (no figures)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of skipped methods")
    ARGS = p.parse_args(argv)

    if ARGS.cpu_smoke:
        device, smoke = torch.device("cpu"), True
        ARGS.steps, ARGS.warmup, ARGS.batch, ARGS.unet_batch, ARGS.batch_cap = 2, 1, 2, 1, 2
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is available, so there is nothing to measure (peaks come from "
              "torch.cuda.max_memory_allocated). Run it on a CUDA machine, or use --cpu-smoke to check "
              "the code paths on tiny CPU shapes.", file=sys.stderr)
        return 2
    else:
        device, smoke = torch.device("cuda"), False
    torch.backends.cudnn.benchmark = True

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test: not a measurement)"
    report = [f"# fxsketch GPU benchmark", "", f"Device: **{dev_name}**, torch {torch.__version__}", ""]
    if ARGS.probe_ops:
        dtype = getattr(torch, ARGS.dtype)
        report += [f"## Probed conv vs exact conv ({ARGS.dtype}, spatial mode, gaussian probes, rank = pixels/16)", ""]
        report += probe_ops_table(device, dtype, ARGS.steps, ARGS.warmup, smoke)
    else:
        names = [n for n in ARGS.models.split(",") if n]
        methods = (["eager", "checkpoint"] + [f"compile:{b}" for b in ARGS.compile_budgets.split(",") if b]
                   + [f"fxsketch:{b}" for b in ARGS.budgets.split(",") if b])
        batches = {"resnet50": ARGS.batch, "vgg16": ARGS.batch, "unet3d": ARGS.unet_batch}
        report += [f"## One training step (SGD), median of {ARGS.steps} steps after {ARGS.warmup} warm-up", ""]
        report += model_table(names, methods, batches, device, ARGS.steps, ARGS.warmup, smoke)
        if "unet3d" in names and not ARGS.no_batch_search:
            report += ["", "## Largest batch that fits, MONAI 3D UNet", ""]
            report += batch_table(methods, device, ARGS.batch_cap, smoke)
    text = "\n".join(report) + "\n"
    print(text)
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            f.write(text)
    return 0


ARGS = argparse.Namespace(unet_size=96, verbose=False)

if __name__ == "__main__":
    sys.exit(main())
