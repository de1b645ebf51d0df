"""Recompute a segment in backward from its inputs (as MONeT and checkpointing do).

Segments offered: each module scope (a block) at every depth, the ranges between articulation
points of the graph (up to ``reach`` of them joined), and short chains anywhere with at most two
activations entering. A replay holds the segment's inputs until it runs, then rebuilds what the
segment's backward steps read.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...ops.recompute import Recompute as RecomputeModule
from ..saved import RESIDENT
from ..solve import Choice, Span
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register

__all__ = ["Recompute", "segments"]


def segments(nodes: list[fx.Node], reach: int = 4, window: int = 6) -> list[tuple[int, int]]:
    """Contiguous node ranges [i, j] to recompute: each module scope (a block) at every depth,
    the ranges between articulation points of the graph, and chains of up to ``window`` nodes."""
    out = _scopes(nodes) | _between_cuts(nodes, reach) | _chains(nodes, window)
    return sorted(out)


def _scopes(nodes):
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        parts = n.meta.get("fxsketch.scope", "").split(".")
        for d in range(1, len(parts) + 1):
            if parts[0]:
                spans.setdefault(".".join(parts[:d]), []).append(i)
    return {(idx[0], idx[-1]) for idx in spans.values() if len(idx) >= 2 and idx[-1] - idx[0] + 1 == len(idx)}


def _between_cuts(nodes, reach):
    # where the graph narrows to one tensor: the checkpoint-every-few-blocks segments of a chain
    pos = {n: i for i, n in enumerate(nodes)}
    last = {n: max((pos[u] for u in n.users if u in pos), default=pos[n]) for n in nodes}
    cuts, crossing = [], set()
    for i, n in enumerate(nodes):
        if n.op not in ("placeholder", "get_attr"):
            crossing.add(n)
        crossing = {c for c in crossing if last[c] > i}
        if len(crossing) <= 1:
            cuts.append(i)
    return {(cuts[a] + 1, cuts[b]) for a in range(len(cuts))
            for b in range(a + 1, min(a + 1 + reach, len(cuts))) if cuts[b] - cuts[a] >= 2}


def _chains(nodes, window):
    # MONeT-style: replay e.g. bn -> relu -> conv -> bn from the first node's input
    out = set()
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
    return out


def _inplace(ctx: ProposalContext, n: fx.Node) -> bool:
    m = ctx.module(n)
    if m is not None:
        return bool(getattr(m, "inplace", False))
    if isinstance(n.target, torch._ops.OpOverload):  # an exported graph's aten op
        return _mutates(n)
    name = getattr(n.target, "__name__", str(n.target))
    return name.endswith("_") and not name.endswith("__") or bool(n.kwargs.get("inplace"))


_STATS_OPS = (torch.ops.aten.batch_norm.default, torch.ops.aten.instance_norm.default)


def _mutates(n: fx.Node) -> bool:
    """Whether an aten op writes to an argument: its schema says so (relu_, add_), or it is a
    training-mode norm updating its running statistics (a BatchNorm module's call restores them
    after a replay; an exported graph's aten.batch_norm reads the buffers from outside)."""
    if any(a.alias_info is not None and a.alias_info.is_write for a in n.target._schema.arguments):
        return True
    if n.target in _STATS_OPS:
        bound = dict(zip(("input", "weight", "bias", "running_mean", "running_var", "training"), n.args)) | n.kwargs
        return bool(bound.get("training")) and bound.get("running_mean") is not None  # instance_norm: use_input_stats
    return False


@register
class Recompute(OptionKind):
    name = "recompute"
    default = True
    spans_nodes = True

    def graph_choices(self, ctx: ProposalContext):
        for i, j in segments(ctx.nodes):
            found = self._segment_choice(ctx, ctx.nodes[i:j + 1])
            if found is not None:
                yield found

    def _segment_choice(self, ctx: ProposalContext, seg: list[fx.Node]):
        """The choice of replaying ``seg``, or None if it is no valid segment or frees nothing."""
        names = {n.name for n in seg}
        seg = [n for n in seg if n.op not in ("placeholder", "get_attr")]
        if len(seg) < 2 or not all(n.name in ctx.fwd for n in seg):
            return None
        ext_inputs = {m.storage for n in seg for a in n.all_input_nodes if a.name not in names
                      for m in a.meta.get("fxsketch.tensor", ())}
        if any(_inplace(ctx, n) and any(a.name not in names for a in n.all_input_nodes) for n in seg):
            return None  # replaying an in-place op on a segment input would apply it twice
        if any(n.meta.get("fxsketch.guard") for n in seg):
            return None  # an exported graph's input check (passes.export): stays in the forward
        back = [ctx.bwd[n.name] for n in seg if n.name in ctx.bwd]
        if not back:
            return None
        rec = min(back)
        storages = ctx.schedule.storages
        drops, copies = [], {}
        for n in seg:
            for s in n.meta.get("fxsketch.saved", ()) if n.name in ctx.bwd else ():
                if s in ctx.saved_index and s not in ext_inputs and storages[s].kind not in RESIDENT:
                    drops.append((ctx.saved_index[s], n.name))
                    copies[s] = max(copies.get(s, 0), ctx.bwd[n.name])
        if not drops:
            return None
        largest = max((storages[m.storage].nbytes for n in seg for m in n.meta.get("fxsketch.tensor", ())
                       if m.storage in storages), default=0)
        adds = tuple(Span(storages[s].nbytes, rec, end) for s, end in copies.items()) + (Span(largest, rec, rec),)
        holds = tuple((ctx.saved_index[s], rec) for s in ext_inputs if s in ctx.saved_index)
        cost = ctx.cost.fraction(sum(ctx.cost.seconds[n.name] for n in seg))
        first, last = seg[0].name, seg[-1].name
        return (Choice(f"segment:{first}..{last}", cost, 0.0, drops=tuple(drops), adds=adds, holds=holds,
                       covers=tuple(n.name for n in seg)),
                Candidate(self.name, tuple(n.name for n in seg), {}, f"{first} .. {last} ({len(seg)} nodes)"))

    def label(self, cand: Candidate) -> str:
        return f"recompute {len(cand.nodes)} nodes"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        graph = rw.graph
        seg = [rw.by_name[name] for name in cand.nodes]
        inside = set(seg)
        inputs = list(dict.fromkeys(a for n in seg for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in seg if any(u not in inside for u in n.users)]
        sub = fx.Graph()
        env = {a: sub.placeholder(a.name) for a in inputs}
        for n in seg:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
        index = next(rw.counter)
        name = f"fxsketch_recompute_{index}"
        rw.gm.add_submodule(name, RecomputeModule(fx.GraphModule(rw.model, sub, f"segment_{index}")))
        for a in inputs:
            if a.op == "get_attr":  # a weight fetched inside the range: fetch it before the call
                seg[0].prepend(a)
        with graph.inserting_before(seg[0]):
            call = graph.call_module(name, tuple(inputs))
            if len(outputs) == 1:
                outputs[0].replace_all_uses_with(call)
            else:
                for k, o in enumerate(outputs):
                    o.replace_all_uses_with(graph.call_function(operator.getitem, (call, k)))
        for n in reversed(seg):
            graph.erase_node(n)
            rw.by_name.pop(n.name, None)
        rw.by_name[call.name] = call
        return call
