"""Offload: a node's saved activations go to host memory in forward and come back, prefetched, before
its backward reads them (:mod:`fxsketch.ops.offload`). Exact: the gradients are backprop's.

When it is offered (``OptionSettings.offload``, from ``Config.offload``):
  "auto"  on CUDA (a default method: host memory is not device memory there); on a CPU step only
          when the user names "offload" in ``methods`` (there the host *is* the device, so it
          frees nothing physical: it is exercised for correctness and accounting)
  "on"    on any device;  "off"  never.
``Config.offload_nodes`` names the nodes to offload (required choices, any device); a named node
that saves nothing offload could move is refused with an error naming it.

What a choice does to the liveness model: the node stops keeping its saved activations (the OR over
savers decides when they die); the prefetched device copy of each is alive from the prefetch step
(the backward of a node ``d`` steps earlier in backward order) to the node's own backward; on
CUDA the source stays until its copy-out is done (``holds``, the forward steps whose compute the
copy needs). Host bytes are not device bytes: they are reported apart (:func:`host_timeline`).

Pricing: a copy takes ``COPY_LATENCY + bytes / bandwidth`` (``Config.offload_bandwidth`` on
CUDA; on a CPU step the machine's measured copy rate, each byte read and written). On CUDA the
copy-out overlaps the rest of the forward and the copy-in the backward steps from the prefetch
to the use (per-node forward times of the cost model; backward ones as forward x the step's
measured backward/forward ratio); the extra time is what they do not hide. On CPU the copies run
on the caller's thread: all of it is extra.
"""
from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx

from ...errors import ConfigError
from ...ops.offload import Offload as OffloadModule, offload_prefetch
from ...units import format_bytes
from ..liveness import Schedule
from ..saved import RESIDENT, Kind
from ..solve import Choice, Span
from ..sweep import live_bytes
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register

__all__ = ["Offload", "offload_plan", "copy_seconds", "exposed_seconds", "host_timeline", "COPY_LATENCY",
           "MAX_DISTANCE"]

COPY_LATENCY = 10e-6
"""Seconds each copy costs beyond its bytes: the hook's Python work and a DMA launch."""

MAX_DISTANCE = 8
"""Farthest prefetch, in backward steps ahead of the use."""


def copy_seconds(nbytes: int, bandwidth: float, copies: int = 1) -> float:
    """Time of ``copies`` transfers of ``nbytes`` together at ``bandwidth`` bytes/s.

    >>> round(copy_seconds(50_000_000, 50e9), 6)
    0.00101
    """
    return copies * COPY_LATENCY + nbytes / bandwidth


def exposed_seconds(copy: float, hidden_by: Iterable[float]) -> float:
    """The part of a copy not hidden behind the compute it overlaps.

    >>> exposed_seconds(3.0, [1.0, 1.5]), exposed_seconds(1.0, [2.0])
    (0.5, 0.0)
    """
    return max(0.0, copy - sum(hidden_by))


def _device(ctx: ProposalContext) -> torch.device:
    return next((p.device for p in ctx.gm.parameters()), torch.device("cpu"))


def offload_plan(ctx: ProposalContext, n: fx.Node) -> dict | None:
    """What offloading ``n`` moves: the saved storages (ids) it copies to the host, the input
    positions whose storages stay on the device, its host bytes; None where it moves nothing
    (or a saved storage is one the runtime could not tell from an activation)."""
    storages = ctx.schedule.storages
    inputs = list(dict.fromkeys(n.all_input_nodes))
    by_input = {m.storage: i for i, a in enumerate(inputs) for m in a.meta.get("fxsketch.tensor", ())}
    moved, staying = [], set()
    for s in n.meta.get("fxsketch.saved", ()):
        info = storages[s]
        if info.kind in RESIDENT or info.kind is Kind.PARAM_GRAD or s in ctx.schedule.pinned:
            if s not in by_input and info.kind not in (Kind.PARAM, Kind.BUFFER):
                return None  # made here and kept to the end (a model output): it stays where it is
            staying.add(s)
        elif s in ctx.saved_index:
            moved.append(s)
    if not moved:
        return None
    for i, a in enumerate(inputs):
        metas = a.meta.get("fxsketch.tensor", ())
        if len(metas) != 1 and any(m.storage in moved for m in metas):
            return None  # a tuple input: its tensors cannot be kept apart at run time
    keep = tuple(i for i, a in enumerate(inputs)
                 if not any(m.storage in moved for m in a.meta.get("fxsketch.tensor", ())))
    return dict(storages=tuple(moved), keep=keep, host_bytes=sum(storages[s].nbytes for s in moved))


