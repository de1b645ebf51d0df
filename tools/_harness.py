"""The training harness shared by tools/train_digits.py and tools/train_unet3d.py.

Each of those scripts trains one model under several settings -- exact gradients (the unmodified
model) and ``fxsketch.optimize`` with various options -- over a few seeds, and reports a table of
the test metric (mean ± std over seeds) next to the measured and predicted peak memory of one
training step and the activation-memory reduction against exact. What is the same between them
lives here: the command-line options they share, seeding, building a setting's module, measuring
one step, the training loop with its per-epoch evaluation, the results table, the curves figure
and the output files. Only the top-level ``fxsketch`` names are used (``fxsketch.optimize``,
``fxsketch.measure``, ``fxsketch.plan``), not its modules.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

import fxsketch


@dataclass(frozen=True)
class Metric:
    """The test metric a script reports after every epoch."""

    fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], float]  # (model, x_test, y_test) -> value
    short: str    # progress lines ("acc 91.67") and record keys: short + "s" per epoch, "final_" + short
    places: int   # decimals in progress lines and the table
    column: str   # table header, before " (mean ± std)"
    axis: str     # figure y label, before " (mean over seeds)"
    title: str    # figure title, after "<prefix>: "

    @property
    def per_epoch(self) -> str:
        return self.short + "s"

    @property
    def final(self) -> str:
        return "final_" + self.short


# -- command line -------------------------------------------------------------------------------

def add_training_args(ap, *, epochs: int, seeds: int, lr: float):
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--lr", type=float, default=lr)


def add_output_args(ap, *, json_help: str | None = None):
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--json", default=None, help=json_help)


# -- the gradient methods side by side (tools/train_methods.py, tools/train_unet3d.py --methods) ----

METHODS = [
    ("exact", None),             # backprop: the table compares every row with "exact"
    ("probing (default plan)", {}),
    ("DFA", {"methods": ("dfa-plain",)}),
    ("MEM-DFA", {"methods": ("dfa",)}),
    # every conv and linear layer (aop_layers="all"): the planner itself takes Mem-AOP-GD only where
    # it saves time, which on these small layers is nowhere
    ("Mem-AOP-GD K/D=1/2", {"methods": ("aop",), "aop_k": 0.5, "aop_layers": "all"}),
    ("Mem-AOP-GD K/D=1/4", {"methods": ("aop",), "aop_k": 0.25, "aop_layers": "all"}),
]


def step_ms(rec) -> str:
    """A record's training milliseconds per step (its "step_seconds")."""
    return f"{1e3 * rec['step_seconds']:.0f}"


# -- one setting: build, measure ----------------------------------------------------------------

