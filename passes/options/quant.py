"""Quantize a saved input: norms (BatchNorm / GroupNorm / InstanceNorm / LayerNorm) and convolutions
save X in 8 or 4 bits.

The output is exact (a norm the rewrite makes in-place, :mod:`fxsketch.passes.inplace`: within
fp32 rounding); a norm's backward reads a stochastically rounded copy of X with the exact
statistics (:mod:`fxsketch.ops.quant`), a conv's computes dX and db exactly and dW from the
rounded copy (:mod:`fxsketch.ops.qconv`, unbiased). It frees X only if nothing else keeps it (a conv after a
norm-ReLU pair does not: the ReLU's output is the conv's input, not the norm's). Both widths are
offered in the node's group, each with its gradient noise in units of SGD noise
(:mod:`fxsketch.quant_noise` for norms; for convs the dW error against the layer's SGD noise,
:meth:`fxsketch.calibrate.ConvNoise.quant_ratio`): calibrated on the calibration batch where the
plan has one, else the stated prior (:class:`fxsketch.quant_noise.QuantPrior`). The planner admits only choices within ``max_grad_noise``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...ops import quant as q
from ...ops import qconv as qc
from ...ops.probed import conv_geometry
from ...quant_noise import QuantNoise, QuantPrior
from ..patterns import NORM_FUNCS, NORM_MODULES
from ..solve import Choice, Span
from ..timing import op_extra_seconds
from . import Candidate, OptionKind, ProposalContext, RewriteContext, register
from .probe import PROBE_ELEMENTS, _attr, _weight_shape, saved_conv_input, timing_conv

__all__ = ["Quant", "norm_spec", "norm_targets", "noise_params"]

_DEFAULTS = {"training": False, "momentum": 0.1, "eps": 1e-5, "use_input_stats": True}


def norm_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """The kind of norm a node is ("batch", "instance", "group", "layer") and its arguments by name
    (nodes or constants), or None. A module's arguments are read from it when it runs."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if not isinstance(m, NORM_MODULES) or len(n.args) != 1 or n.kwargs:
            return None
        kind = ("batch" if isinstance(m, nn.modules.batchnorm._BatchNorm) else "instance"
                if isinstance(m, nn.modules.instancenorm._InstanceNorm) else "group"
                if isinstance(m, nn.GroupNorm) else "layer")
        return dict(kind=kind, module=n.target, input=n.args[0])
    if n.op != "call_function" or n.target not in NORM_FUNCS:
        return None
    kind, names = NORM_FUNCS[n.target]
    bound = _DEFAULTS | dict(zip(names, n.args)) | dict(n.kwargs)
    bound.pop("cudnn_enabled", None), bound.pop("cudnn_enable", None)
    return dict(kind=kind, module=None, **bound)


def _norm_input(n: fx.Node):
    metas = n.all_input_nodes[0].meta.get("fxsketch.tensor", ()) if n.all_input_nodes else ()
    return metas[0] if metas else None


def _normalized_dims(ctx_gm, spec) -> int:
    if spec["kind"] != "layer":
        return 0
    shape = ctx_gm.get_submodule(spec["module"]).normalized_shape if spec["module"] else spec["normalized_shape"]
    return 1 if isinstance(shape, int) else len(shape)


def _group_elems(shape, groups) -> int:
    return math.prod(shape) // max(math.prod(groups), 1)