def _prefetch_points(ctx: ProposalContext, n: fx.Node) -> list[tuple[str, int, int]]:
    """(trigger node, its backward step, distance) for the nodes whose backward runs before
    ``n``'s, nearest first: a forward node after ``n`` with one tensor output of its own that
    requires grad."""
    order = {m.name: i for i, m in enumerate(ctx.nodes)}
    by_name = {m.name: m for m in ctx.nodes}
    b, out = ctx.bwd[n.name], []
    for step in range(b - 1, -1, -1):
        phase, name = ctx.schedule.steps[step].phase, ctx.schedule.steps[step].node
        if phase != "backward":
            break
        m = by_name.get(name)
        metas = m.meta.get("fxsketch.tensor", ()) if m is not None else ()
        if m is not None and order[name] > order[n.name] and len(metas) == 1 and metas[0].requires_grad \
                and m.meta.get("fxsketch.alias") is None and m.op not in ("placeholder", "get_attr"):
            out.append((name, step, b - step))
            if b - step >= MAX_DISTANCE:
                break
    return out


def _offered(ctx: ProposalContext, n: fx.Node) -> bool:
    st = ctx.settings
    if st.offload_nodes is not None:
        return n.name in st.offload_nodes
    return st.offload == "on" or (st.offload == "auto" and _device(ctx).type == "cuda")


