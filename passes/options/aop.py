"""Mem-AOP-GD: a linear or conv layer whose dW uses K of its D outer products, the rest kept in a memory.

Not among the default methods: it trades memory for time, the opposite of the other kinds. The
layer still saves X, so nothing is dropped from the liveness model; the memory (R = D - K rows of
X-side and dY-side width per group, :mod:`fxsketch.ops.outer`) is a registered buffer, alive
through the whole step and between steps, and the choice adds it as such. Its cost is negative
where the GEMM it cuts (1 - K / D of the exact dW's) outweighs the passes it adds (the row norms,
gathering the K rows, folding the leftovers into the memory). So the solver takes it where a
byte budget leaves room for the memory and the estimate says it saves time; with no budget
(lowest peak) it is never worth its memory. ``settings.aop_k``, ``aop_policy`` and ``aop_decay``
choose K / D, the policy and the memory's decay (0: no memory, no buffer); ``aop_layers="all"``
makes every such layer's choice required (the solver plans the rest around them).

Noise, in units of the layer's SGD noise: sqrt(D / K - 1). When the D rows are independent
samples (a linear layer's batch rows), a uniform K-of-D subsample of their gradient has variance
sigma^2 (1/K - 1/D) beyond the batch's own sigma^2 / D, a ratio of D / K - 1; for conv rows
(positions, not independent) and for top-K it is a stated prior, not a measurement. It enters the
plan like every choice's noise: the objective's noise term and the ``max_grad_noise`` bound
(K / D = 1/2 is 1.0, the default bound; K / D = 1/4 is 1.73).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from ... import ops
from ...ops.aop import AopMemory, kept_rows, memory_rows
from ..cost import tensor_bytes
from ..patterns import LINEAR_FUNCS, LINEAR_MODULES
from ..solve import Choice, Span
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register
from .probe import _attr, conv_spec

__all__ = ["Aop", "aop_spec", "aop_geometry"]


def _linear_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(m, LINEAR_MODULES):
        return dict(op="linear", weight=f"{n.target}.weight",
                    bias=f"{n.target}.bias" if m.bias is not None else None)
    if n.op == "call_function" and n.target in LINEAR_FUNCS:
        bound = dict(zip(("input", "weight", "bias"), n.args)) | dict(n.kwargs)
        if not isinstance(bound.get("weight"), fx.Node):
            return None
        return dict(op="linear", weight=bound["weight"], bias=bound.get("bias"))
    return None


def aop_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """The layer arguments of a node that can become an AOP layer (linear or conv), or None."""
    spec = _linear_spec(gm, n)
    if spec is None and (conv := conv_spec(gm, n)) is not None:
        spec = dict(conv, op="conv")
    return spec


def _weight_meta(gm: fx.GraphModule, spec) -> tuple[tuple[int, ...], bool] | None:
    """(weight shape, requires grad) of the layer, or None if it cannot be told."""
    w = spec["weight"]
    if isinstance(w, str):
        p = gm.get_parameter(w)
        return tuple(p.shape), p.requires_grad
    metas = w.meta.get("fxsketch.tensor", ())
    return (metas[0].shape, metas[0].requires_grad) if metas else None


def aop_geometry(spec, x_shape, y_shape, weight_shape) -> dict[str, int]:
    """D (outer products per group), G (groups) and the widths of an X-side and a dY-side row."""
    if spec["op"] == "linear":
        return dict(d=math.prod(x_shape[:-1]), groups=1, a=weight_shape[1], b=weight_shape[0])
    g = spec["groups"]
    batched = len(y_shape) == len(weight_shape)
    n = y_shape[0] if batched else 1
    pixels = math.prod(y_shape[2:] if batched else y_shape[1:])
    return dict(d=n * pixels, groups=g, a=math.prod(weight_shape[1:]), b=weight_shape[0] // g)


def _overhead_bytes(geo, k: int, r: int, x_bytes: int, y_bytes: int, elem: int, taps: int) -> int:
    """Bytes the AOP backward moves beyond the exact one: the norm passes over X and dY, the K
    rows gathered (written and read), the argsort of D + R keys, and with a memory the D + R - K
    leftovers gathered and folded into a new memory that is copied back."""
    g, d, width = geo["groups"], geo["d"], geo["a"] + geo["b"]
    keys = g * (d + r)
    moved = x_bytes + y_bytes + 16 * keys * max(1, math.ceil(math.log2(max(keys, 2))))
    moved += 2 * g * k * width * elem + 16 * g * k * taps
    if r:
        moved += 3 * g * (d + r - k) * width * elem + 3 * g * r * width * 4
    return moved


@register
class Aop(OptionKind):
    name = "aop"
    default = False
    uses_rng = True

    def node_choices(self, ctx: ProposalContext, n: fx.Node):
        spec = aop_spec(ctx.gm, n)
        weight = _weight_meta(ctx.gm, spec) if spec is not None else None
        if weight is None or not weight[1] or not n.all_input_nodes:
            return
        xmeta = n.all_input_nodes[0].meta.get("fxsketch.tensor", ())
        ymeta = n.meta.get("fxsketch.tensor", ())
        if not xmeta or not ymeta or not xmeta[0].dtype.is_floating_point:
            return
        x, y, (w_shape, _) = xmeta[0], ymeta[0], weight
        if spec["op"] == "conv" and len(x.shape) < len(w_shape) - 1:
            return
        st = ctx.settings
        geo = aop_geometry(spec, x.shape, y.shape, w_shape)
        d, k = geo["d"], kept_rows(geo["d"], st.aop_k)
        r = memory_rows(d, st.aop_k) if st.aop_decay > 0 else 0
        mem_dtype = torch.promote_types(x.dtype, torch.float32)
        mem_bytes = r * geo["groups"] * (geo["a"] + geo["b"]) * torch.empty((), dtype=mem_dtype).element_size()
        taps = math.prod(w_shape[2:]) if spec["op"] == "conv" else 0
        elem = torch.empty((), dtype=x.dtype).element_size()
        exact_wgrad = ctx.cost.seconds[n.name]
        if ctx.cost.estimator != "measured":  # the roofline of an F.linear node counts bytes only
            exact_wgrad = max(exact_wgrad, 2.0 * geo["groups"] * d * geo["a"] * geo["b"] / ctx.cost.device.flops)
        extra = _overhead_bytes(geo, k, r, tensor_bytes(x), tensor_bytes(y), elem, taps) \
            / ctx.cost.device.bandwidth - (1 - k / d) * exact_wgrad
        adds = (Span(mem_bytes, 0, len(ctx.schedule.steps) - 1),) if mem_bytes else ()
        memory = f"memory {r} rows" if r else "no memory"
        detail = f"K/D = {k}/{d} ({st.aop_policy}, decay {st.aop_decay:g}, {memory})"
        yield (Choice(n.name, ctx.cost.fraction(extra), math.sqrt(d / k - 1), adds=adds,
                      required=st.aop_layers == "all"),
               Candidate(self.name, (n.name,), dict(spec, k=st.aop_k, kept=k, d=d, rows=r, groups=geo["groups"],
                                                    a=geo["a"], b=geo["b"], policy=st.aop_policy,
                                                    decay=st.aop_decay, mem_dtype=mem_dtype), detail))

    def label(self, cand: Candidate) -> str:
        return f"aop K/D={cand.params['kept']}/{cand.params['d']}"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        n, p = rw.by_name[cand.nodes[0]], cand.params
        w, b = _attr(rw, p["weight"], n), _attr(rw, p["bias"], n)
        memory = ()
        if p["rows"]:
            name = f"fxsketch_aop_{n.name}"
            rw.gm.add_submodule(name, AopMemory(p["groups"], p["rows"], p["a"], p["b"], dtype=p["mem_dtype"],
                                                device=_device(rw, p["weight"])))
            memory = (_attr(rw, f"{name}.a", n), _attr(rw, f"{name}.b", n))
        options = dict(k=p["k"], policy=p["policy"], decay=p["decay"])
        if rw.generator:
            options["generator"] = _attr(rw, rw.generator, n)
        with rw.graph.inserting_before(n):
            if p["op"] == "linear":
                new = rw.graph.call_function(ops.aop_linear, (n.args[0], w, b) + memory, options)
            else:
                args = (n.args[0], w, b, p["stride"], p["padding"], p["dilation"], p["groups"]) + memory
                new = rw.graph.call_function(ops.aop_conv, args, options)
        return rw.replace(n, new)


def _device(rw: RewriteContext, weight) -> torch.device:
    """Where the layer's weight lives (the memory goes beside it)."""
    if isinstance(weight, str):
        return rw.gm.get_parameter(weight).device
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return rw.gm.get_parameter(weight.target).device
    return next((t.device for t in rw.model.parameters()), torch.device("cpu"))
