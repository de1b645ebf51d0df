"""Which graph segments treat each sample of a batch on its own (what a chunked replay needs).

A segment is per-sample when every node's output row i depends only on row i of its batched
inputs: convolutions, linear layers, pointwise ops, pooling, resampling, concatenation along a
dim other than the batch, and normalisations over one sample (GroupNorm, LayerNorm,
InstanceNorm without running statistics). BatchNorm (statistics over the batch), random ops
(dropout with p > 0: a chunked run draws other masks) and anything unknown are not. The check is a
whitelist on torch-level calls; an exported graph's aten ops are not offered.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..saved import Kind
from ..solve import Span

__all__ = ["batch_of_segment", "batched_inputs", "chunkings", "SegmentBytes", "segment_bytes"]


_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.GroupNorm, nn.LayerNorm,
)
_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul, torch.relu_,
    torch.div, torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
    F.hardswish, F.interpolate, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.conv1d, F.conv2d,
    F.conv3d, F.linear, F.group_norm, F.layer_norm,
}
_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "mul", "sub", "div", "contiguous"}
_DIM_OPS = {torch.cat, torch.concat}  # per-sample unless along the batch dim


def _module_ok(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return not m.track_running_stats  # running statistics would be updated once per chunk
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p == 0 or not m.training
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and m.return_indices:
        return False
    if isinstance(m, nn.Flatten):
        return m.start_dim >= 1
    return isinstance(m, _MODULES)


def _dim(n: fx.Node, default: int, position: int = 1) -> int:
    return n.kwargs.get("dim", n.args[position] if len(n.args) > position else default)


def _node_ok(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return _module_ok(gm.get_submodule(n.target))
    if n.op == "call_function":
        if n.target in _DIM_OPS:
            d = _dim(n, 0)
            return isinstance(d, int) and d != 0 and d >= -1
        if n.target is torch.flatten:
            start = n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)
            return isinstance(start, int) and start >= 1
        return n.target in _FUNCTIONS
    if n.op == "call_method":
        if n.target == "flatten":
            start = n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)
            return isinstance(start, int) and start >= 1
        return n.target in _METHODS
    return False


def _rows(n: fx.Node) -> set[int]:
    """The first dims of ``n``'s tensor outputs (empty if it has none)."""
    return {m.shape[0] for m in n.meta.get("fxsketch.tensor", ()) if len(m.shape) >= 1}


def batch_of_segment(gm: fx.GraphModule, seg: list[fx.Node]) -> int | None:
    """The batch size a chunked replay of ``seg`` would split, or None where ``seg`` is not
    per-sample: an op off the whitelist, an input that is neither a batched tensor (first dim the
    batch) nor a fetched attribute, or an output without the batch as its first dim."""
    inside = set(seg)
    batch: set[int] = set()
    for n in seg:
        if not _node_ok(gm, n):
            return None
        rows = _rows(n)
        if len(rows) != 1 or len(n.meta.get("fxsketch.tensor", ())) != 1:
            return None  # one tensor out per node: no tuples, no ints
        batch |= rows
        for a in n.all_input_nodes:
            if a in inside or a.op == "get_attr":
                continue
            if _rows(a) != rows or len(a.meta.get("fxsketch.tensor", ())) != 1:
                return None
    if len(batch) != 1 or batch == {1}:
        return None
    return batch.pop()


@dataclass(frozen=True)
class SegmentBytes:
    """What running a segment a chunk at a time changes in the unmodified step's schedule."""

    inner: tuple[tuple[int, int, int, tuple], ...]  # (bytes, first step, last forward step, its savers'
    #   drops: (saved index, node) pairs) of the activations that stay inside
    grads: tuple[tuple[int, int, int], ...]   # (bytes, first, last step) of activation gradients made and used inside
    out_bytes: int                            # the segment's outputs
    dx: int                                   # gradients of its inputs (activations, not the step's inputs)
    first_fwd: int
    out_fwd: int                              # the forward step of its last output
    first_bwd: int                            # its first backward step
    last_bwd: int                             # its last backward step
    param_grads: tuple[tuple[int, int], ...] = ()  # (bytes, step made) of its parameters' gradients
    held_inputs: tuple[Span, ...] = ()          # its input activations, alive to its last forward step
    saved_outputs: tuple[tuple[int, int, tuple], ...] = ()  # (bytes, last backward step, the drops that let
    #   go of it) of the outputs its own nodes save

    def most_freed(self) -> int:
        """The most bytes chunking could take off one step (every inner activation let go of,
        chunks of one): what decides whether a segment is worth offering."""
        spans = [(b, a, e) for b, a, e, _ in self.inner] + list(self.grads)
        return max((sum(b for b, a, e in spans if a <= t <= e) for t in {a for _, a, _ in spans}), default=0)

    def early_grads(self) -> list[Span]:
        """Its backward runs as one step: the first chunk's backward makes every parameter
        gradient of the segment, at its first backward step, not at each node's."""
        return [Span(b, self.first_bwd, made) for b, made in self.param_grads if made > self.first_bwd]

    def smaller(self, frac: float, dropped=frozenset()) -> list[Span]:
        """Negative spans: the inner activations that no node keeps for backward (none saves them,
        or each saver is among ``dropped``) over their forward life, and the inner activation
        gradients, at ``frac`` of their size (they sit in the step's fixed bytes or in the saved
        table's forward part, which no choice changes). An activation a node still saves is
        kept chunk by chunk: all of it by the last chunk."""
        inner = [(b, a, e) for b, a, e, savers in self.inner if all(d in dropped for d in savers)]
        return [Span(-int((1 - frac) * b), a, e) for b, a, e in inner + list(self.grads)]