@register
class Offload(OptionKind):
    name = "offload"
    default = True

    def graph_choices(self, ctx: ProposalContext):
        named = ctx.settings.offload_nodes or ()
        unknown = [name for name in named if name not in ctx.fwd or name not in ctx.bwd]
        if unknown:
            some = [m.name for m in ctx.nodes if m.name in ctx.bwd and m.meta.get("fxsketch.saved")][:8]
            raise ConfigError(f"offload_nodes: {unknown} are not nodes of the graph with a backward step "
                              f"(nodes with one include {some})")
        return ()

    def node_choices(self, ctx: ProposalContext, n: fx.Node):
        if not _offered(ctx, n):
            return
        plan = offload_plan(ctx, n)
        required = ctx.settings.offload_nodes is not None
        if plan is None:
            if required:
                raise ConfigError(f"offload_nodes: node {n.name!r} saves no activation that offload could move "
                                  f"to the host (what its backward reads is parameters, inputs or model "
                                  f"outputs, or nothing); leave it out of offload_nodes")
            return
        points = _prefetch_points(ctx, n)
        if not points:
            if required:
                raise ConfigError(f"offload_nodes: node {n.name!r} has no later node whose backward runs before "
                                  f"its own, so there is no step to prefetch its saved tensors at")
            return
        cuda = _device(ctx).type == "cuda"
        nbytes, count = plan["host_bytes"], len(plan["storages"])
        if cuda:
            t_copy = copy_seconds(nbytes, ctx.settings.offload_bandwidth, count)
        else:  # a memcpy on the caller's thread; the measured rate counts each byte read and written
            t_copy = copy_seconds(2 * nbytes, ctx.cost.device.bandwidth, count)
        fwd_after = [ctx.cost.seconds[m.name] for m in ctx.nodes if m.name in ctx.fwd and ctx.fwd[m.name] > ctx.fwd[n.name]]
        t_out = exposed_seconds(t_copy, fwd_after if cuda else ())
        holds = self._copy_out_holds(ctx, n, plan, t_copy) if cuda else ()
        chosen = points[:1] if not cuda else self._distances(ctx, points, t_copy)
        if required:
            chosen = chosen[-1:]
        for trigger, step, d in chosen:
            hidden = [self._backward_seconds(ctx, ctx.schedule.steps[k].node) for k in range(step, ctx.bwd[n.name])]
            extra = t_out + exposed_seconds(t_copy, hidden if cuda else ())
            adds = tuple(Span(ctx.schedule.storages[s].nbytes, step, ctx.bwd[n.name]) for s in plan["storages"])
            drops = tuple((ctx.saved_index[s], n.name) for s in plan["storages"])
            detail = f"{format_bytes(nbytes)} to host, prefetch at backward {trigger} ({d} step{'s' * (d > 1)} ahead)"
            yield (Choice(n.name, ctx.cost.fraction(max(extra, 2 * COPY_LATENCY)), 0.0, drops=drops, adds=adds,
                          holds=holds, required=required),
                   Candidate(self.name, (n.name,), dict(keep=plan["keep"], trigger=trigger, distance=d,
                                                        host_bytes=nbytes), detail))

    @staticmethod
    def _backward_seconds(ctx: ProposalContext, name: str) -> float:
        forward = sum(ctx.cost.seconds.values())
        ratio = (ctx.cost.step_seconds - forward) / forward if forward > 0 else 2.0
        return ctx.cost.seconds.get(name, 0.0) * ratio

    def _distances(self, ctx: ProposalContext, points, t_copy: float):
        """The nearest prefetch point (least memory) and the nearest whose backward steps hide
        the copy-in (least time), if that is another."""
        for trigger, step, d in points:
            end = step + d
            if sum(self._backward_seconds(ctx, ctx.schedule.steps[k].node) for k in range(step, end)) >= t_copy:
                return points[:1] if d == points[0][2] else [points[0], (trigger, step, d)]
        return points[:1]

    @staticmethod
    def _copy_out_holds(ctx: ProposalContext, n: fx.Node, plan, t_copy: float):
        """On CUDA the source is freed when its copy-out is done: after the forward steps whose
        compute the copy needs (the allocator holds it by ``record_stream``)."""
        spent, step = 0.0, ctx.fwd[n.name]
        for m in ctx.nodes:
            if m.name in ctx.fwd and ctx.fwd[m.name] > ctx.fwd[n.name]:
                if spent >= t_copy:
                    break
                spent += ctx.cost.seconds[m.name]
                step = ctx.fwd[m.name]
        return tuple((ctx.saved_index[s], step) for s in plan["storages"]) if step > ctx.fwd[n.name] else ()

    def label(self, cand: Candidate) -> str:
        return f"offload (prefetch {cand.params['distance']})"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        graph, p = rw.graph, cand.params
        n = rw.by_name[cand.nodes[0]]
        inputs = list(dict.fromkeys(n.all_input_nodes))
        sub = fx.Graph()
        env = {a: sub.placeholder(a.name) for a in inputs}
        sub.output(sub.node_copy(n, lambda a: env[a]))
        index = next(rw.counter)
        name = f"fxsketch_offload_{index}"
        module = OffloadModule(fx.GraphModule(rw.model, sub, f"offload_{index}"), p["keep"], p["host_bytes"])
        rw.gm.add_submodule(name, module)
        with graph.inserting_before(n):
            call = graph.call_module(name, tuple(inputs))
            out = graph.call_function(operator.getitem, (call, 0))
            handle = graph.call_function(operator.getitem, (call, 1))
        scope = {k: v for k, v in n.meta.items() if k.startswith("fxsketch.scope")}
        call.meta.update(scope)
        out.meta.update(scope)
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        rw.by_name.pop(n.name, None)
        rw.by_name[call.name] = call
        rw.standing[cand.nodes[0]] = out
        trigger = rw.by_name.get(p["trigger"]) or rw.standing.get(p["trigger"])
        if trigger is None:
            raise RuntimeError(f"offload of {cand.nodes[0]!r}: its prefetch node {p['trigger']!r} is not in the "
                               f"rewritten graph (replaced by an option that does not record what stands for it)")
        with graph.inserting_after(trigger):
            graph.call_function(offload_prefetch, (trigger, handle))
        return call


def host_timeline(gm: fx.GraphModule, schedule: Schedule) -> tuple[int, ...]:
    """Host bytes per step of an analysed rewritten ``gm``: each offloaded node's copies, from its
    forward to its backward (when autograd frees what it saved)."""
    spans = []
    end = len(schedule.steps) - 1
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), OffloadModule):
            first = schedule.index("forward", node.name)
            try:
                last = schedule.index("backward", node.name)
            except KeyError:
                last = end
            spans.append((gm.get_submodule(node.target).host_bytes, first, last))
    return tuple(live_bytes(len(schedule.steps), spans)) if spans else ()
