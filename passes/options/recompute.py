"""Recompute a segment in backward from its inputs (as MONeT and checkpointing do).

Segments offered: each module scope (a block) at every depth, the ranges between articulation
points of the graph (up to ``reach`` of them joined), and short chains anywhere with at most two
activations entering. A replay holds the segment's inputs until it runs, then rebuilds what the
segment's backward steps read.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ...ops.recompute import Recompute as RecomputeModule
from ...ops.chunked_replay import ChunkedRecompute
from ..saved import RESIDENT
from ..solve import Choice, Span
from . import Candidate, OptionKind, ProposalContext, RewriteContext, get, register
from .per_sample import batch_of_segment, batched_inputs, chunkings, segment_bytes

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


def writes_input(ctx: ProposalContext, seg: list[fx.Node]) -> bool:
    """Whether a node of ``seg`` writes in place into one of the segment's inputs."""
    names = {n.name for n in seg}
    return any(_inplace(ctx, n) and any(a.name not in names for a in n.all_input_nodes) for n in seg)


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


INNER_GAIN = 0.75
"""A replay with options inside is offered when it keeps (bytes x steps) at most this fraction of
what the plain replay keeps: each such choice is one more column for the solver."""


def _copies(ctx: ProposalContext, keys, dropped) -> dict[int, int]:
    """What a replay re-saves: saved index -> the last backward step of a keeper inside the
    segment that no inner option lets go of."""
    copies: dict[int, int] = {}
    for s, n in keys:
        i = ctx.saved_index[s]
        if (i, n.name) not in dropped:
            copies[i] = max(copies.get(i, 0), ctx.bwd[n.name])
    return copies


def _current(rw: RewriteContext, name: str) -> fx.Node:
    """The node of the new graph that stands for the node ``name`` now: itself, what replaced it,
    or the call of the replay it was cut into (following each replacement)."""
    while name not in rw.by_name:
        name = rw.standing[name].name
    return rw.by_name[name]


def _current_value(rw: RewriteContext, name: str) -> fx.Node:
    """The node of the new graph whose value is node ``name``'s now: as :func:`_current`, except
    that an output of a segment cut with several outputs is its getitem of the call, not the call."""
    while name not in rw.by_name:
        if name in rw.items:
            return rw.items[name]
        node = rw.standing[name]
        if not any(node.name in table for table in (rw.by_name, rw.standing, rw.items)):
            return node  # a value no table names further: an offload's getitem of its call
        name = node.name
    return rw.by_name[name]


def _useful(ctx: ProposalContext, keys, inner: dict) -> dict[int, int]:
    """Take out of ``inner`` (node name -> (choice, candidate), changed in place) every option
    that frees no storage the replay of ``keys`` would re-save (another keeper still re-saves it:
    the option only adds bytes); returns what the replay re-saves then (:func:`_copies`)."""
    key_index = {ctx.saved_index[s] for s, _ in keys}
    while True:
        copies = _copies(ctx, keys, {d for ch, _ in inner.values() for d in ch.drops})
        useless = [name for name, (ch, _) in inner.items()
                   if not any(i not in copies for i, _ in ch.drops if i in key_index)]
        if not useless:
            return copies
        for name in useless:
            del inner[name]


def _most_at_once(spans) -> int:
    """The most bytes of ``spans`` alive at one step."""
    return max((sum(sp.nbytes for sp in spans if sp.start <= t <= sp.end) for t in {sp.start for sp in spans}), default=0)


def _inner_choices(ctx: ProposalContext, seg: list[fx.Node], exact: bool, bound: float | None = None) -> dict:
    """Node name -> the single-node (choice, candidate) a replay of ``seg`` applies inside: per
    node, of the kinds that work inside a replay (``OptionKind.in_replays``), the admissible
    choice (noise within ``max_grad_noise``; none at all with ``exact``) that adds the fewest
    bytes (then the cheapest). A replay cannot offer every combination of its nodes' options;
    these two (exact, and the most compressed within the noise bound) are the ones that shrink
    what the replay re-saves most. ``bound``: another noise bound than those two."""
    if bound is None:
        bound = 0.0 if exact else ctx.settings.max_grad_noise
    inner = {}
    for n in seg:
        pairs = [(ch, cand) for ch, cand in ctx.node_pairs.get(n.name, ())
                 if get(cand.kind).in_replays and ch.noise <= bound and not ch.required]
        if pairs:
            inner[n.name] = min(pairs, key=lambda p: (sum(sp.nbytes for sp in p[0].adds), p[0].cost))
    return inner


