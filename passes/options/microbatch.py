"""Run a per-sample segment as micro-batches (:class:`fxsketch.ops.chunked_replay.MicroBatched`).

The segment's forward runs on a chunk of the batch at a time with grad, each chunk's graph keeping
what its ops save; backward runs chunk by chunk. Nothing is recomputed: what the segment saves is
what its nodes' own choices say (a lean ReLU's mask, a probe's sketch, the input itself), for all
chunks together, but its other activations in forward and its activation gradients in backward
are a chunk's at a time. Exact (a conv's sums on a smaller batch: within rounding).

Like a replay, a micro-batched segment takes its nodes' options inside itself (variants: the
exact ones, and the most compressed within three noise levels up to ``max_grad_noise``), so what
it keeps is known to the solver; its choices exclude the nodes' own.

Segments offered: those a replay is offered on (:func:`.recompute.segments`) and the longest runs
of nodes that treat each sample on their own (:mod:`.per_sample`), in 4 and 16 chunks. A micro-batched segment excludes replays over
its nodes and the nodes' own choices (it covers their groups).
"""
from __future__ import annotations

import torch.fx as fx

from ...ops.chunked_replay import MicroBatched
from ..solve import Choice, Span
from . import Candidate, OptionKind, ProposalContext, RewriteContext, get, register
from .per_sample import _node_ok, batch_of_segment, batched_inputs, chunkings, segment_bytes
from .recompute import _inner_choices, cut, segments, split_flags, writes_input

__all__ = ["MicroBatch"]


def _runs(ctx: ProposalContext) -> set[tuple[int, int]]:
    """The longest ranges of consecutive per-sample compute nodes."""
    out, start = set(), None
    for i, n in enumerate(ctx.nodes + [None]):
        ok = n is not None and n.op in ("call_module", "call_function", "call_method") and _node_ok(ctx.gm, n)
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - 1 > start:
                out.add((start, i - 1))
            start = None
    return out


def _activations(ctx: ProposalContext, seg: list[fx.Node]):
    """The storages of ``seg``'s outputs (at least one: every node of a per-sample segment has one)."""
    storages = ctx.schedule.storages
    return [storages[m.storage] for n in seg for m in n.meta.get("fxsketch.tensor", ()) if m.storage in storages]


def _noise_levels(ctx: ProposalContext, seg: list[fx.Node]) -> list[float]:
    """Noise bounds of the variants with options inside: 0 (exact options only), and the levels
    that split the segment's noisy options (within ``max_grad_noise``) into thirds, so the solver
    can take e.g. 8-bit codes without probes (a price and a noise between exact and the most
    compressed)."""
    noises = sorted({ch.noise for n in seg for ch, cand in ctx.node_pairs.get(n.name, ())
                     if get(cand.kind).in_replays and 0 < ch.noise <= ctx.settings.max_grad_noise})
    return [0.0] + sorted({noises[min(len(noises) - 1, len(noises) * k // 3)] for k in (1, 2, 3)} if noises else set())


@register
class MicroBatch(OptionKind):
    name = "microbatch"
    default = True
    spans_nodes = True

    def graph_choices(self, ctx: ProposalContext):
        for i, j in sorted(set(segments(ctx.nodes)) | _runs(ctx)):
            seg = [n for n in ctx.nodes[i:j + 1] if n.op not in ("placeholder", "get_attr")]
            if len(seg) < 2 or not all(n.name in ctx.fwd for n in seg):
                continue
            if writes_input(ctx, seg):
                continue  # an in-place op on a segment input would write into a view of its split
            batch = batch_of_segment(ctx.gm, seg)
            if batch is None:
                continue
            sb = segment_bytes(ctx, seg)
            biggest = max(m.nbytes for m in _activations(ctx, seg))
            if sb.most_freed() < biggest:
                continue  # frees less than one of its activations at any step: not worth the columns
            nodes = tuple(n.name for n in seg)
            seen = set()
            for inner in ({}, *(_inner_choices(ctx, seg, False, bound) for bound in _noise_levels(ctx, seg))):
                dropped = frozenset(d for ch, _ in inner.values() for d in ch.drops)
                if dropped in seen:
                    continue
                seen.add(dropped)
                for k, chunk in chunkings(batch):
                    yield self._choice(ctx, seg, nodes, sb, inner, dropped, k, chunk, batch)

    def _choice(self, ctx, seg, nodes, sb, inner: dict, dropped, k: int, chunk: int, batch: int):
        """The micro-batched segment in ``k`` chunks, with the single-node options ``inner`` of its
        nodes applied inside (their own drops and adds; what they let go of entirely is a chunk's
        in forward)."""
        from .chunk import CALL_SECONDS  # here: importing it first would register "chunk" out of order
        frac = chunk / batch
        # the chunks' outputs beside their concatenation; the chunks' input gradients beside theirs
        adds = sb.smaller(frac, dropped) + sb.early_grads() + [Span(sb.out_bytes, sb.out_fwd, sb.out_fwd),
                                                               Span(sb.dx, sb.last_bwd, sb.last_bwd)]
        # an output its own nodes save (a ReLU's) is kept twice: the chunks' and the concatenation
        adds += [Span(b, sb.out_fwd, end) for b, end, keys in sb.saved_outputs if not all(d in dropped for d in keys)]
        adds += [sp for ch, _ in inner.values() for sp in ch.adds] + list(sb.held_inputs)
        moved = 2 * (sb.out_bytes + sb.dx)
        cost = ctx.cost.fraction(2 * k * len(seg) * CALL_SECONDS + moved / ctx.cost.device.bandwidth)
        kinds = sorted({cand.kind for _, cand in inner.values()})
        detail = ", inside: " + ", ".join(f"{sum(c.kind == kd for _, c in inner.values())} {kd}" for kd in kinds) \
            if inner else ""
        return (Choice(f"microbatch:{nodes[0]}..{nodes[-1]}", cost + sum(ch.cost for ch, _ in inner.values()),
                       max((ch.noise for ch, _ in inner.values()), default=0.0), drops=tuple(sorted(dropped)),
                       adds=tuple(adds), covers=nodes),
                Candidate(self.name, nodes, dict(chunk=chunk, batched=batched_inputs(seg),
                                                 inner=tuple(c for _, c in inner.values())),
                          f"{nodes[0]} .. {nodes[-1]} ({len(seg)} nodes, in {k} chunks of {chunk}{detail})"))

    def label(self, cand: Candidate) -> str:
        return f"micro-batch {len(cand.nodes)} nodes in chunks of {cand.params['chunk']}"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        for inner in cand.params.get("inner", ()):  # replaced in place first: the segment carries them
            kind = get(inner.kind)
            kind.rewrite(rw, inner).meta["fxsketch.option"] = kind.label(inner)
        chunk, batched = cand.params["chunk"], cand.params["batched"]
        return cut(rw, cand.nodes, lambda segment, inputs: MicroBatched(segment, chunk, split_flags(rw, inputs, batched)),
                   "fxsketch_microbatch")
