"""Probe a convolution: keep a small random sketch of its input instead of the input.

The conv's backward then estimates dW from the sketch (unbiased; :func:`fxsketch.ops.probed_conv`).
It frees the input only if nothing else keeps it, which the solver sees through the OR over
savers. Every rank of ``settings.ratios`` is offered, each with its gradient noise relative to the
layer's SGD noise: calibrated (``settings.noise``, :mod:`fxsketch.calibrate`) or, where the conv
could not be calibrated, the stated prior (:class:`fxsketch.calibrate.PriorNoise`). The planner
admits only choices within ``max_grad_noise``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ... import ops
from ...calibrate import prior_noise
from ...ops.probed import sketch_workspace_nbytes, weight_grad_workspace_nbytes
from ...ops.probes import rank_for_ratio, sketch_nbytes
from ..cost import tensor_bytes
from ..patterns import ATEN_CONVOLUTION, CONV_FUNCS, CONV_MODULES
from ..solve import Choice, Span
from ..timing import op_extra_seconds, own_rng
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register

__all__ = ["Probe", "conv_spec", "conv_ranks", "probe_targets", "saved_conv_input"]


def conv_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """The conv arguments of a node that can become a probed conv, or None. The weight is a
    parameter's name (a conv module) or the node that reads it (a conv function: in an exported
    graph a get_attr node)."""
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(m, CONV_MODULES) and m.padding_mode == "zeros":
        return dict(weight=f"{n.target}.weight", bias=f"{n.target}.bias" if m.bias is not None else None,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    if n.op != "call_function":
        return None
    if n.target in CONV_FUNCS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    elif n.target in ATEN_CONVOLUTION:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
    else:
        return None
    bound = dict(zip(names, n.args)) | dict(n.kwargs)
    if not isinstance(bound.get("weight"), fx.Node) or bound.get("transposed"):
        return None
    if isinstance(n.target, torch._ops.OpOverload):  # aten: lists, a one-entry list for every dim
        dims = CONV_FUNCS.get(n.target) or _spatial_dims(bound["weight"])
        geo = {k: _per_dim(bound.get(k, d), dims) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))}
    else:
        geo = dict(stride=bound.get("stride", 1), padding=bound.get("padding", 0), dilation=bound.get("dilation", 1))
    return dict(weight=bound["weight"], bias=bound.get("bias"), **geo, groups=bound.get("groups", 1))


def _spatial_dims(weight: fx.Node) -> int | None:
    val = weight.meta.get("val")
    metas = weight.meta.get("fxsketch.tensor", ())
    shape = val.shape if val is not None else metas[0].shape if metas else None
    return len(shape) - 2 if shape is not None else None


def _per_dim(v, dims: int | None):
    """An aten int list (or int) as a tuple with one entry per spatial dim ([1] is 1 for each)."""
    if not isinstance(v, (list, tuple)):
        return (v,) * dims if dims else v
    if len(v) == 1 and dims:
        return tuple(v) * dims
    return tuple(v)


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


def _weight_shape(ctx: ProposalContext, n: fx.Node):
    return ctx.module(n).weight.shape if n.op == "call_module" else n.args[1].meta["fxsketch.tensor"][0].shape


def saved_conv_input(ctx: ProposalContext, n: fx.Node, spec_of=conv_spec):
    """(conv spec, input storage, input meta) of a conv node (``spec_of(gm, n)`` not None) whose
    own backward saves its batched floating-point input, or None: what a probe or a quantized
    input can replace."""
    spec = spec_of(ctx.gm, n)
    x = ctx.input_storage(n) if spec is not None else None
    if x is None or x not in ctx.saved_index:
        return None
    xmeta = n.all_input_nodes[0].meta["fxsketch.tensor"][0]
    if not any(k == n.name for k, _ in ctx.saved[ctx.saved_index[x]].savers) \
            or len(xmeta.shape) < 3 or not xmeta.dtype.is_floating_point:
        return None
    return spec, x, xmeta


@register
class Probe(OptionKind):
    name = "probe"
    default = True
    uses_rng = True
    in_replays = True

    def node_choices(self, ctx: ProposalContext, n: fx.Node):
        found = saved_conv_input(ctx, n)
        if found is None:
            return
        spec, x, xmeta = found
        st, out = ctx.settings, n.meta["fxsketch.tensor"][0]
        x_bytes = ctx.schedule.storages[x].nbytes
        taps = math.prod(_weight_shape(ctx, n)[2:])  # the estimate scatters dY once per tap
        ranks = [st.probe_rank] if st.probe_rank else conv_ranks(xmeta.shape, st.ratios, st.mode)
        noise = (st.noise or {}).get(n.name) or prior_noise(xmeta.shape, st.mode)
        exact_wgrad = ctx.cost.seconds[n.name]
        f, b = ctx.fwd[n.name], ctx.bwd[n.name]
        measured = _measured_extra(ctx, n, spec, xmeta, ranks, st) if ctx.cost.estimator == "measured" else None
        for r in ranks:
            nb = sketch_nbytes(xmeta.shape, r, st.mode, xmeta.dtype)
            ratio = nb / max(x_bytes, 1)
            extra = measured[r] if measured else (2 * x_bytes + 2 * taps * tensor_bytes(out)) \
                / ctx.cost.device.bandwidth + ratio * exact_wgrad - exact_wgrad
            level = noise.ratio(r)
            detail = (f"{st.mode}, r={r} ({ratio:.3g} of X, {st.probe}), noise {level:.2f}x SGD"
                      + ("" if noise.calibrated else " (prior)"))
            # the op's temporaries: hashing and products in forward, the dW estimate in backward
            work = (Span(sketch_workspace_nbytes(xmeta.shape, r, st.mode), f, f),
                    Span(weight_grad_workspace_nbytes(xmeta.shape, out.shape, _weight_shape(ctx, n), r, st.mode), b, b))
            yield (Choice(n.name, ctx.cost.fraction(max(extra, 0.02 * exact_wgrad)), level,
                          drops=((ctx.saved_index[x], n.name),), adds=(Span(nb, f, b),) + work),
                   Candidate(self.name, (n.name,),
                             dict(spec, rank=r, mode=st.mode, probe=st.probe, ratio=ratio), detail))

    def label(self, cand: Candidate) -> str:
        return f"probe r={cand.params['rank']}"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        n, p = rw.by_name[cand.nodes[0]], cand.params
        w, b = _attr(rw, p["weight"], n), _attr(rw, p["bias"], n)
        extra = dict(generator=_attr(rw, rw.generator, n)) if rw.generator else {}
        with rw.graph.inserting_before(n):
            new = rw.graph.call_function(ops.probed_conv, (n.args[0], w, b), dict(
                stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
                rank=p["rank"], mode=p["mode"], probe=p["probe"], **extra))
        return rw.replace(n, new)


PROBE_ELEMENTS = 1 << 20
"""Largest conv input (elements) a probed conv is timed at (fewer samples beyond it)."""


def timing_conv(ctx: ProposalContext, n: fx.Node, spec, xmeta):
    """(device, a random weight of the conv's shape needing a gradient, its geometry as keywords,
    ``F.convNd``): the plain conv that a replacement op is timed against."""
    w_shape = _weight_shape(ctx, n)
    device = next((p.device for p in ctx.gm.parameters()), torch.device("cpu"))
    device = torch.device("cpu") if device.type == "meta" else device
    with own_rng(device):
        w = torch.randn(w_shape, dtype=xmeta.dtype, device=device, requires_grad=True)
    geo = dict(stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"], groups=spec["groups"])
    return device, w, geo, (F.conv1d, F.conv2d, F.conv3d)[len(w_shape) - 3]


def _measured_extra(ctx: ProposalContext, n: fx.Node, spec, xmeta, ranks, st) -> dict[int, float]:
    """Extra seconds of the probed conv over the conv, forward + backward (dX and dW), timed on
    this machine (fxsketch.passes.timing, cached) at the smallest and largest rank, linear in r
    between them (the sketch and the dW scatter grow with r)."""
    device, w, geo, conv = timing_conv(ctx, n, spec, xmeta)
    w_shape = w.shape
    key = f"probe:{st.mode},{st.probe},w={list(w_shape)}," + ",".join(f"{k}={v}" for k, v in geo.items())
    lo, hi = min(ranks), max(ranks)
    variants = {f",r={r}": (lambda x, r=r: ops.probed_conv(x, w, None, **geo, rank=r, mode=st.mode, probe=st.probe))
                for r in sorted({lo, hi})}
    extra = op_extra_seconds(key, xmeta.shape, xmeta.dtype, device, lambda x: conv(x, w, None, **geo),
                             variants, repeat=2, wrt=(w,), elements=PROBE_ELEMENTS, stride=xmeta.stride)
    timed = {r: extra[f",r={r}"] for r in {lo, hi}}
    return {r: timed[lo] + (timed[hi] - timed[lo]) * (r - lo) / max(hi - lo, 1) for r in ranks}


def _attr(rw: RewriteContext, target, like: fx.Node):
    if target is None:
        return None
    if isinstance(target, fx.Node):  # a node of the analysed graph: its copy in this one
        return rw.by_name[target.name]
    with rw.graph.inserting_before(like), warnings.catch_warnings():
        # fx warns for attributes that are not parameters, buffers or modules; the probes'
        # private torch.Generator (gm.fxsketch_rng) is a plain attribute on purpose
        warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node")
        return rw.graph.get_attr(target)
