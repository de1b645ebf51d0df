"""The time model: how long each node's forward takes, and so what an option's extra time costs.

The machine constants of the roofline are measured once per device and kept in
``~/.cache/fxsketch/device.json`` (``$FXSKETCH_CACHE``), so meta-input plans do not change with
timing noise. Two estimators, named in the plan's notes:
  "measured"  every node timed on a synthetic sub-batch (:func:`time_nodes` via
              :mod:`fxsketch.passes.timing`, cached per machine), where a roofline misjudges the
              machine (BatchNorm and max-pool on a CPU cost 10-50x their bytes' worth);
  "roofline"  FLOPs / peak FLOP rate vs bytes / memory bandwidth per node (:func:`node_seconds`),
              with this machine's measured matmul and copy rates (:class:`Device`); meta inputs.
The step is the sum of the nodes' forward and backward times (backward = 2 x forward with the
roofline); an option's overhead is its extra seconds divided by the step's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .._state import preserved
from . import diskcache
from .patterns import CONV_FUNCS, CONV_MODULES

__all__ = ["Device", "CostModel", "cost_model", "node_seconds", "time_nodes", "tensor_bytes"]


@dataclass(frozen=True)
class Device:
    """Roofline constants used to estimate time (only their ratio matters for overheads)."""

    flops: float = 5e10          # FLOP/s
    bandwidth: float = 1e10      # bytes/s

    @staticmethod
    def for_tensor(t: torch.Tensor) -> "Device":
        """Constants measured once per device (a matmul and a copy), so that overheads are in the
        proportions of this machine; meta tensors are timed on the CPU. The measurement is kept
        on disk (:mod:`fxsketch.passes.diskcache`): timings vary from run to run, and a plan must not."""
        dev = torch.device("cpu") if t.device.type == "meta" else t.device
        key = diskcache.machine_key(dev)
        if key not in _MEASURED:
            _MEASURED[key] = _load(key) or _store(key, _measure(dev))
        return _MEASURED[key]


_MEASURED: dict[str, Device] = {}


def _load(key: str) -> "Device | None":
    entry = diskcache.read("device").get(key)
    return Device(**entry) if entry else None


def _store(key: str, device: Device) -> Device:
    diskcache.update("device", {key: {"flops": device.flops, "bandwidth": device.bandwidth}})
    return device


def _best_seconds(fn, dev: torch.device, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return min(times)


def _measure(dev: torch.device) -> Device:
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):  # the caller's RNG stays
        return _measure_here(dev)


def _measure_here(dev: torch.device) -> Device:
    n = 1024 if dev.type == "cuda" else 384
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    src = torch.empty(1 << 22, device=dev)
    dst = torch.empty_like(src)
    a @ b, dst.copy_(src)  # warm up
    flops = 2 * n ** 3 / max(_best_seconds(lambda: a @ b, dev), 1e-9)
    bandwidth = 2 * src.nbytes / max(_best_seconds(lambda: dst.copy_(src), dev), 1e-9)
    return Device(flops=flops, bandwidth=bandwidth)


def tensor_bytes(meta) -> int:
    """Bytes of a tensor described by a :class:`~fxsketch.passes.saved.TensorMeta`."""
    return math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()


def node_seconds(gm: fx.GraphModule, n: fx.Node, device: Device) -> float:
    """Roofline estimate of the node's forward time."""
    outs = n.meta.get("fxsketch.tensor", ())
    if n.op in ("placeholder", "get_attr", "output") or not outs:
        return 0.0
    moved = sum(tensor_bytes(m) for m in outs) + sum(tensor_bytes(m) for a in n.all_input_nodes
                                                    for m in a.meta.get("fxsketch.tensor", ()))
    flops = 0.0
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(m, CONV_MODULES) or (n.op == "call_function" and n.target in CONV_FUNCS):
        w = m.weight.shape if m is not None else n.args[1].meta["fxsketch.tensor"][0].shape
        flops = 2.0 * math.prod(outs[0].shape) * math.prod(w[1:])
    elif isinstance(m, nn.Linear):
        flops = 2.0 * math.prod(outs[0].shape) * m.in_features
    return max(flops / device.flops, moved / device.bandwidth)


def time_nodes(gm: fx.GraphModule, inputs, repeat: int = 2) -> dict[str, float]:
    """Measured forward seconds of every node on real ``inputs`` (best of ``repeat`` runs after a
    warm-up, no autograd); BatchNorm running statistics are left as they were."""
    sync = torch.cuda.synchronize if any(x.is_cuda for x in inputs) else (lambda: None)
    best: dict[str, float] = {}

    class _Timed(fx.Interpreter):
        def run_node(self, n):
            sync()
            t0 = time.perf_counter()
            out = super().run_node(n)
            sync()
            dt = time.perf_counter() - t0
            best[n.name] = min(best.get(n.name, dt), dt)
            return out

    with preserved(gm), torch.no_grad():
        for i in range(repeat + 1):
            if i == 1:
                best.clear()  # the first run is the warm-up
            _Timed(gm).run(*inputs)
    return best


@dataclass(frozen=True)
class CostModel:
    """Forward seconds per node and of the whole step, and the estimator that gave them."""

    estimator: str                 # "measured" | "roofline"
    seconds: dict[str, float]      # node name -> forward seconds
    step_seconds: float            # forward + backward
    device: Device

    def fraction(self, seconds: float) -> float:
        """``seconds`` as a fraction of the step: the unit of every option's cost."""
        return seconds / self.step_seconds


def cost_model(gm: fx.GraphModule, device: Device, timings=None) -> CostModel:
    """Roofline seconds for every node, replaced where ``timings`` names the node: a
    :class:`~fxsketch.passes.timing.StepTimes` (each node's measured forward and backward, the
    default) or a plain dict of forward seconds (backward = 2 x forward)."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    seconds = {n.name: node_seconds(gm, n, device) for n in nodes}
    forward = getattr(timings, "forward", timings)
    if forward:
        seconds.update({k: v for k, v in forward.items() if k in seconds})
    backward = getattr(timings, "backward", None)
    step = sum(seconds.values()) + (sum(backward.values()) if backward else 2.0 * sum(seconds.values()))
    return CostModel("measured" if forward else "roofline", seconds, max(step, 1e-12), device)