def _twin(spec, shape, dtype, device, gm):
    """(the plain norm, {bits label: its quantized form}) on random affine parameters, for timing."""
    kind, c = spec["kind"], shape[1] if len(shape) > 1 else shape[0]
    ns = None
    if kind == "layer":
        k = _normalized_dims(gm, spec)
        ns = list(shape[len(shape) - k:])
    wshape = ns if kind == "layer" else [c]
    w = torch.randn(wshape, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(wshape, dtype=dtype, device=device, requires_grad=True)
    groups = spec.get("num_groups") if spec["module"] is None else getattr(gm.get_submodule(spec["module"]), "num_groups", 1)
    plain = {"batch": lambda x: F.batch_norm(x, None, None, w, b, True),
             "instance": lambda x: F.instance_norm(x, None, None, w, b, True),
             "group": lambda x: F.group_norm(x, groups, w, b),
             "layer": lambda x: F.layer_norm(x, ns, w, b)}[kind]
    fn = {"batch": lambda x, k: q.quant_batch_norm(x, None, None, w, b, True, bits=k),
          "instance": lambda x, k: q.quant_instance_norm(x, None, None, w, b, True, bits=k),
          "group": lambda x, k: q.quant_group_norm(x, groups, w, b, bits=k),
          "layer": lambda x, k: q.quant_layer_norm(x, ns, w, b, bits=k)}[kind]
    return plain, {f",bits={k}": (lambda x, k=k: fn(x, k)) for k in q.QUANT_BITS}, (w, b)


TIMING_ELEMENTS = 1 << 20
"""Largest norm input (elements) a quantized norm is timed at (fewer samples beyond it)."""


def _extra_seconds(ctx: ProposalContext, n: fx.Node, spec, xmeta) -> dict[int, float]:
    """Extra seconds of the quantized norm over the norm, forward + backward, timed on this machine
    (fxsketch.passes.timing, cached) when the plan measures node times; else the bytes it moves
    (X read twice and its copy written, at the machine's copy rate)."""
    x_bytes = math.prod(xmeta.shape) * torch.empty((), dtype=xmeta.dtype).element_size()
    if ctx.cost.estimator != "measured":
        return dict.fromkeys(q.QUANT_BITS, 4 * x_bytes / ctx.cost.device.bandwidth)
    device = ctx.device
    plain, variants, wrt = _twin(spec, xmeta.shape, xmeta.dtype, device, ctx.gm)
    key = f"quant:{spec['kind']},k={_normalized_dims(ctx.gm, spec)},g={spec.get('num_groups')}"
    extra = op_extra_seconds(key, xmeta.shape, xmeta.dtype, device, plain, variants, repeat=2, wrt=wrt,
                             elements=TIMING_ELEMENTS, stride=xmeta.stride,
                             min_samples=2 if spec["kind"] == "batch" else 1)  # q.pack_order: batch 1 differs
    return {k: extra[f",bits={k}"] for k in q.QUANT_BITS}


def _batch_stats(gm, spec) -> bool:
    """Whether a BatchNorm or InstanceNorm normalizes by the input's own statistics (training, or
    no running ones), as :func:`fxsketch.ops.quant.quant_norm_module` reads the flags."""
    if spec["module"] is not None:
        m = gm.get_submodule(spec["module"])
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            return m.training or not m.track_running_stats
        return m.training or (m.running_mean is None and m.running_var is None)
    return bool(spec.get("use_input_stats", True) if spec["kind"] == "instance" else spec.get("training"))


def _backward_workspace(ctx, spec, shape, stride, bits, dtype) -> int:
    """What the quantized norm's backward allocates besides dX (:func:`fxsketch.ops.quant.backward_workspace_nbytes`),
    for the input as the op sees it: an InstanceNorm's as the (1, N*C, ...) BatchNorm view (laid
    out contiguous: the op makes it so)."""
    kind, k = spec["kind"], _normalized_dims(ctx.gm, spec)
    if kind == "instance":
        kind, shape, stride = "batch", (1, shape[0] * shape[1], *shape[2:]), None
    groups = q.quant_groups(shape, kind, k)
    order = q.pack_order(kind, shape, stride)
    stats = kind == "batch" and _batch_stats(ctx.gm, spec)
    return q.backward_workspace_nbytes(kind, shape, bits, groups, dtype, k, ctx.device, order, stats)


@register
class Quant(OptionKind):
    name = "quant"
    default = True
    uses_rng = True
    in_replays = True

    def node_choices(self, ctx: ProposalContext, n: fx.Node):
        spec = norm_spec(ctx.gm, n)
        if spec is None:
            if ctx.settings.quant_inputs == "all":
                yield from _conv_choices(self.name, ctx, n)
            return
        xmeta = _norm_input(n) if spec is not None else None
        x = ctx.input_storage(n) if xmeta is not None else None
        if x is None or x not in ctx.saved_index or not xmeta.dtype.is_floating_point or not xmeta.shape \
                or not any(k == n.name for k, _ in ctx.saved[ctx.saved_index[x]].savers):
            return
        shape = tuple(xmeta.shape)
        groups = q.quant_groups(shape, spec["kind"], _normalized_dims(ctx.gm, spec))
        x_bytes = ctx.schedule.storages[x].nbytes
        if q.quant_nbytes(shape, 8, groups) > x_bytes // 2:
            return  # scales and zero points would eat the gain (tiny groups)
        noise = (ctx.settings.noise or {}).get(n.name)
        noise = noise if isinstance(noise, QuantNoise) else QuantPrior(_group_elems(shape, groups))
        extra = _extra_seconds(ctx, n, spec, xmeta)
        f, b = ctx.fwd[n.name], ctx.bwd[n.name]
        order = q.pack_order(spec["kind"], shape, xmeta.stride)  # channels_last: packed as it lies
        for bits in q.QUANT_BITS:
            nb = q.quant_nbytes(shape, bits, groups)
            level = noise.ratio(bits)
            # forward: the packing's block buffers; backward: a chunk of the dequantized X (and of
            # dX) at a time
            transients = (Span(q.pack_workspace_nbytes([shape[d] for d in order], bits, [groups[d] for d in order],
                                                       ctx.device, xmeta.dtype), f, f),
                          Span(_backward_workspace(ctx, spec, shape, xmeta.stride, bits, xmeta.dtype), b, b))
            detail = (f"{bits}-bit X ({nb / max(x_bytes, 1):.3g} of X), noise {level:.2f}x SGD"
                      + ("" if noise.calibrated else " (prior)"))
            yield (Choice(n.name, ctx.cost.fraction(extra[bits]), level, drops=((ctx.saved_index[x], n.name),),
                          adds=(Span(nb, f, b),) + transients),
                   Candidate(self.name, (n.name,), dict(bits=bits, kind=spec["kind"]), detail))

    def label(self, cand: Candidate) -> str:
        return f"quant {cand.params['bits']}-bit"

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        n = rw.by_name[cand.nodes[0]]
        kw = dict(bits=cand.params["bits"])
        if rw.generator:
            kw["generator"] = _attr(rw, rw.generator, n)
        if cand.params["kind"] in ("conv", "conv_t"):
            p = cand.params
            w, b = _attr(rw, p["weight"], n), _attr(rw, p["bias"], n)
            op = ops.quant_conv_transpose if p["kind"] == "conv_t" else ops.quant_conv
            with rw.graph.inserting_before(n):
                new = rw.graph.call_function(op, (n.args[0], w, b), dict(_geo(p), **kw))
            return rw.replace(n, new)
        spec = norm_spec(rw.gm, n)
        with rw.graph.inserting_before(n):
            if spec["module"] is not None:
                args = (spec["input"], rw.graph.get_attr(spec["module"]))
                fn = ops.quant_norm_module
            elif spec["kind"] == "batch":
                fn, args = ops.quant_batch_norm, tuple(spec[k] for k in ("input", "running_mean", "running_var",
                                                                        "weight", "bias", "training", "momentum", "eps"))
            elif spec["kind"] == "instance":
                fn, args = ops.quant_instance_norm, tuple(spec.get(k) for k in (
                    "input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"))
            elif spec["kind"] == "group":
                fn, args = ops.quant_group_norm, tuple(spec.get(k) for k in ("input", "num_groups", "weight", "bias", "eps"))
            else:
                fn, args = ops.quant_layer_norm, tuple(spec.get(k) for k in ("input", "normalized_shape", "weight",
                                                                            "bias", "eps"))
            new = rw.graph.call_function(fn, args, kw)
        return rw.replace(n, new)


_CONV_T_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_T_FUNCS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def transposed_spec(gm: fx.GraphModule, n: fx.Node) -> dict[str, Any] | None:
    """The arguments of a transposed conv node (a ConvTransposeNd module with zero padding called
    without ``output_size``, or ``F.conv_transposeNd`` on a fetched weight), or None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if not isinstance(m, _CONV_T_MODULES) or m.padding_mode != "zeros" or len(n.args) != 1 or n.kwargs:
            return None
        return dict(weight=f"{n.target}.weight", bias=f"{n.target}.bias" if m.bias is not None else None,
                    stride=m.stride, padding=m.padding, output_padding=m.output_padding, groups=m.groups,
                    dilation=m.dilation, transposed=True)
    if n.op != "call_function" or n.target not in _CONV_T_FUNCS:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    bound = dict(zip(names, n.args)) | dict(n.kwargs)
    if not isinstance(bound.get("weight"), fx.Node):
        return None
    return dict(weight=bound["weight"], bias=bound.get("bias"), stride=bound.get("stride", 1),
                padding=bound.get("padding", 0), output_padding=bound.get("output_padding", 0),
                groups=bound.get("groups", 1), dilation=bound.get("dilation", 1), transposed=True)


def _geo(spec) -> dict[str, Any]:
    """The keywords of ``F.convNd`` (``F.conv_transposeNd`` for a transposed conv) from a spec."""
    keys = ("stride", "padding", "output_padding", "groups", "dilation") if spec.get("transposed") else \
        ("stride", "padding", "dilation", "groups")
    return {k: spec[k] for k in keys}


def _conv_choices(kind: str, ctx: ProposalContext, n: fx.Node):
    """8- and 4-bit choices of a conv (or transposed conv) that saves its input
    (:mod:`fxsketch.ops.qconv`): each drops the conv's hold on X and adds the codes from its
    forward to its backward, the packing's buffers at its forward and a chunk of the dequantized X
    (and of dX, and a dW) at its backward. A transposed conv's noise is the prior's (calibration
    sees plain convs only)."""
    found = saved_conv_input(ctx, n) or saved_conv_input(ctx, n, transposed_spec)
    if found is None:
        return
    spec, x, xmeta = found
    transposed = bool(spec.get("transposed"))
    shape, x_bytes = tuple(xmeta.shape), ctx.schedule.storages[x].nbytes
    if qc.conv_quant_nbytes(shape, 8) > x_bytes // 2:
        return  # scales and zero points would eat the gain (tiny spatial extent)
    noise = (ctx.settings.noise or {}).get(n.name)
    calibrated = getattr(noise, "quant_sq", None)
    prior = QuantPrior(math.prod(shape[2:]))
    extra = _conv_extra_seconds(ctx, n, spec, xmeta)
    f, b = ctx.fwd[n.name], ctx.bwd[n.name]
    w_shape = tuple(_weight_shape(ctx, n))
    device = ctx.device
    # a transposed conv's dX is one conv of all of dY, as a symmetric conv's
    symmetric = transposed or conv_geometry(w_shape, spec["stride"], spec["padding"], spec["dilation"],
                                            spec["groups"]).symmetric
    for bits in q.QUANT_BITS:
        nb = qc.conv_quant_nbytes(shape, bits)
        level = noise.quant_ratio(bits) if calibrated else prior.ratio(bits)
        transients = (Span(qc.forward_workspace_nbytes(shape, xmeta.stride, bits, xmeta.dtype, device), f, f),
                      Span(qc.backward_workspace_nbytes(shape, w_shape, bits, xmeta.dtype, device, symmetric), b, b))
        detail = (f"{bits}-bit conv input ({nb / max(x_bytes, 1):.3g} of X), dW noise {level:.2f}x SGD"
                  + ("" if calibrated else " (prior)"))
        yield (Choice(n.name, ctx.cost.fraction(extra[bits]), level, drops=((ctx.saved_index[x], n.name),),
                      adds=(Span(nb, f, b),) + transients),
               Candidate(kind, (n.name,), dict(spec, bits=bits, kind="conv_t" if transposed else "conv"), detail))


def _conv_extra_seconds(ctx: ProposalContext, n: fx.Node, spec, xmeta) -> dict[int, float]:
    """Extra seconds of the quantized-input conv over the conv, forward + backward, timed on this
    machine in the input's layout (cached) when the plan measures node times; else the bytes it
    moves (X read twice and its copy written, at the machine's copy rate)."""
    x_bytes = math.prod(xmeta.shape) * torch.empty((), dtype=xmeta.dtype).element_size()
    if ctx.cost.estimator != "measured":
        return dict.fromkeys(q.QUANT_BITS, 4 * x_bytes / ctx.cost.device.bandwidth)
    device, w, _, conv = timing_conv(ctx, n, spec, xmeta)
    w_shape, geo = w.shape, _geo(spec)
    op = ops.quant_conv
    if spec.get("transposed"):
        conv, op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(w_shape) - 3], ops.quant_conv_transpose
    key = f"quant:{'conv_t' if spec.get('transposed') else 'conv'},w={list(w_shape)}," \
        + ",".join(f"{k}={v}" for k, v in geo.items())
    variants = {f",bits={k}": (lambda x, k=k: op(x, w, None, **geo, bits=k)) for k in q.QUANT_BITS}
    extra = op_extra_seconds(key, xmeta.shape, xmeta.dtype, device, lambda x: conv(x, w, None, **geo),
                             variants, repeat=2, wrt=(w,), elements=PROBE_ELEMENTS, stride=xmeta.stride)
    return {k: extra[f",bits={k}"] for k in q.QUANT_BITS}


def norm_targets(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Node name -> spec of every norm node a quant choice could replace."""
    return {n.name: spec for n in gm.graph.nodes if n.op != "output" and (spec := norm_spec(gm, n)) is not None}


def noise_params(spec: dict[str, Any]):
    """The reader :func:`fxsketch.quant_noise.calibrate_norms` calls at the node: the keywords of
    :func:`fxsketch.quant_noise.norm_noise_terms` from the call's real arguments."""
    def read(gm, n, args, kwargs):
        x = args[0]
        if spec["module"] is not None:
            m = gm.get_submodule(spec["module"])
            w = m.weight if isinstance(m.weight, torch.Tensor) and m.weight.requires_grad else None
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                stats = m.training or m.running_mean is None
                return dict(kind="batch", weight=w, eps=m.eps, batch_stats=stats,
                            running_mean=m.running_mean, running_var=m.running_var)
            if isinstance(m, nn.modules.instancenorm._InstanceNorm):
                if x.dim() == m._get_no_batch_dim():
                    return None
                return dict(kind="instance", weight=w, eps=m.eps)
            if isinstance(m, nn.GroupNorm):
                return dict(kind="group", weight=w, eps=m.eps, num_groups=m.num_groups)
            k = len(m.normalized_shape)
            return dict(kind="layer", weight=w, eps=m.eps, normalized_dims=k) if k < x.dim() else None
        kind, names = NORM_FUNCS[n.target]
        bound = _DEFAULTS | dict(zip(names, args)) | dict(kwargs)
        out = dict(kind=kind, weight=bound.get("weight"), eps=bound["eps"])
        if kind == "batch":
            out.update(batch_stats=bool(bound["training"]), running_mean=bound.get("running_mean"),
                       running_var=bound.get("running_var"))
        elif kind == "group":
            out["num_groups"] = bound["num_groups"]
        elif kind == "layer":
            ns = bound["normalized_shape"]
            k = 1 if isinstance(ns, int) else len(ns)
            if k >= x.dim():
                return None
            out["normalized_dims"] = k
        elif not bound.get("use_input_stats", True):
            return None
        w = out["weight"]
        out["weight"] = w if isinstance(w, torch.Tensor) and w.requires_grad else None
        return out
    return read