@register
class Recompute(OptionKind):
    name = "recompute"
    default = True
    spans_nodes = True

    def graph_choices(self, ctx: ProposalContext):
        kernel = ctx.kernel_bytes
        ranges = segments(ctx.nodes)
        ends: dict[int, list[int]] = {}
        for i, j in ranges:
            ends.setdefault(i, []).append(j)
        replays: dict[tuple[int, int], tuple | None] = {}  # a prefix serves every segment it starts

        def replay(i: int, k: int):
            if (i, k) not in replays:
                replays[(i, k)] = self._replay(ctx, ctx.nodes[i:k + 1], kernel)
            return replays[(i, k)]
        for i, j in ranges:
            # the segments that start where this one does and end inside it: its nested replays
            prefixes = [replay(i, k) for k in ends[i] if k < j]
            yield from self._segment_choice(ctx, ctx.nodes[i:j + 1], kernel, [p for p in prefixes if p])

    def _replay(self, ctx: ProposalContext, seg: list[fx.Node], kernel: dict[int, int]):
        """What replaying ``seg`` needs: (nodes, external input storages, first backward step,
        keys = the (storage, node) saves the replay takes over, largest transient), or None where
        it is no valid segment or frees nothing."""
        names = {n.name for n in seg}
        seg = [n for n in seg if n.op not in ("placeholder", "get_attr")]
        if len(seg) < 2 or not all(n.name in ctx.fwd for n in seg):
            return None
        ext_inputs = {m.storage for n in seg for a in n.all_input_nodes if a.name not in names
                      for m in a.meta.get("fxsketch.tensor", ())}
        if writes_input(ctx, seg):
            return None  # replaying an in-place op on a segment input would apply it twice
        if any(n.meta.get("fxsketch.guard") for n in seg):
            return None  # an exported graph's input check (passes.export): stays in the forward
        back = [ctx.bwd[n.name] for n in seg if n.name in ctx.bwd]
        if not back:
            return None
        storages = ctx.schedule.storages
        keys = [(s, n) for n in seg for s in (n.meta.get("fxsketch.saved", ()) if n.name in ctx.bwd else ())
                if s in ctx.saved_index and s not in ext_inputs and storages[s].kind not in RESIDENT]
        if not keys:
            return None
        largest = max((storages[m.storage].nbytes for n in seg for m in n.meta.get("fxsketch.tensor", ())
                       if m.storage in storages), default=0)
        # the replay runs the segment's kernels again: their workspace (oneDNN's reorders) too
        largest += max((kernel.get(ctx.fwd[n.name], 0) for n in seg), default=0)
        return seg, ext_inputs, min(back), keys, largest

    def _segment_choice(self, ctx: ProposalContext, seg: list[fx.Node], kernel: dict[int, int], prefixes=()):
        """The choices of replaying ``seg`` (plain, with the single-node options of its nodes
        applied inside the replay, and with a nested replay of one of ``prefixes``: their
        :meth:`_replay`), or () if it is no valid segment or frees nothing."""
        replay = self._replay(ctx, seg, kernel)
        if replay is None:
            return ()
        seg, ext_inputs, rec, keys, largest = replay
        drops = tuple((ctx.saved_index[s], n.name) for s, n in keys)
        holds = tuple((ctx.saved_index[s], rec) for s in ext_inputs if s in ctx.saved_index)
        cost = ctx.cost.fraction(sum(ctx.cost.seconds[n.name] for n in seg))
        first, last = seg[0].name, seg[-1].name
        group, nodes = f"segment:{first}..{last}", tuple(n.name for n in seg)
        out, seen, plain_kept, bases = [], set(), 0, []
        for inner in ({}, *(_inner_choices(ctx, seg, exact) for exact in (True, False))):
            copies = _useful(ctx, keys, inner)
            adds = tuple(Span(ctx.saved[i].nbytes, rec, end) for i, end in copies.items()) + (Span(largest, rec, rec),)
            # an inner option's own storages (mask, sketch) are made by the replay, at ``rec``
            adds += tuple(Span(sp.nbytes, max(sp.start, rec), max(sp.end, rec)) for ch, _ in inner.values() for sp in ch.adds)
            signature = tuple(sorted(copies.items())), tuple(sorted((sp.nbytes, sp.end) for sp in adds))
            kept = sum(sp.nbytes * (sp.end - sp.start) for sp in adds)
            if signature in seen or inner and kept > INNER_GAIN * plain_kept:
                continue  # inner options that change little of what the replay keeps: not worth a choice
            seen.add(signature)
            if not inner:  # the plain replay comes first: the yardstick of the others
                plain_kept = kept
            bases.append((inner, adds))
            out.append(self._choice(ctx, seg, group, nodes, cost, drops, adds, holds, inner))
        # a nested replay of the segment's first nodes, in the plain replay and in the one with the
        # most options inside
        for k in dict.fromkeys((0, len(bases) - 1)):
            inner, adds = bases[k]
            nested = self._nested(ctx, replay, prefixes, inner, adds)
            if nested is not None:
                p_nodes, p_rec, p_inputs, adds_n = nested
                # the segment's inputs that the prefix reads stay until the prefix's own replay
                holds_n = tuple((ctx.saved_index[s], p_rec if s in p_inputs else rec)
                                for s in ext_inputs if s in ctx.saved_index)
                cost_n = cost + ctx.cost.fraction(sum(ctx.cost.seconds[n.name] for n in p_nodes))
                out.append(self._choice(ctx, seg, group, nodes, cost_n, drops, adds_n, holds_n, inner,
                                        tuple(n.name for n in p_nodes)))
        if ctx.settings.chunked_replays:
            out += self._chunked(ctx, replay, group, nodes, cost, drops, holds)
        return out

    def _chunked(self, ctx: ProposalContext, replay, group, nodes, cost, drops, holds):
        """Chunked replays of a per-sample segment (:mod:`fxsketch.ops.chunked_replay`): its forward
        and its replay run a chunk of the batch at a time. Against the plain replay: the segment's
        inner activations are a chunk's in forward, its replay holds one chunk's copies and
        transient, and its backward is one step, so the base schedule's full-size activation
        gradients inside the segment are a chunk's and the input gradients are alive from the
        replay on (:class:`~.per_sample.SegmentBytes`)."""
        from .chunk import CALL_SECONDS  # here: importing it first would register "chunk" before this kind
        seg, ext_inputs, rec, keys, largest = replay
        batch = batch_of_segment(ctx.gm, seg)
        if batch is None:
            return []
        sb = segment_bytes(ctx, seg)
        plain = sum(ctx.saved[i].nbytes for i in _copies(ctx, keys, set()))
        storages = ctx.schedule.storages
        biggest = max((storages[m.storage].nbytes for n in seg for m in n.meta.get("fxsketch.tensor", ())), default=0)
        # what one chunk's replay re-saves, without and with options inside (as in the plain replay):
        # a variant with options inside where it re-saves at most INNER_GAIN of what the plain one
        # does (each variant is a column per chunking)
        variants = []
        for inner in ({}, *(_inner_choices(ctx, seg, exact) for exact in (True, False))):
            copies = _useful(ctx, keys, inner)
            made = sum(sp.nbytes for ch, _ in inner.values() for sp in ch.adds)  # masks, sketches, codes
            saved = sum(ctx.saved[i].nbytes for i in copies) + made
            if not inner or saved <= INNER_GAIN * plain and all(saved != v for _, v in variants):
                variants.append((inner, saved))
        out, batched = [], batched_inputs(seg)
        moved = 2 * (sb.out_bytes + sb.dx)  # the copies of the chunks into the outputs and dX
        for k, chunk in chunkings(batch):
            frac = chunk / batch
            calls = ctx.cost.fraction(2 * k * len(seg) * CALL_SECONDS + moved / ctx.cost.device.bandwidth)
            for inner, saved in variants:
                # one chunk's replay: its copies, its transient, its activation gradients (two at once)
                held = int(frac * (saved + largest + 2 * biggest))
                if held + sb.dx > INNER_GAIN * (plain + largest):
                    continue  # holds about what the plain replay holds at once: not worth a column
                adds = sb.smaller(frac, set(drops)) + sb.early_grads()
                adds += [Span(sb.out_bytes, sb.first_fwd, sb.out_fwd), Span(held, rec, rec), Span(sb.dx, rec, sb.last_bwd)]
                choice, cand = self._choice(ctx, seg, group, nodes, cost + calls, drops, tuple(adds), holds, inner)
                out.append((choice, replace(cand, params=cand.params | dict(chunk=chunk, batched=batched),
                                            detail=cand.detail.replace(" nodes", f" nodes, in {k} chunks of {chunk}", 1))))
        return out

    def _choice(self, ctx, seg, group, nodes, cost, drops, adds, holds, inner: dict, nested=()):
        kinds = sorted({cand.kind for _, cand in inner.values()})
        detail = ", inside: " + ", ".join(f"{sum(c.kind == k for _, c in inner.values())} {k}" for k in kinds) \
            if inner else ""
        if nested:
            detail += f", nested replay of {nested[0]} .. {nested[-1]}"
        return (Choice(group, cost + sum(ch.cost for ch, _ in inner.values()),
                       max((ch.noise for ch, _ in inner.values()), default=0.0), drops=drops, adds=adds,
                       holds=holds, covers=nodes),
                Candidate(self.name, nodes, dict(inner=tuple(c for _, c in inner.values()), nested=nested),
                          f"{seg[0].name} .. {seg[-1].name} ({len(seg)} nodes{detail})"))

    def _nested(self, ctx: ProposalContext, replay, prefixes, inner: dict, base_adds):
        """A nested replay of the segment's first nodes (one of ``prefixes``, their replays), in
        the replay with the options ``inner`` inside, whose spans are ``base_adds``: the outer
        replay runs the prefix as a checkpoint too, so the prefix's saved tensors (and its inner
        options' masks, sketches, codes) are rebuilt only at its own backward, after the rest of
        the segment's backward has let go of its copies. Of the prefixes, the one whose replay
        holds the least at once, if that is at most INNER_GAIN of what the replay without it
        holds: (prefix nodes, its first backward step, its input storages, the spans), else None.
        The prefix's forward runs once more (the caller adds its cost)."""
        seg, ext_inputs, rec, keys, largest = replay
        dropped = {d for ch, _ in inner.values() for d in ch.drops}
        best = None
        for sub in prefixes:
            if len(sub[0]) >= len(seg):
                continue
            p_nodes, p_inputs, p_rec, _, p_largest = sub
            names = {n.name for n in p_nodes}
            if p_rec <= rec or sum(any(u.name not in names for u in n.users) for n in p_nodes) != 1:
                continue  # replayed at once anyway, or more than one tensor leaves the prefix
            outer = _copies(ctx, [(s, n) for s, n in keys if n.name not in names], dropped)
            within = _copies(ctx, [(s, n) for s, n in keys if n.name in names], dropped)
            adds = tuple(Span(ctx.saved[i].nbytes, rec, end) for i, end in outer.items())
            adds += tuple(Span(ctx.saved[i].nbytes, p_rec, end) for i, end in within.items())
            adds += (Span(largest, rec, rec), Span(p_largest, p_rec, p_rec))
            for name, (ch, _) in inner.items():  # made by the replay that runs the node's backward
                at = p_rec if name in names else rec
                adds += tuple(Span(sp.nbytes, max(sp.start, at), max(sp.end, at)) for sp in ch.adds)
            held = _most_at_once(adds)
            if best is None or held < best[0]:
                best = (held, p_nodes, p_rec, p_inputs, adds)
        if best is None or best[0] > INNER_GAIN * _most_at_once(base_adds):
            return None
        return best[1:]

    def label(self, cand: Candidate) -> str:
        inner, nested = cand.params.get("inner", ()), cand.params.get("nested", ())
        chunk = f" in chunks of {cand.params['chunk']}" if cand.params.get("chunk") else ""
        return f"recompute {len(cand.nodes)} nodes{chunk}" + (f" ({len(inner)} options inside)" if inner else "") \
            + (f" (nested replay of {len(nested)})" if nested else "")

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        for inner in cand.params.get("inner", ()):  # replaced in place first: the segment carries them
            kind = get(inner.kind)
            kind.rewrite(rw, inner).meta["fxsketch.option"] = kind.label(inner)
        nested = cand.params.get("nested", ())
        inner_call = self._cut(rw, nested) if nested else None
        call = self._cut(rw, cand.nodes, cand.params.get("chunk"), cand.params.get("batched", ()))
        if inner_call is not None:  # the outer segment's module holds it now
            rw.gm.delete_submodule(inner_call.target)
        return call

    def _cut(self, rw: RewriteContext, names, chunk: int | None = None, batched=()) -> fx.Node:
        """Move the nodes ``names`` (or what stands for them) into a Recompute module called in
        their place (a ChunkedRecompute of ``chunk`` samples, splitting the inputs ``batched`` names,
        where ``chunk`` is given); returns the call."""
        if not chunk:
            return cut(rw, names, lambda segment, inputs: RecomputeModule(segment))
        return cut(rw, names, lambda segment, inputs: ChunkedRecompute(segment, chunk, split_flags(rw, inputs, batched)))


