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
from ..patterns import ATEN_POOL_DIMS, LEAKY_FUNCS, LEAKY_INPLACE, POOL_FUNCS, POOL_MODULES, RELU_FUNCS, RELU_INPLACE
from ..solve import Choice, Span
from ..timing import op_extra_seconds
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register
from .probe import _per_dim

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
        return dict(op="relu", inplace=n.target in RELU_INPLACE or _flag(n, "inplace", 1))
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return dict(op="relu", inplace=n.target == "relu_")
    if n.op == "call_function" and n.target in LEAKY_FUNCS:
        slope = n.kwargs.get("negative_slope", n.args[1] if len(n.args) > 1 else 0.01)
        return dict(op="leaky_relu", negative_slope=slope,
                    inplace=n.target in LEAKY_INPLACE or _flag(n, "inplace", 2))
    if n.op == "call_function" and n.target in POOL_FUNCS:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        bound = dict(zip(names, n.args)) | dict(n.kwargs)
        if bound.get("return_indices"):
            return None
        spec = dict(op="max_pool", kernel_size=bound["kernel_size"], stride=bound.get("stride"),
                    padding=bound.get("padding", 0), dilation=bound.get("dilation", 1),
                    ceil_mode=bound.get("ceil_mode", False))
        if n.target in ATEN_POOL_DIMS:  # aten: int lists, stride [] for the kernel's
            dims = ATEN_POOL_DIMS[n.target]
            spec.update({k: _per_dim(spec[k], dims) for k in ("kernel_size", "stride", "padding", "dilation")
                         if spec[k] is not None})
            spec["stride"] = spec["stride"] or None
        return spec
    return None


def _pair(spec: dict[str, Any]):
    """(the op a lean op replaces, the lean op), both out of place, for timing."""
    if spec["op"] == "relu":
        return torch.relu, ops.lean_relu
    if spec["op"] == "leaky_relu":
        slope = spec["negative_slope"]
        return (lambda x: F.leaky_relu(x, slope)), (lambda x: ops.lean_leaky_relu(x, slope))
    args = (spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"], spec["ceil_mode"])

    def pool(x):
        k = spec["kernel_size"]
        d = len(k) if isinstance(k, (tuple, list)) else x.dim() - 2
        return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1](x, *args)
    return pool, (lambda x: ops.lean_max_pool(x, *args))


def _extra_seconds(ctx: ProposalContext, n: fx.Node, spec: dict[str, Any]) -> float:
    """The lean op's extra time over the op it replaces: timed on this machine when the plan
    measures node times (fxsketch.passes.timing), else 10 % of the node's forward."""
    if ctx.cost.estimator != "measured":
        return 0.1 * ctx.cost.seconds[n.name]
    meta = n.all_input_nodes[0].meta["fxsketch.tensor"][0]
    name = "lean:" + ",".join(f"{k}={v}" for k, v in sorted(spec.items()) if k != "inplace")
    return op_extra_seconds(name, meta.shape, meta.dtype, ctx.device, *_pair(spec), stride=meta.stride)


@register
class Lean(OptionKind):
    name = "lean"
    default = True
    in_replays = True

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
            # the torch path packs and unpacks the mask chunk by chunk; the fused CPU loops
            # allocate nothing besides the results (fxsketch.ops.lean.relu_workspace)
            fwd, bwd = ops.lean.relu_workspace(elems, n.meta["fxsketch.tensor"][0].dtype, ctx.device)
            unpacked = tuple(Span(b, t, t) for b, t in ((bwd, ctx.bwd[n.name]), (fwd, ctx.fwd[n.name])) if b)
        yield (Choice(n.name, ctx.cost.fraction(_extra_seconds(ctx, n, spec)), 0.0, drops=drops,
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
