"""Per node, the options besides keep: probe a conv, a lean op, recompute a segment.

Each option is described on the liveness model as numbers (:class:`fxsketch.passes.solve.Choice`):
which (storage, saver) pairs it releases, which new storages it adds and when, its estimated
extra time and gradient noise. The solver sees only these numbers; the rewrite pass reads the
matching :class:`Candidate` to know what to emit.

Time is a roofline estimate per node (FLOPs / peak FLOP rate vs bytes / memory bandwidth),
backward taken as twice the forward; the overhead of an option is its extra time divided by the
estimated step time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ops.probes import rank_for_ratio, sketch_nbytes
from .liveness import Schedule, Timeline
from .saved import Kind, require
from .solve import Choice, Problem, Saved, Span

__all__ = ["Candidate", "Device", "build_problem", "conv_ranks", "conv_spec", "lean_spec", "node_seconds",
           "probe_targets", "time_nodes"]

_RESIDENT = (Kind.PARAM, Kind.BUFFER, Kind.INPUT)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
_RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
_LEAKY_FUNCS = (F.leaky_relu, F.leaky_relu_)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_POOL_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)


@dataclass(frozen=True)
class Device:
    """Roofline constants used to estimate time (only their ratio matters for overheads)."""

    flops: float = 5e10          # FLOP/s
    bandwidth: float = 1e10      # bytes/s

    @staticmethod
    def for_tensor(t: torch.Tensor) -> "Device":
        """Constants measured once per device (a matmul and a copy), so that overheads are in the
        proportions of this machine; meta tensors are timed on the CPU."""
        dev = torch.device("cpu") if t.device.type == "meta" else t.device
        key = str(dev)
        if key not in _MEASURED:
            _MEASURED[key] = _measure(dev)
        return _MEASURED[key]


_MEASURED: dict[str, Device] = {}


def _measure(dev: torch.device) -> Device:
    import time

    def best(fn, reps=3):
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

    n = 1024 if dev.type == "cuda" else 384
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    src = torch.empty(1 << 22, device=dev)
    dst = torch.empty_like(src)
    a @ b, dst.copy_(src)  # warm up
    flops = 2 * n ** 3 / max(best(lambda: a @ b), 1e-9)
    bandwidth = 2 * src.nbytes / max(best(lambda: dst.copy_(src)), 1e-9)
    return Device(flops=flops, bandwidth=bandwidth)


@dataclass(frozen=True)
class Candidate:
    """One option of one node (or one segment), as the rewrite pass needs it."""

    kind: str                       # "probe" | "lean" | "recompute"
    nodes: tuple[str, ...]          # the node, or the segment's nodes in order
    params: dict[str, Any] = field(default_factory=dict)  # probe: rank/mode/probe/ratio
    detail: str = ""


def _module(gm: fx.GraphModule, n: fx.Node):
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def conv_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """The conv arguments of a node that can become a probed conv, or None."""
    m = _module(gm, n)
    if isinstance(m, _CONV_MODULES) and m.padding_mode == "zeros":
        return dict(weight=f"{n.target}.weight", bias=f"{n.target}.bias" if m.bias is not None else None,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    if n.op == "call_function" and n.target in _CONV_FUNCS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, n.args)) | dict(n.kwargs)
        if not isinstance(bound.get("weight"), fx.Node):
            return None
        return dict(weight=bound["weight"], bias=bound.get("bias"), stride=bound.get("stride", 1),
                    padding=bound.get("padding", 0), dilation=bound.get("dilation", 1),
                    groups=bound.get("groups", 1))
    return None


def lean_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """What a lean op replacing this node needs, or None if it has no lean form."""
    m = _module(gm, n)
    if isinstance(m, nn.ReLU):
        return dict(op="relu", inplace=m.inplace)
    if isinstance(m, nn.LeakyReLU):
        return dict(op="leaky_relu", negative_slope=m.negative_slope, inplace=m.inplace)
    if isinstance(m, _POOL_MODULES) and not m.return_indices:
        return dict(op="max_pool", kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode)
    if n.op == "call_function" and n.target in _RELU_FUNCS:
        return dict(op="relu", inplace=n.target in (torch.relu_, F.relu_) or bool(n.kwargs.get("inplace")
                    or (len(n.args) > 1 and n.args[1])))
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return dict(op="relu", inplace=n.target == "relu_")
    if n.op == "call_function" and n.target in _LEAKY_FUNCS:
        slope = n.kwargs.get("negative_slope", n.args[1] if len(n.args) > 1 else 0.01)
        inplace = n.target is F.leaky_relu_ or bool(n.kwargs.get("inplace", n.args[2] if len(n.args) > 2 else False))
        return dict(op="leaky_relu", negative_slope=slope, inplace=inplace)
    if n.op == "call_function" and n.target in _POOL_FUNCS:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        bound = dict(zip(names, n.args)) | dict(n.kwargs)
        if bound.get("return_indices"):
            return None
        return dict(op="max_pool", kernel_size=bound["kernel_size"], stride=bound.get("stride"),
                    padding=bound.get("padding", 0), dilation=bound.get("dilation", 1),
                    ceil_mode=bound.get("ceil_mode", False))
    return None


def _bytes(meta) -> int:
    return math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()


def node_seconds(gm: fx.GraphModule, n: fx.Node, device: Device) -> float:
    """Roofline estimate of the node's forward time."""
    outs = n.meta.get("fxsketch.tensor", ())
    if n.op in ("placeholder", "get_attr", "output") or not outs:
        return 0.0
    moved = sum(_bytes(m) for m in outs) + sum(_bytes(m) for a in n.all_input_nodes
                                              for m in a.meta.get("fxsketch.tensor", ()))
    flops = 0.0
    m = _module(gm, n)
    if conv_spec(gm, n) is not None:
        w = m.weight.shape if m is not None else n.args[1].meta["fxsketch.tensor"][0].shape
        flops = 2.0 * math.prod(outs[0].shape) * math.prod(w[1:])
    elif isinstance(m, nn.Linear):
        flops = 2.0 * math.prod(outs[0].shape) * m.in_features
    return max(flops / device.flops, moved / device.bandwidth)