def segment_bytes(ctx, seg: list[fx.Node]) -> SegmentBytes:
    """:class:`SegmentBytes` of ``seg`` on the proposal context ``ctx`` (passes.options)."""
    steps, storages, intervals = ctx.schedule.steps, ctx.schedule.storages, ctx.timeline.intervals
    inside = set(seg)
    outputs = [n for n in seg if any(u not in inside for u in n.users)]
    ext = [a for a in dict.fromkeys(a for n in seg for a in n.all_input_nodes) if a not in inside]
    metas = lambda nodes: {m.storage: m for n in nodes for m in n.meta.get("fxsketch.tensor", ())}  # noqa: E731
    outs, ins = metas(outputs), metas(ext)
    inner = []
    for s in metas(seg).keys() - outs.keys() - ins.keys():
        if storages[s].kind is Kind.ACTIVATION and s in intervals:
            i = ctx.saved_index.get(s)
            end = ctx.saved[i].base_end if i is not None else intervals[s][1]
            savers = tuple((i, key) for key, _ in ctx.saved[i].savers) if i is not None else ()
            inner.append((storages[s].nbytes, intervals[s][0], end, savers))
    back = [ctx.bwd[n.name] for n in seg if n.name in ctx.bwd]
    last = max(back, default=0)
    grads = {s for n in seg if n.name in ctx.bwd for s in steps[ctx.bwd[n.name]].allocs
             if storages[s].kind is Kind.GRAD and s in intervals and intervals[s][1] <= last}
    dx = sum(storages[m.storage].nbytes for a in ext if a.op not in ("get_attr", "placeholder")
             for m in a.meta.get("fxsketch.tensor", ()) if m.requires_grad)
    made = {}
    for n in seg:
        if n.name in ctx.bwd:
            for s in steps[ctx.bwd[n.name]].allocs:
                if storages[s].kind is Kind.PARAM_GRAD and s in intervals:
                    made[s] = min(made.get(s, intervals[s][0]), intervals[s][0])
    own: dict[int, list] = {}  # an output a node of the segment saves: the chunks keep theirs beside the concatenation
    for n in seg:
        for s in n.meta.get("fxsketch.saved", ()):
            if s in outs and n.name in ctx.bwd and s in ctx.saved_index:
                end, keys = own.setdefault(s, [0, []])
                own[s] = [max(end, ctx.bwd[n.name]), keys + [(ctx.saved_index[s], n.name)]]
    out_fwd = max(ctx.fwd[n.name] for n in outputs)
    # a chunked run reads its inputs' chunks until its last chunk: the inputs live that long
    held = tuple(Span(storages[s].nbytes, intervals[s][1] + 1, out_fwd) for s in ins
                 if storages[s].kind is Kind.ACTIVATION and s in intervals and intervals[s][1] < out_fwd)
    return SegmentBytes(tuple(inner), tuple((storages[s].nbytes, *intervals[s]) for s in grads),
                        sum(storages[s].nbytes for s in outs), dx, ctx.fwd[seg[0].name],
                        max(ctx.fwd[n.name] for n in outputs), min(back, default=0), last,
                        tuple((storages[s].nbytes, a) for s, a in made.items()),
                        held, tuple((storages[s].nbytes, b, tuple(k)) for s, (b, k) in own.items()))


def batched_inputs(seg: list[fx.Node]) -> tuple[str, ...]:
    """The names of ``seg``'s inputs a chunked run splits (all but fetched attributes)."""
    inside = set(seg)
    return tuple(a.name for a in dict.fromkeys(a for n in seg for a in n.all_input_nodes)
                 if a not in inside and a.op != "get_attr")


def chunkings(batch: int, counts=(4, 16)) -> list[tuple[int, int]]:
    """(chunk count, samples per chunk) for each of ``counts`` on ``batch`` samples, without repeats."""
    out = {}
    for k in counts:
        chunk = -(-batch // min(k, batch))
        out[-(-batch // chunk)] = chunk
    return sorted(out.items())