def split_flags(rw: RewriteContext, inputs, batched) -> tuple[bool, ...]:
    """Per input node of a cut segment: whether it is one of the inputs ``batched`` names (or
    what stands for it: an output of an earlier multi-output cut is taken as its getitem)."""
    split = {_current_value(rw, b) for b in batched}
    return tuple(a in split for a in inputs)


def cut(rw: RewriteContext, names, make, prefix: str = "fxsketch_recompute") -> fx.Node:
    """Move the nodes ``names`` (or what stands for them) into the module ``make(segment graph
    module, input nodes)``, named ``prefix_<n>``, called in their place; returns the call."""
    graph = rw.graph
    seg = []
    for n in dict.fromkeys(_current(rw, name) for name in names):
        # an earlier multi-output cut's call comes with its getitems: left outside, they would feed
        # the new segment from its own output
        seg += [n] + [u for u in n.users if u.op == "call_function" and u.target is operator.getitem
                      and u.args[0] is n and n.op == "call_module"]
    seg = list(dict.fromkeys(seg))
    inside = set(seg)
    inputs = list(dict.fromkeys(a for n in seg for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in seg if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for n in seg:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
    index = next(rw.counter)
    name = f"{prefix}_{index}"
    # rooted at the new module: a nested replay's module is there, the model's own ones too
    rw.gm.add_submodule(name, make(fx.GraphModule(rw.gm, sub, f"segment_{index}"), inputs))
    for a in inputs:
        if a.op == "get_attr":  # a weight fetched inside the range: fetch it before the call
            seg[0].prepend(a)
    with graph.inserting_before(seg[0]):
        call = graph.call_module(name, tuple(inputs))
        if len(outputs) == 1:
            outputs[0].replace_all_uses_with(call)
        else:
            for k, o in enumerate(outputs):
                rw.items[o.name] = graph.call_function(operator.getitem, (call, k))
                o.replace_all_uses_with(rw.items[o.name])
    for n in reversed(seg):
        graph.erase_node(n)
        rw.by_name.pop(n.name, None)
        rw.standing[n.name] = call
    rw.by_name[call.name] = call
    return call