def time_nodes(gm: fx.GraphModule, inputs, repeat: int = 2) -> dict[str, float]:
    """Measured forward seconds of every node on real ``inputs`` (best of ``repeat`` runs after a
    warm-up, no autograd): the planner's time model where a roofline misjudges the machine
    (e.g. BatchNorm and ReLU on a CPU cost far more than their bytes suggest)."""
    import time

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

    state = {k: v.clone() for k, v in gm.state_dict().items()}  # BN running stats stay as they were
    try:
        with torch.no_grad():
            for i in range(repeat + 1):
                if i == 1:
                    best.clear()  # the first run is the warm-up
                _Timed(gm).run(*inputs)
    finally:
        gm.load_state_dict(state)
    return best


def conv_ranks(x_shape, ratios, mode: str) -> list[int]:
    """The candidate ranks of a conv input: one per storage ratio."""
    return sorted({rank_for_ratio(x_shape, r, mode) for r in ratios})


def probe_targets(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Node name -> (conv weight, input shape) of every conv that could be probed."""
    out = {}
    for n in gm.graph.nodes:
        spec = conv_spec(gm, n) if n.op != "output" else None
        metas = n.all_input_nodes[0].meta.get("fxsketch.tensor", ()) if spec and n.all_input_nodes else ()
        if spec is None or not metas or len(metas[0].shape) < 3:
            continue
        w = spec["weight"]
        weight = gm.get_parameter(w) if isinstance(w, str) else gm.get_parameter(w.target) \
            if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            out[n.name] = (weight, metas[0].shape)
    return out


def _storage_of_input(n: fx.Node, i: int = 0) -> int | None:
    arg = n.all_input_nodes[i] if len(n.all_input_nodes) > i else None
    metas = arg.meta.get("fxsketch.tensor", ()) if arg is not None else ()
    return metas[0].storage if metas else None


def _segments(gm: fx.GraphModule, nodes: list[fx.Node], reach: int = 4,
              window: int = 6) -> list[tuple[int, int]]:
    """Contiguous node ranges [i, j] to recompute: each module scope (a block) at every depth,
    the ranges between articulation points of the graph, and chains of up to ``window`` nodes."""
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        scope = n.meta.get("fxsketch.scope", "")
        parts = scope.split(".") if scope else []
        for d in range(1, len(parts) + 1):
            spans.setdefault(".".join(parts[:d]), []).append(i)
    out = set()
    for idx in spans.values():
        if len(idx) >= 2 and idx[-1] - idx[0] + 1 == len(idx):
            out.add((idx[0], idx[-1]))
    # ranges between articulation points (one activation crosses), up to `reach` of them joined:
    # the checkpoint-every-few-blocks segments of a chain, wherever the graph narrows to one tensor
    pos = {n: i for i, n in enumerate(nodes)}
    last = {n: max((pos[u] for u in n.users if u in pos), default=pos[n]) for n in nodes}
    cuts, crossing = [], set()
    for i, n in enumerate(nodes):
        if n.op not in ("placeholder", "get_attr"):
            crossing.add(n)
        crossing = {c for c in crossing if last[c] > i}
        if len(crossing) <= 1:
            cuts.append(i)
    for a in range(len(cuts)):
        for b in range(a + 1, min(a + 1 + reach, len(cuts))):
            if cuts[b] - cuts[a] >= 2:
                out.add((cuts[a] + 1, cuts[b]))
    # short chains anywhere (MONeT-style): replay e.g. bn -> relu -> conv -> bn from the first
    # node's input, so that only that input is kept; at most two activations enter the chain
    for i in range(len(nodes)):
        entering: set[fx.Node] = set()
        inside: set[fx.Node] = set()
        for j in range(i, min(i + window, len(nodes))):
            n = nodes[j]
            if n.op in ("placeholder", "get_attr", "output"):
                break
            inside.add(n)
            entering |= {a for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
            if len(entering) > 2:
                break
            if j > i:
                out.add((i, j))
    return sorted(out)


def _inplace(gm: fx.GraphModule, n: fx.Node) -> bool:
    m = _module(gm, n)
    if m is not None:
        return bool(getattr(m, "inplace", False))
    name = getattr(n.target, "__name__", str(n.target))
    return name.endswith("_") and not name.endswith("__") or bool(n.kwargs.get("inplace"))


def build_problem(gm: fx.GraphModule, schedule: Schedule, timeline: Timeline, *,
                  methods=("probe", "lean", "recompute"), ratios=(1 / 4, 1 / 16, 1 / 64),
                  probe_rank: int | None = None, mode: str = "spatial", probe: str = "gaussian",
                  device: Device | None = None, noise: dict | None = None,
                  max_grad_noise: float = 1.0,
                  timings: dict[str, float] | None = None) -> tuple[Problem, list[Candidate], float]:
    """Describe every option of every node on ``schedule``; return (problem, candidates, step seconds).

    ``problem.choices[i]`` and ``candidates[i]`` describe the same option. With ``noise``
    (node name -> :class:`fxsketch.calibrate.ConvNoise`), a conv is offered at one rank only: the
    smallest whose probe noise is at most ``max_grad_noise`` times its SGD noise (none if no
    calibrated rank qualifies); the reported noise is that ratio. Without it the noise is a
    heuristic, sqrt(1 / storage ratio). ``timings`` (node name -> measured forward seconds, see
    :func:`time_nodes`) replace the roofline estimate of the nodes it names.
    """
    require(gm, "fxsketch.step")
    storages = schedule.storages
    steps = schedule.steps
    T = len(steps)
    nodes = [n for n in gm.graph.nodes if n.op not in ("output",)]
    fwd = {s.node: i for i, s in enumerate(steps) if s.phase == "forward"}
    bwd = {s.node: i for i, s in enumerate(steps) if s.phase == "backward"}
    device = device or Device()
    seconds = {n.name: node_seconds(gm, n, device) for n in nodes}
    if timings:
        seconds.update({k: v for k, v in timings.items() if k in seconds})
    step_seconds = max(3.0 * sum(seconds.values()), 1e-12)

    # saved activations: alive until their last forward use, then while a saver keeps them
    saved_index: dict[int, int] = {}
    saved: list[Saved] = []
    savers: dict[int, list[tuple[str, int]]] = {}
    base_end: dict[int, int] = {}
    for i, st in enumerate(steps):
        for s in st.allocs + st.reads:
            info = storages[s]
            if info.kind not in (Kind.ACTIVATION, Kind.INTERNAL) or s in schedule.pinned:
                continue
            if st.phase == "backward":
                savers.setdefault(s, []).append((st.node, i))
            else:
                base_end[s] = max(base_end.get(s, i), i)
    for s in savers:
        start = timeline.intervals[s][0]
        saved_index[s] = len(saved)
        saved.append(Saved(storages[s].nbytes, start, base_end.get(s, start), tuple(savers[s])))
    # activations no backward node saves are listed too (no savers): a recompute segment that
    # starts from one must hold it until the replay, which the solver has to see
    for s, (a, b) in timeline.intervals.items():
        info = storages[s]
        if s not in saved_index and info.kind in (Kind.ACTIVATION, Kind.INTERNAL) and s not in schedule.pinned:
            saved_index[s] = len(saved)
            saved.append(Saved(info.nbytes, a, b, ()))
    diff = [0] * (T + 1)
    for s, (a, b) in timeline.intervals.items():
        if s not in saved_index:
            diff[a] += storages[s].nbytes
            diff[b + 1] -= storages[s].nbytes
    fixed, run = [], 0
    for t in range(T):
        run += diff[t]
        fixed.append(run)
    problem = Problem(T, fixed, saved, [])
    cands: list[Candidate] = []

    def add(choice: Choice, cand: Candidate):
        problem.choices.append(choice)
        cands.append(cand)

    def own_saved(n: fx.Node) -> list[int]:
        return [s for s in n.meta.get("fxsketch.saved", ()) if s in saved_index]

    for n in nodes:
        if n.name not in bwd or n.name not in fwd:
            continue
        f, b = fwd[n.name], bwd[n.name]
        if "probe" in methods and (spec := conv_spec(gm, n)) is not None:
            x = _storage_of_input(n)
            xmeta = n.all_input_nodes[0].meta["fxsketch.tensor"][0]
            if x in saved_index and any(k == n.name for k, _ in saved[saved_index[x]].savers) \
                    and len(xmeta.shape) >= 3 and xmeta.dtype.is_floating_point:
                out = n.meta["fxsketch.tensor"][0]
                wshape = (gm.get_submodule(n.target).weight.shape if n.op == "call_module"
                          else n.args[1].meta["fxsketch.tensor"][0].shape)
                ks = math.prod(wshape[2:])  # kernel taps: the estimate scatters dY once per tap
                ranks = [probe_rank] if probe_rank else conv_ranks(xmeta.shape, ratios, mode)
                calibrated = noise.get(n.name) if noise and not probe_rank else None
                if calibrated is not None:
                    r = calibrated.smallest_rank(max_grad_noise)
                    ranks = [r] if calibrated.ratio(r) <= max_grad_noise else []
                exact_wgrad = seconds[n.name]
                for r in ranks:
                    nb = sketch_nbytes(xmeta.shape, r, mode, xmeta.dtype)
                    ratio = nb / max(storages[x].nbytes, 1)
                    extra = (2 * storages[x].nbytes + 2 * ks * _bytes(out)) / device.bandwidth \
                        + ratio * exact_wgrad - exact_wgrad
                    cost = max(extra, 0.02 * exact_wgrad) / step_seconds
                    if calibrated is not None:
                        level = calibrated.ratio(r)
                        detail = f"{mode}, r={r} ({ratio:.3g} of X, {probe}), noise {level:.2f}x SGD"
                    else:
                        level = math.sqrt(1.0 / ratio) if ratio < 1 else 0.0
                        detail = f"{mode}, r={r} ({ratio:.3g} of X, {probe})"
                    add(Choice(n.name, cost, level, drops=((saved_index[x], n.name),),
                               adds=(Span(nb, f, b),)),
                        Candidate("probe", (n.name,), dict(spec, rank=r, mode=mode, probe=probe, ratio=ratio),
                                  detail))
        if "lean" in methods and (spec := lean_spec(gm, n)) is not None:
            drops = tuple((saved_index[s], n.name) for s in own_saved(n))
            out = n.meta["fxsketch.tensor"][0]
            if drops:
                if spec["op"] == "max_pool":
                    window = math.prod(spec["kernel_size"]) if isinstance(spec["kernel_size"], tuple) \
                        else spec["kernel_size"] ** (len(out.shape) - 2)
                    nb = math.prod(out.shape) * (1 if window <= 256 else 2 if window <= 32768 else 4)
                    detail = f"max-pool window offsets ({nb // max(math.prod(out.shape), 1)} B each)"
                else:
                    nb = (math.prod(out.shape) + 7) // 8
                    detail = f"{spec['op']} 1-bit mask"
                add(Choice(n.name, 0.1 * seconds[n.name] / step_seconds, 0.0, drops=drops, adds=(Span(nb, f, b),)),
                    Candidate("lean", (n.name,), spec, detail))
    if "recompute" in methods:
        for i, j in _segments(gm, nodes):
            seg = nodes[i:j + 1]
            _segment_choice(gm, seg, saved_index, fwd, bwd, seconds, step_seconds, storages, add)
    return problem, cands, step_seconds


def _segment_choice(gm, seg, saved_index, fwd, bwd, seconds, step_seconds, storages, add) -> None:
    """Offer recomputing ``seg`` (via ``add``) if it is a valid segment that frees something."""
    names = {n.name for n in seg}
    if any(n.op in ("placeholder", "get_attr") for n in seg):
        seg = [n for n in seg if n.op not in ("placeholder", "get_attr")]
    if len(seg) < 2 or not all(n.name in fwd for n in seg):
        return
    ext_inputs = {m.storage for n in seg for a in n.all_input_nodes if a.name not in names
                  for m in a.meta.get("fxsketch.tensor", ())}
    for n in seg:  # replaying an in-place op on a segment input would apply it twice
        if _inplace(gm, n) and any(a.name not in names for a in n.all_input_nodes):
            return
    back = [bwd[n.name] for n in seg if n.name in bwd]
    if not back:
        return
    rec = min(back)
    drops, copies = [], {}
    for n in seg:
        if n.name not in bwd:
            continue
        for s in n.meta.get("fxsketch.saved", ()):
            if s in saved_index and s not in ext_inputs and storages[s].kind not in _RESIDENT:
                drops.append((saved_index[s], n.name))
                copies[s] = max(copies.get(s, 0), bwd[n.name])
    if not drops:
        return
    largest = max((storages[m.storage].nbytes for n in seg for m in n.meta.get("fxsketch.tensor", ())
                   if m.storage in storages), default=0)
    adds = tuple(Span(storages[s].nbytes, rec, end) for s, end in copies.items()) + (Span(largest, rec, rec),)
    holds = tuple((saved_index[s], rec) for s in ext_inputs if s in saved_index)
    cost = sum(seconds[n.name] for n in seg) / step_seconds
    first, last = seg[0].name, seg[-1].name
    add(Choice(f"segment:{first}..{last}", cost, 0.0, drops=tuple(drops), adds=adds, holds=holds,
               covers=tuple(n.name for n in seg)),
        Candidate("recompute", tuple(n.name for n in seg), {}, f"{first} .. {last} ({len(seg)} nodes)"))
