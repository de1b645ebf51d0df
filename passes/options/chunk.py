"""Chunked conv backward: a conv module whose backward runs a few samples at a time
(:mod:`fxsketch.ops.chunked`), so its kernel workspace at that step is one chunk's.

Exact up to rounding (dW and db summed over chunks). It saves what the conv saves; what it
frees is workspace, which the solver's model holds in a step's fixed bytes: its choice carries
a span of negative bytes at the conv's backward step (the workspace of the whole-batch call less
that of one chunk's call, both measured by :mod:`passes.workspace`), and the chunk's own dX and
dW temporaries as a positive one.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from ... import ops
from ..solve import Choice, Span
from ..workspace import workspace_bytes
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register

__all__ = ["Chunk", "CHUNKS", "CALL_SECONDS"]

CHUNKS = (4, 16)
"""The batch is split into this many chunks (each of at least one sample); one choice each."""

CALL_SECONDS = 1e-4
"""Extra seconds per extra backward call (dispatch, a kernel's set-up, the chunk's dX copy
aside): the conv does the same arithmetic in chunks; its cost is estimated, not timed (the
planner's op timing runs on a sub-batch too small to split), see docs/replays.md."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register
class Chunk(OptionKind):
    name = "chunk"
    default = True

    def node_choices(self, ctx: ProposalContext, n: fx.Node):
        m = ctx.module(n)
        if not isinstance(m, _CONVS) or m.padding_mode != "zeros" or isinstance(m.padding, str) \
                or n.name not in ctx.bwd or not n.all_input_nodes:
            return
        t = ctx.bwd[n.name]
        kernel = ctx.kernel_bytes.get(t, 0)
        record = ctx.gm.meta.get("fxsketch.step")
        calls = [c for c in getattr(record, "kernel_calls", {}).get(("backward", n.name), ())
                 if c.op == "convolution_backward"]
        if not kernel or len(calls) != 1:
            return
        call = calls[0]
        batch = call.batch
        xmeta = n.all_input_nodes[0].meta["fxsketch.tensor"][0]
        size = torch.empty((), dtype=xmeta.dtype).element_size()
        x_bytes = math.prod(xmeta.shape) * size
        w_bytes = m.weight.numel() * m.weight.element_size()
        full = workspace_bytes([call])[call][0]
        for k in CHUNKS:
            b = -(-batch // k)
            if b >= batch:
                continue
            part = call.at_batch(b)
            one = workspace_bytes([part])[part][0]
            freed = min(kernel, full - one)  # what the step's workspace storage loses
            temporaries = x_bytes * b // batch + w_bytes  # one chunk's dX, dW
            if freed - temporaries < max(kernel // 8, 1 << 20):
                continue
            calls_more = -(-batch // b) - 1
            yield (Choice(n.name, ctx.cost.fraction(calls_more * CALL_SECONDS), 0.0,
                          adds=(Span(-freed, t, t), Span(temporaries, t, t))),
                   Candidate(self.name, (n.name,), dict(chunk=b),
                             f"backward in chunks of {b} of {batch} samples (workspace "
                             f"{full / 2**20:.0f} -> {one / 2**20:.0f} MiB)"))

    def label(self, cand: Candidate) -> str:
        return f"chunk {cand.params['chunk']}"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        n = rw.by_name[cand.nodes[0]]
        with rw.graph.inserting_before(n):
            new = rw.graph.call_function(ops.chunked_conv, (n.args[0], rw.graph.get_attr(n.target)),
                                         dict(chunk=cand.params["chunk"]))
        return rw.replace(n, new)
