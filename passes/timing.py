"""Measured times for the cost model: each node's forward, the step's backward share, and the
extra time of a replacement op, timed on this device once and kept on disk.

The user's step may not fit, so nothing here runs it at full size: node times and the backward
share come from one synthetic sub-batch (random inputs of the example inputs' shapes with ``b``
samples; the same rule for real and meta inputs), scaled to the batch; an op pair (a lean op and
the op it replaces) is timed alone at its own shape, with the batch cut so that one tensor is at
most :data:`OP_ELEMENTS` elements, and scaled likewise. Figures are cached per machine
(:mod:`fxsketch.passes.diskcache`, ``timing.json``), so the same model gives the same plan under
any later load; the first measurement is the one kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from .._state import preserved
from ..ops import cpu_kernels
from ..ops._args import layout_order
from . import diskcache
from .precision import current, forward_context

__all__ = ["StepTimes", "time_step", "op_extra_seconds", "OP_ELEMENTS", "synthetic_inputs", "own_rng", "slowdown",
           "LOADED", "layout_ratio", "whole_steps"]

log = logging.getLogger(__name__)

VERSION = 19
"""Part of every cache key: raise it when fxsketch's ops or the timing rule change."""

OP_ELEMENTS = 1 << 22
"""Largest tensor (elements) an op pair is timed at; bigger ones are timed on fewer samples."""


@dataclass(frozen=True)
class StepTimes:
    """Forward (with autograd recording) and backward seconds per node, stated for the full batch."""

    forward: dict[str, float]
    backward: dict[str, float]
    samples: int            # the sub-batch they were measured on
    slowdown: float = 1.0   # how much slower than its measured speed the machine ran while timing
    #   (:func:`slowdown`); above LOADED the times are not cached
    layout: float = 0.0     # the step these times are of against the step as given, minus 1, where the
    #   planned graph is relaid out (passes/layout.py; negative: faster); set by the planner


LOADED = 2.5
"""A machine that runs a small reference matmul this many times slower than the fastest it was
seen to run it (:func:`slowdown`) is loaded (another process on its cores): times taken then are
used for this plan but not cached, so a later plan on a quiet machine takes them again. A node
time taken under a competing process was 13x the quiet one (docs/overhead.md); the reference's
own spread on a quiet machine is well under 2x."""

_REF = 128  # the reference matmul's side: three 64 KiB fp32 operands, so planning stays small


def _reference_seconds(dev: torch.device) -> float:
    """Best of 5 of 10 products of two 128x128 matrices on ``dev``."""
    a = torch.randn(_REF, _REF, device=dev)
    b = torch.randn(_REF, _REF, device=dev)
    out = torch.empty(_REF, _REF, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best = math.inf
    for i in range(6):  # the first run warms up
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b, out=out)
        sync()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def slowdown(device) -> float:
    """How many times slower this machine runs the reference matmul now than the fastest it was seen
    to run it (kept in the device cache; the first call sets it and returns 1)."""
    dev = torch.device("cpu") if torch.device(device).type == "meta" else torch.device(device)
    with own_rng(dev):
        now = _reference_seconds(dev)
    key = f"{diskcache.machine_key(dev)}|reference matmul {_REF}"
    fastest = diskcache.read("device").get(key, {}).get("seconds")
    if fastest is None or now < fastest:
        diskcache.update("device", {key: {"seconds": now}})
    return now / fastest if fastest else 1.0


