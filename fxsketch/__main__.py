"""Command line: ``python -m fxsketch plan MODULE:CALLABLE --input 8x3x224x224 [...]``.

With no arguments it plans (and measures) a built-in default model, torchvision's resnet18 at
8x3x224x224 (a small CNN when torchvision is missing).

    $ python -m fxsketch plan torchvision.models:resnet50 --input 32x3x224x224 --json plan.json
    fxsketch memory plan for ResNet
      parameters           97.49 MiB
      ...

Each subcommand is one ``cmd_<name>(args)`` function registered in :func:`build_parser`;
:func:`load_model` is what they share (the model and its example inputs from the arguments).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["main", "build_parser", "load_model", "parse_shape"]

DEFAULT_MODEL = "torchvision.models:resnet18"
DEFAULT_INPUT = "8x3x224x224"


# --------------------------------------------------------------------------------------------
# shared: model and inputs from the arguments


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8x3x224x224"`` → ``(8, 3, 224, 224)``."""
    try:
        shape = tuple(int(d) for d in text.lower().replace("*", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a shape: write positive sizes joined by 'x', e.g. 8x3x224x224")
    return shape


def parse_dtype(text: str) -> torch.dtype:
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}: use a torch dtype name such as float32, bfloat16, float16")
    return dtype


def _resolve(spec: str) -> Callable[[], nn.Module]:
    """``"package.module:callable"`` → the callable (a model class or factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"fxsketch: model {spec!r} is not MODULE:CALLABLE, e.g. torchvision.models:resnet50")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"fxsketch: cannot import {module_name!r} for {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"fxsketch: {module_name!r} has no {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"fxsketch: {spec!r} is a {type(obj).__name__}, not a callable that builds a model")
    return obj


class SmallCNN(nn.Sequential):
    """The default model when torchvision is not installed."""

    def __init__(self, num_classes: int = 10):
        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        super().__init__(*block(3, 32), *block(32, 64), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def default_model_spec() -> str:
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return "fxsketch.__main__:SmallCNN"
    return DEFAULT_MODEL


CALIBRATION_SAMPLES = 2
"""Real samples the CLI gives planning (``calibration_inputs``): probe noise and node times
come from them while the plan itself is made on meta tensors, so planning allocates nothing at
the batch size and takes seconds, not minutes."""


def load_model(args: argparse.Namespace, *, real: bool | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the model from ``args.model`` and one input per ``--input``: meta tensors (shapes
    only) unless ``real`` (default: not ``args.meta``)."""
    torch.manual_seed(0)  # the same command builds the same weights and inputs: the same plan
    model = _resolve(args.model)()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"fxsketch: {args.model} returned a {type(model).__name__}, not an nn.Module")
    real = not getattr(args, "meta", False) if real is None else real
    inputs = tuple(_random(s, args.dtype, "cpu" if real else "meta") for s in args.input or [parse_shape(DEFAULT_INPUT)])
    model = model.to(dtype=args.dtype) if args.dtype.is_floating_point else model
    return model, inputs


def _random(shape, dtype, device) -> torch.Tensor:
    # integer dtypes (token ids) would need real values: only floating inputs are made up here
    return torch.randn(shape, dtype=dtype, device=device)


def calibration_batch(args: argparse.Namespace, inputs) -> tuple[torch.Tensor, ...]:
    """:data:`CALIBRATION_SAMPLES` real random samples shaped like the inputs."""
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn((min(CALIBRATION_SAMPLES, x.shape[0]), *x.shape[1:]), generator=gen,
                             dtype=args.dtype) for x in inputs)


# --------------------------------------------------------------------------------------------
# subcommands: one function each


def parse_budget(text: str):
    """'0.3' -> 0.3 (a fraction of the unmodified peak); '3.5GiB', '800MB', '1000000' -> a byte size."""
    try:
        value = float(text)
    except ValueError:
        return text
    return value if value <= 1 else int(value)


def _planning_options(args: argparse.Namespace) -> dict | None:
    """optimize() keyword arguments from the command line, or None to plan the model as it is."""
    if args.budget is None and not args.optimize and args.methods is None:
        return None
    opts = dict(budget=args.budget, max_overhead=args.max_overhead, probe_rank=args.probe_rank,
                seed=args.seed)
    if args.methods is not None:
        opts["methods"] = tuple(m for m in args.methods.split(",") if m)
    if args.max_grad_noise is not None:
        opts["max_grad_noise"] = args.max_grad_noise
    opts["memory_format"] = args.memory_format
    return opts


