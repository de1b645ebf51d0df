"""Ops written into an input that nothing else reads: adds and quantized norms.

fx traces ``out += identity`` (torchvision's residual join) as an out-of-place ``add``, and a
norm makes its output beside its input: the step then holds a conv's output, its norm's output
and the join's output at once where eager (``+=``) or an in-place norm holds fewer. In a plan
whose peak sits at a residual join (a replayed block's forward, most often) those activations
are the peak's margin. After the rewrite, each graph (the step's and every replayed or
batch-chunked segment's) gets

- ``a.add_(b)`` in place of ``a + b``, and
- ``inplace=True`` on a quantized BatchNorm / InstanceNorm (:func:`fxsketch.ops.quant_norm_module`:
  with batch statistics it normalizes its fp32 input in place; its backward reads the codes),

where the operand written into is made in that graph by an op that returns a fresh tensor and
does not keep its output for backward (a conv, a linear layer, a norm, fxsketch's probed /
quantized convs and norms, an out-of-place add) -- not a graph input, not a view, not a tensor
a segment's replay keeps -- and this node is its only reader; an add's sum must have that
operand's shape, dtype and strides (no broadcasting into it).

The in-place add is bit for bit the out-of-place one (IEEE addition is commutative: ``b`` may
take the place of ``a``), and autograd's add saves neither operand; the in-place norm equals
torch's output within fp32 rounding. The liveness analysis of the rewritten graph (which the
plan's figures are) sees the shared storages; the solver's model does not (it overestimates
those steps: a safe error).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["inplace_ops"]

_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
            nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
            nn.LayerNorm)
_ADDS = {operator.add, torch.add}
_NORMS = {ops.quant_norm_module, ops.quant_batch_norm, ops.quant_instance_norm}
_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
              F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm, ops.probed_conv, ops.quant_conv,
              ops.quant_conv_transpose, ops.quant_norm_module, ops.quant_batch_norm, ops.quant_group_norm,
              ops.quant_layer_norm, ops.quant_instance_norm, *_ADDS}


def _fresh(gm: fx.GraphModule, n) -> bool:
    """Whether node ``n`` makes a new tensor that its own backward does not read."""
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_method" and n.target == "add_":  # one this pass wrote: into a fresh tensor only it read
        return True
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _MODULES)
    if n.op != "call_function":
        return False
    return n.target in _FUNCTIONS and (n.target not in _ADDS or _plain_add(n))


def _plain_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs


def _meta(n):
    metas = n.meta.get("fxsketch.tensor", ()) if isinstance(n, fx.Node) else ()
    return metas[0] if len(metas) == 1 else None


def _into(gm: fx.GraphModule, n: fx.Node):
    """The operand of the add ``n`` its sum may be written into, or None."""
    out = _meta(n)
    if out is None:
        return None
    for a in n.args:
        m = _meta(a)
        if _fresh(gm, a) and len(a.users) == 1 and m is not None and tuple(m.shape) == tuple(out.shape) \
                and m.dtype == out.dtype and (m.stride is None or tuple(m.stride) == tuple(out.stride)):
            return a
    return None


def inplace_ops(gm: fx.GraphModule) -> int:
    """Rewrite, in place, the adds and quantized norms of ``gm`` and of its segments' graphs
    (module docstring); returns how many."""
    done = 0
    for graph_module in _graphs(gm):
        count = 0
        for n in list(graph_module.graph.nodes):
            if n.op == "call_function" and n.target in _NORMS and n.args and not n.kwargs.get("inplace"):
                x = n.args[0]
                if _fresh(graph_module, x) and len(x.users) == 1:
                    n.kwargs = {**n.kwargs, "inplace": True}
                    count += 1
            elif _plain_add(n):
                a = _into(graph_module, n)
                if a is not None:
                    b = n.args[1] if n.args[0] is a else n.args[0]
                    n.op, n.target, n.args = "call_method", "add_", (a, b)
                    count += 1
        if count:
            graph_module.recompile()
        done += count
    return done


def _graphs(gm: fx.GraphModule):
    """``gm`` and every segment GraphModule below it (a replay's, a chunked replay's, a
    micro-batch's: their ``segment``), nested ones included."""
    seen, todo = set(), [gm]
    while todo:
        g = todo.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        yield g
        for m in g.modules():
            seg = getattr(m, "segment", None)
            if isinstance(seg, fx.GraphModule):
                todo.append(seg)