def synthetic_inputs(shapes: Sequence[tuple[tuple[int, ...], torch.dtype]], device) -> tuple[torch.Tensor, ...]:
    """Random tensors of these shapes: normal floats, zeros for integer and bool inputs (valid
    indices whatever the table); timing does not depend on the values."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen, dtype=d).to(device) if d.is_floating_point
                 else torch.zeros(s, dtype=d, device=device) for s, d in shapes)


def _key(gm: fx.GraphModule, shapes, extra: str) -> str:
    code = hashlib.sha1(gm.code.encode()).hexdigest()[:16]
    params = [(tuple(p.shape), str(p.dtype)) for p in gm.parameters()]
    sig = json.dumps([[list(s), str(d)] for s, d in shapes] + [params], default=str)
    return f"{code}|{hashlib.sha1(sig.encode()).hexdigest()[:16]}|{extra}"


class _NodeTimer(fx.Interpreter):
    """Runs the graph without autograd and, at every node, times the node alone: its forward with
    autograd on (inputs made leaves) and its backward for a random output gradient. Memory: the
    no-grad forward's values plus one node's forward and backward at a time."""

    def __init__(self, gm: fx.GraphModule, sync):
        super().__init__(gm)
        self.sync, self.forward, self.backward = sync, {}, {}

    def _clock(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def run_node(self, n: fx.Node):
        out, plain = self._clock(lambda: super(_NodeTimer, self).run_node(n))
        if n.op in ("placeholder", "output", "get_attr"):
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        leaves = []

        def leaf(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                leaves.append(v.detach().requires_grad_())
                return leaves[-1].clone()  # not a leaf: an in-place op may write it
            return v
        args, kwargs = fx.node.map_aggregate(args, leaf), fx.node.map_aggregate(kwargs, leaf)
        params = [p for p in (self.module.get_submodule(n.target).parameters() if n.op == "call_module" else ())
                  if p.requires_grad]
        with torch.enable_grad():
            y, fwd = self._clock(lambda: getattr(self, n.op)(n.target, args, kwargs))
        outs = [t for t in (y if isinstance(y, (tuple, list)) else (y,))
                if isinstance(t, torch.Tensor) and t.requires_grad]
        wrt = leaves + params
        bwd = 0.0
        if outs and wrt:
            grads = [torch.randn_like(t) for t in outs]
            _, bwd = self._clock(lambda: torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        self.forward[n.name] = min(self.forward.get(n.name, fwd), fwd) if outs else plain
        self.backward[n.name] = min(self.backward.get(n.name, bwd), bwd)
        return out


def time_step(gm: fx.GraphModule, shapes, batch: int, samples: int, repeat: int = 2) -> StepTimes:
    """Forward and backward seconds of every node of ``gm``, each timed alone on synthetic inputs
    of ``shapes`` (already cut to ``samples``; best of ``repeat`` runs after a warm-up), scaled
    from ``samples`` to ``batch``; read from the disk cache when this machine timed the same
    graph before. BatchNorm statistics and ``.grad`` are left as they were."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    key = f"v{VERSION}|{diskcache.machine_key(device)}|{_key(gm, shapes, f'{samples}/{batch}|autocast {current()}')}"
    if (hit := diskcache.read("timing").get(key)) is not None:
        return StepTimes(hit["forward"], hit["backward"], samples)
    inputs = synthetic_inputs(shapes, device)
    timer = _NodeTimer(gm, torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    load = slowdown(device)
    with preserved(gm, grads=True), torch.no_grad(), forward_context(device.type), own_rng(device):
        for i in range(repeat + 1):
            if i == 1:  # the first run is the warm-up
                timer.forward.clear()
                timer.backward.clear()
            timer.run(*inputs)
    load = max(load, slowdown(device))
    scale = batch / samples
    times = StepTimes({k: v * scale for k, v in timer.forward.items()},
                      {k: v * scale for k, v in timer.backward.items()}, samples, load)
    if load <= LOADED:
        diskcache.update("timing", {key: {"forward": times.forward, "backward": times.backward}})
    else:
        log.warning("node times taken while this machine ran %.1fx slower than its measured speed "
                    "(another process on its cores?): used for this plan, not cached", load)
    return times


def layout_ratio(given: fx.GraphModule, relaid: fx.GraphModule, shapes, loss_fn,
                 repeat: int = 3) -> tuple[float, float]:
    """(seconds of one whole training step (forward, ``loss_fn``, backward) of ``relaid`` over those
    of ``given`` on synthetic inputs of ``shapes`` (a sub-batch the caller admitted to memory), the
    two timed in turn ``repeat`` times after a warm-up each, best of each; the machine's
    :func:`slowdown` while timing, 1 from the cache). Cached per machine unless timed above LOADED.
    Node times alone barely see the layout; whole steps do (docs/layout.md, "Step time")."""
    device = next((p.device for p in relaid.parameters()), torch.device("cpu"))
    key = (f"v{VERSION}|{diskcache.machine_key(device)}|layout ratio|{_key(given, shapes, '')}|"
           f"{_key(relaid, shapes, f'autocast {current()}')}")
    if (hit := diskcache.read("timing").get(key)) is not None:
        return hit["ratio"], 1.0
    load = slowdown(device)
    seconds = whole_steps((given, relaid), shapes, loss_fn, repeat)
    ratio = seconds[1] / seconds[0]
    load = max(load, slowdown(device))
    if load <= LOADED:
        diskcache.update("timing", {key: {"ratio": ratio}})
    return ratio, load


def whole_steps(graphs: Sequence[fx.GraphModule], shapes, loss_fn, repeat: int = 3) -> list[float]:
    """Best-of-``repeat`` seconds of one training step (forward, ``loss_fn``, backward) of each
    graph on the same synthetic inputs of ``shapes``, the graphs timed in turn after a warm-up
    round; their parameters' ``.grad`` and buffers are left as they were (the steps start from no
    ``.grad``, so none of the caller's accumulates into; uncached)."""
    device = next((p.device for p in graphs[0].parameters()), torch.device("cpu"))
    inputs = synthetic_inputs(shapes, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [math.inf] * len(graphs)
    with contextlib.ExitStack() as stack:
        for gm in graphs:
            stack.enter_context(preserved(gm, grads=True))
        for gm in graphs:  # backward would add into the caller's .grad tensors, restored after
            for p in gm.parameters():
                p.grad = None
        stack.enter_context(torch.enable_grad())
        stack.enter_context(forward_context(device.type))
        stack.enter_context(own_rng(device))
        for i in range(repeat + 1):  # round 0 warms every graph up
            for k, gm in enumerate(graphs):
                sync()
                t0 = time.perf_counter()
                loss_fn(gm(*inputs)).backward()
                sync()
                if i:
                    best[k] = min(best[k], time.perf_counter() - t0)
                for p in gm.parameters():
                    p.grad = None
    return best


def own_rng(device: torch.device):
    """Timing draws random tensors (and probed convs draw seeds): the caller's RNG streams are
    left as they were."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


def op_extra_seconds(name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                     original: Callable[[torch.Tensor], torch.Tensor],
                     replacement: Callable[[torch.Tensor], torch.Tensor] | dict[str, Callable],
                     repeat: int = 5, wrt: Sequence[torch.Tensor] = (), elements: int = OP_ELEMENTS,
                     min_samples: int = 1, stride: Sequence[int] | None = None):
    """Seconds ``replacement`` takes beyond ``original`` for one forward + backward at ``shape``
    (>= 0; the gradient of the input and of the leaves ``wrt``, e.g. a conv weight the two close
    over). ``replacement`` may be a dict label -> op (several variants, e.g. probe ranks, timed
    against one ``original``): then the answer is a dict label -> seconds. Every op is warmed up
    once, then all are timed in turn ``repeat`` times (drift of the machine hits each alike) and
    each keeps its best. ``name`` (with the label) names the figure in the cache: include every
    argument that changes the time. The input is cut to at most ``elements`` elements, or to
    ``min_samples`` samples where they hold at most :data:`OP_ELEMENTS` (a one-sample tensor can
    take another code path than the batch's), and laid out channels_last where ``stride`` (the
    planned tensor's) is."""
    many = isinstance(replacement, dict)
    variants = replacement if many else {"": replacement}
    shape = tuple(shape)
    per_sample = math.prod(shape[1:]) if len(shape) > 1 else 1
    least = min_samples if min_samples * per_sample <= OP_ELEMENTS else 1
    samples = min(shape[0], max(1, least, elements // max(per_sample, 1))) if shape else 1
    cut = (samples, *shape[1:]) if shape else shape
    fmt = memory_format_of(shape, stride)
    dev = torch.device("cpu") if device.type == "meta" else device
    loops = "|fused cpu loops" if dev.type == "cpu" and cpu_kernels.library() is not None else ""  # quantized saves
    lay = f"|{fmt}" if fmt is not None else ""
    keys = {label: f"v{VERSION}|{diskcache.machine_key(dev)}{loops}|{name}{label}|{list(cut)}{lay}|{dtype}"
            for label in variants}
    known = diskcache.read("timing")
    hits = {label: known.get(key) for label, key in keys.items()}
    if any(v is None for v in hits.values()):
        load = slowdown(dev)
        with own_rng(dev):
            hits = _time_variants(cut, dtype, dev, original, variants, repeat, wrt, fmt)
        if max(load, slowdown(dev)) <= LOADED:  # as time_step's: a loaded machine's times are not kept
            diskcache.update("timing", {keys[label]: v for label, v in hits.items()})
    scale = shape[0] / samples if shape else 1.0
    out = {label: v * scale for label, v in hits.items()}
    return out if many else out[""]


def memory_format_of(shape: Sequence[int], stride: Sequence[int] | None):
    """torch.channels_last(_3d) where a 4-d (5-d) tensor of ``shape`` and ``stride`` is laid out
    so, else None (contiguous, other ranks, no stride known)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    if fmt is None or stride is None:
        return None
    return fmt if layout_order(shape, stride) == [0, *range(2, len(shape)), 1] else None


def _time_variants(cut, dtype, dev, original, variants, repeat, wrt, fmt=None) -> dict[str, float]:
    """Best-of-``repeat`` seconds of each variant minus ``original``, forward + backward, on an
    input laid out in memory format ``fmt`` (None: contiguous)."""
    x = torch.randn(cut, dtype=dtype, device=dev)
    x = (x if fmt is None else x.contiguous(memory_format=fmt)).requires_grad_()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.randn_like(original(x.detach()))
    runs = {None: original} | variants
    best = dict.fromkeys(runs, math.inf)
    for i in range(repeat + 1):  # round 0 warms every op up
        for label, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            torch.autograd.grad(fn(x), [x, *wrt], g)
            sync()
            if i:
                best[label] = min(best[label], time.perf_counter() - t0)
    return {label: max(best[label] - best[None], 0.0) for label in variants}
