"""Lean companions: a ReLU / LeakyReLU that saves a 1-bit mask, a max-pool that saves window offsets.

Exact gradients (:mod:`fxsketch.ops.lean`); what they free is the activation the original op
saved, which matters when nothing else keeps it (a probed conv after a lean ReLU).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ... import ops
from ..patterns import LEAKY_FUNCS, POOL_FUNCS, POOL_MODULES, RELU_FUNCS
from ..solve import Choice, Span
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register

__all__ = ["Lean", "lean_spec"]


def _flag(n: fx.Node, name: str, position: int) -> bool:
    return bool(n.kwargs.get(name, n.args[position] if len(n.args) > position else False))


def lean_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """What a lean op replacing this node needs, or None if it has no lean form."""
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(m, nn.ReLU):
        return dict(op="relu", inplace=m.inplace)
    if isinstance(m, nn.LeakyReLU):
        return dict(op="leaky_relu", negative_slope=m.negative_slope, inplace=m.inplace)
    if isinstance(m, POOL_MODULES) and not m.return_indices:
        return dict(op="max_pool", kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode)
    if n.op == "call_function" and n.target in RELU_FUNCS:
        return dict(op="relu", inplace=n.target in (torch.relu_, F.relu_) or _flag(n, "inplace", 1))
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return dict(op="relu", inplace=n.target == "relu_")
    if n.op == "call_function" and n.target in LEAKY_FUNCS:
        slope = n.kwargs.get("negative_slope", n.args[1] if len(n.args) > 1 else 0.01)
        return dict(op="leaky_relu", negative_slope=slope,
                    inplace=n.target is F.leaky_relu_ or _flag(n, "inplace", 2))
    if n.op == "call_function" and n.target in POOL_FUNCS:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        bound = dict(zip(names, n.args)) | dict(n.kwargs)
        if bound.get("return_indices"):
            return None
        return dict(op="max_pool", kernel_size=bound["kernel_size"], stride=bound.get("stride"),
                    padding=bound.get("padding", 0), dilation=bound.get("dilation", 1),
                    ceil_mode=bound.get("ceil_mode", False))
    return None


@register
class Lean(OptionKind):
    name = "lean"
    default = True

    def node_choices(self, ctx: ProposalContext, n: fx.Node):
        spec = lean_spec(ctx.gm, n)
        drops = tuple((ctx.saved_index[s], n.name) for s in ctx.own_saved(n)) if spec else ()
        if not drops:
            return
        elems = math.prod(n.meta["fxsketch.tensor"][0].shape)
        if spec["op"] == "max_pool":
            k = spec["kernel_size"]
            window = math.prod(k) if isinstance(k, tuple) else k ** (len(n.meta["fxsketch.tensor"][0].shape) - 2)
            nb = elems * (1 if window <= 256 else 2 if window <= 32768 else 4)
            detail = f"max-pool window offsets ({nb // max(elems, 1)} B each)"
            unpacked = ()
        else:
            nb = (elems + 7) // 8
            detail = f"{spec['op']} 1-bit mask"
            # its backward unpacks the mask to one bool per element beside dX (fxsketch.ops.lean)
            unpacked = (Span(elems, ctx.bwd[n.name], ctx.bwd[n.name]),)
        yield (Choice(n.name, ctx.cost.fraction(0.1 * ctx.cost.seconds[n.name]), 0.0, drops=drops,
                      adds=(Span(nb, ctx.fwd[n.name], ctx.bwd[n.name]),) + unpacked),
               Candidate(self.name, (n.name,), spec, detail))

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        n, p = rw.by_name[cand.nodes[0]], cand.params
        x = n.args[0]
        with rw.graph.inserting_before(n):
            if p["op"] == "relu":
                new = rw.graph.call_function(ops.lean_relu, (x,), dict(inplace=p["inplace"]))
            elif p["op"] == "leaky_relu":
                new = rw.graph.call_function(ops.lean_leaky_relu, (x,), dict(
                    negative_slope=p["negative_slope"], inplace=p["inplace"]))
            else:
                new = rw.graph.call_function(ops.lean_max_pool, (x,), dict(
                    kernel_size=p["kernel_size"], stride=p["stride"], padding=p["padding"],
                    dilation=p["dilation"], ceil_mode=p["ceil_mode"]))
        return rw.replace(n, new)