def cmd_plan(args: argparse.Namespace) -> int:
    import fxsketch
    from fxsketch.passes.workspace import can_measure_process
    from fxsketch.units import format_bytes

    check_report_arguments(args)
    if args.measure and args.meta:
        raise SystemExit("fxsketch: --measure needs real inputs; leave out --meta")
    model, inputs = load_model(args, real=False)  # planning: meta inputs + a small real batch
    opts = _planning_options(args)
    gm = None
    if opts is None:
        p = fxsketch.plan(model, inputs)
    else:
        try:
            calibration = None if args.meta else calibration_batch(args, inputs)
            gm = fxsketch.optimize(model, inputs, calibration_inputs=calibration, **opts)
        except fxsketch.FxsketchError as e:
            raise SystemExit(f"fxsketch: {e}")
        p = gm.memory_plan
    print(p.render(nodes=args.nodes))
    if args.json:
        p.to_json(args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        p.save(args.plot)
        print(f"wrote {args.plot}")
    if args.measure:
        _, inputs = load_model(args, real=True)
        # process level where it can be read (kernel workspace is in the plan); else live tensors
        cuda = any(x.device.type == "cuda" for x in inputs)
        level = "process" if cuda or can_measure_process() else "tensor"

        def compare(what, m, predicted, tensor_predicted) -> int:
            got = m.process_peak_bytes if level == "process" else m.peak_bytes
            want = predicted if level == "process" else tensor_predicted
            print(f"{what}: predicted peak {format_bytes(want)}, measured {format_bytes(got)} "
                  f"({100 * (want / got - 1):+.2f}%, {level} level); {m}")
            return got
        base = fxsketch.measure(model, inputs, level=level)
        first = compare("\nunmodified model", base, p.baseline_peak_bytes, p.baseline.tensor_peak_bytes)
        if gm is not None:
            m = fxsketch.measure(gm, inputs, level=level)
            last = compare("optimized module", m, p.peak_bytes, p.tensor_peak_bytes)
            print(f"measured peak {first / last:.2f}x lower, step time "
                  f"{100 * (m.seconds / base.seconds - 1):+.1f}% (CPU, this machine)")
    return 0


def _add_planning_arguments(p: argparse.ArgumentParser) -> None:
    from .config import Config, METHODS
    p.add_argument("--budget", type=parse_budget, default=None,
                   help="plan to fit this peak: a fraction of the unmodified peak (0.3) or bytes ('3.5GiB'); "
                        "none: the plan of the model as it is, unless --optimize or --methods")
    p.add_argument("--optimize", action="store_true",
                   help="plan the lowest peak within --max-overhead (what --budget does without a budget)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated option kinds the planner may use (none given: {','.join(METHODS)})")
    p.add_argument("--max-overhead", type=float, default=Config.max_overhead,
                   help="estimated extra step time allowed, as a fraction of the step as given (layout included)")
    p.add_argument("--probe-rank", type=int, default=None, help="force this rank on every probed conv")
    p.add_argument("--seed", type=int, default=None, help="seed of a private generator for the probes")
    p.add_argument("--max-grad-noise", type=float, default=Config.max_grad_noise,
                   help="gradient noise allowed, in units of each layer's SGD noise (docs/training.md)")
    from .config import MEMORY_FORMATS
    p.add_argument("--memory-format", default=Config.memory_format, choices=MEMORY_FORMATS,
                   help="layout of the planned step's convs: auto = channels_last on CPU (no oneDNN "
                        "reorders: less workspace, faster convs; outputs equal eager up to rounding), "
                        "preserve = as given (bitwise-equal outputs)")


def _add_model_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The arguments every subcommand that loads a model takes (see :func:`load_model`)."""
    p.add_argument("model", nargs=None if required else "?", default=None,
                   help="MODULE:CALLABLE that builds the model, e.g. torchvision.models:resnet50")
    p.add_argument("--input", action="append", type=parse_shape, metavar="SHAPE",
                   help=f"shape of one example input; repeat for several inputs (none given: {DEFAULT_INPUT})")
    p.add_argument("--dtype", type=parse_dtype, default=torch.float32,
                   help="dtype of the inputs and the model")
    p.add_argument("--meta", action="store_true",
                   help="no real calibration batch either: probe noise from the stated prior (not with --measure)")


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--plot", metavar="PATH", help="also draw the timeline (.png, .svg, .pdf, .html) or write it as a memory_viz "
                        "snapshot (.pickle: open at https://pytorch.org/memory_viz)")
    p.add_argument("--measure", action="store_true",
                   help="also run real training steps and print predicted vs measured peak")
    p.add_argument("--nodes", action="store_true",
                   help="also print the per-node table (every node, its saved bytes, when it is freed, its option)")


def check_report_arguments(args: argparse.Namespace) -> None:
    """Fail before planning, not after, when a requested output cannot be written."""
    import os
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise SystemExit(f"fxsketch: {flag} {path}: folder {folder} does not exist")
    if args.plot:
        from ._plot import check_plot_path
        try:
            check_plot_path(args.plot)
        except Exception as e:
            raise SystemExit(f"fxsketch: --plot {args.plot}: {e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxsketch", description="Predict (and cut) the memory of one training step of a PyTorch model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="With no arguments: optimize a default model and measure it against the original "
               f"({DEFAULT_MODEL} at {DEFAULT_INPUT}).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plan", help="print the memory plan of one training step",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Plan on meta tensors (shapes only) plus a small real batch of "
                                   f"{CALIBRATION_SAMPLES} random samples for probe noise and node times; "
                                   "--measure also runs real training steps at the full batch.")
    _add_model_arguments(p)
    _add_planning_arguments(p)
    _add_report_arguments(p)
    p.set_defaults(func=cmd_plan)
    return parser


def default_argv() -> list[str]:
    """What ``python -m fxsketch`` with no arguments runs."""
    return ["plan", default_model_spec(), "--input", DEFAULT_INPUT, "--optimize", "--measure"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv or default_argv())
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