def seeded_model(make_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """make_model() with torch's global generator seeded first (the seed's initialisation)."""
    torch.manual_seed(seed)
    return make_model()


def build(model, example, loss_fn, setting):
    """(module to train, exception or None): model itself for setting None (exact gradients), else
    fxsketch.optimize(model, example, loss_fn=loss_fn, **setting); a failed call gives (None, the
    exception), for the table to report."""
    if setting is None:
        return model, None
    try:
        return fxsketch.optimize(model, example, loss_fn=loss_fn, **setting), None
    except Exception as e:  # reported in the table, not hidden
        return None, e


def error_text(e: BaseException) -> str:
    """An exception as one table cell."""
    return f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")


def decisions(gm) -> list[dict]:
    """The memory plan's decisions of an optimized module as plain dicts ([] for an unmodified one)."""
    return [dict(node=d.node, option=d.option.value, detail=d.detail, grad_noise=d.grad_noise)
            for d in getattr(getattr(gm, "memory_plan", None), "decisions", ())]


def dec_text(dec, empty: str = "-") -> str:
    """Decisions as "node:option(detail); ..." (``empty`` for none)."""
    return "; ".join(f"{d['node']}:{d['option']}({d['detail']})" for d in dec) or empty


def measure_step(gm, model, example, loss_fn) -> dict:
    """One training step of gm: measured peak (fxsketch.measure's live tensors), predicted peak at
    the same level (the tensor-level peak of gm's plan, or of fxsketch.plan of the unmodified
    model: kernel workspace left out, which the tracker cannot see), parameter and input bytes."""
    measured = fxsketch.measure(gm, example, loss_fn=loss_fn, repeat=1).peak_bytes
    plan = getattr(gm, "memory_plan", None)
    if plan is None:
        plan = fxsketch.plan(model, example, loss_fn=loss_fn)
    return dict(measured_peak=measured, predicted_peak=plan.tensor_peak_bytes,
                param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                input_bytes=example[0].numel() * example[0].element_size())


def activation_bytes(rec) -> int:
    """Measured peak less parameters, their gradients and the input batch."""
    return rec["measured_peak"] - 2 * rec["param_bytes"] - rec["input_bytes"]


def mib(b) -> str:
    return f"{b / 2**20:.2f}"


# -- training -----------------------------------------------------------------------------------

def train(name, seed, gm, model, opt, data, loss, metric: Metric, *, epochs, batch, sched=None,
          target=None, on_epoch=None) -> dict:
    """Train gm (model's parameters) for epochs on data = (x_train, y_train, x_test, y_test):
    minibatches of ``batch`` in an order drawn from a generator seeded 1000 + seed, ``loss(out, y)``
    per step, then opt.step() and sched.step() (if any), metric.fn(model, x_test, y_test) after every
    epoch. ``target``, if given, is a dict whose "y" is set to each step's targets (for a loss_fn
    that reads them). ``on_epoch(e)``, if given, is called before the first epoch (e = 0) and after
    each epoch e (a measurement during training; its time is left out of the record's seconds).
    Prints one progress line; returns the record (losses, metric per epoch, final metric,
    training seconds, and those per step)."""
    xtr, ytr, xte, yte = data
    steps = len(xtr) // batch
    g = torch.Generator().manual_seed(1000 + seed)
    losses, values = [], []
    t0 = time.time()
    if on_epoch is not None:
        t0 += _timed(on_epoch, 0)
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        tot = 0.0
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            if target is not None:
                target["y"] = ytr[idx]
            value = loss(gm(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if sched is not None:
                sched.step()
            tot += float(value.detach())
        losses.append(tot / steps)
        values.append(metric.fn(model, xte, yte))
        if on_epoch is not None:
            t0 += _timed(on_epoch, epoch + 1)
    seconds = time.time() - t0
    rec = {"losses": losses, metric.per_epoch: values, metric.final: values[-1], "seconds": seconds,
           "step_seconds": seconds / (epochs * steps)}
    print(f"{name} seed {seed}: {metric.short} {values[-1]:.{metric.places}f} loss {losses[-1]:.4f} "
          f"({rec['seconds']:.0f} s)", file=sys.stderr)
    return rec


def call_times(fn, rounds: int) -> list[float]:
    """Seconds of ``rounds`` calls of ``fn()`` after one warm-up call (benchmarks take their min or
    median of it)."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _timed(fn, *args) -> float:
    """Seconds fn(*args) took."""
    t = time.time()
    fn(*args)
    return time.time() - t


def eval_forward(model, x):
    """model(x) in eval mode without autograd; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


# -- report -------------------------------------------------------------------------------------

Column = tuple[str, Callable[[dict], str]]  # (header, cell from a setting's seed-0 record)


def table(results, metric: Metric, columns: Sequence[Column]) -> str:
    """Markdown table: a row per setting (its error, or metric mean ± std over seeds, seed 0's
    measured and predicted peak, activation MiB and reduction vs "exact"), then ``columns``."""
    heads = ["setting", f"{metric.column} (mean ± std)", "measured peak MiB", "predicted peak MiB",
             "activation MiB", "act. reduction vs exact", *(h for h, _ in columns)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    act_exact = activation_bytes(results["exact"]["runs"][0])
    p = metric.places
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(heads) - 2))
            continue
        vals = [x[metric.final] for x in r["runs"]]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        s0 = r["runs"][0]
        act = activation_bytes(s0)
        cells = [name, f"{statistics.mean(vals):.{p}f} ± {sd:.{p}f} (n={len(vals)})", mib(s0["measured_peak"]),
                 mib(s0["predicted_peak"]), mib(act), f"{act_exact / act:.2f}x", *(f(s0) for _, f in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path, metric: Metric, prefix: str, loss_scale: str = "linear"):
    """Training loss and test metric per epoch (mean over seeds), a line per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        if "error" in r:
            continue
        losses = torch.tensor([x["losses"] for x in r["runs"]]).mean(0)
        values = torch.tensor([x[metric.per_epoch] for x in r["runs"]]).mean(0)
        a.plot(range(1, len(losses) + 1), losses, label=name)
        b.plot(range(1, len(values) + 1), values, label=name)
    a.set(xlabel="epoch", ylabel="train loss (mean over seeds)", yscale=loss_scale,
          title=f"{prefix}: training loss")
    b.set(xlabel="epoch", ylabel=f"{metric.axis} (mean over seeds)", title=f"{prefix}: {metric.title}")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results, args, metric: Metric, columns: Sequence[Column], figure: str, prefix: str,
           loss_scale: str = "linear"):
    """Print the table; write the figure to args.out / figure and the raw results to args.json."""
    print(table(results, metric, columns))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / figure, metric, prefix, loss_scale)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
