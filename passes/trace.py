"""Trace a model with torch.fx and check the example inputs against it.

Tracing never runs the model on real data and never mutates it: the returned
GraphModule shares the model's parameters and buffers. A model fx cannot trace is captured with
torch.export instead (:mod:`.export`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from .. import ops
from ..errors import InputError, TraceError
from .export import ExportFailed, capture

__all__ = ["TraceError", "InputError", "trace", "check_inputs"]


class _PathTracer(fx.Tracer):
    """A tracer that remembers which module it is inside, to name it when tracing fails."""

    def __init__(self, leaf_modules: Sequence[type] = ()):
        # fxsketch's own ops stay single call_function nodes when a user's model calls them
        # (their argument checks would otherwise run on fx proxies and fail); fx wraps them where
        # the traced forward's module has them as globals, i.e. imported at module level
        super().__init__(autowrap_functions=(ops.probed_conv, ops.lean_relu, ops.lean_leaky_relu,
                                             ops.lean_max_pool))
        self.leaf_types = tuple(leaf_modules)
        self.stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        # the module path the node was traced in: recomputation candidates are whole scopes
        node.meta["fxsketch.scope"] = target if kind == "call_module" else (self.stack[-1][0] if self.stack else "")
        if kind == "call_module":
            node.meta["fxsketch.opaque"] = _opaque(self.root.get_submodule(target), self.leaf_types)
        return node

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append((name, type(m).__name__))
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if not hasattr(e, "_fxsketch_where"):
                e._fxsketch_where = (name, type(m).__name__)  # innermost module wins
            raise
        self.stack.pop()
        return out


def _opaque(m: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    """Whether a module node runs several autograd ops as one node: a leaf the user named, an RNN
    (stepped op by op on CPU) or a torch.nn module with submodules that fx keeps whole
    (TransformerEncoderLayer, MultiheadAttention). No option applies inside it, and its backward
    frees its saved tensors as it runs, which the step's liveness model does not follow."""
    if type(m).__module__.startswith("fxsketch."):
        return False
    return isinstance(m, leaf_types) or isinstance(m, nn.RNNBase) or next(m.children(), None) is not None


def check_inputs(model: Any, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Validate ``model`` and ``example_inputs``; return the inputs as a tuple of tensors.

    The one rule of every public call (plan, optimize, measure): a tensor, or a non-empty tuple
    (or list) of tensors, passed positionally as ``model(*example_inputs)``."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"fxsketch needs a torch.nn.Module, got {type(model).__name__}: "
            "wrap a function in an nn.Module whose forward calls it"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise InputError(
            f"example_inputs must be a non-empty tuple of tensors (as in torch.export), "
            f"got {type(example_inputs).__name__}: pass e.g. (torch.randn(8, 3, 224, 224),)"
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"example_inputs[{i}] is a {type(t).__name__}, not a tensor: fxsketch traces "
                "tensor inputs only; bind other arguments with functools.partial or a wrapper module"
            )
    return example_inputs


def first_line(e: Exception) -> str:
    """fx's message without its boilerplate tail ("Original traceback: None", "Use tlparse ...")."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Original traceback", "Use tlparse", "For more information"))]
    return " ".join(keep[:3]) if keep else type(e).__name__


def _export_or_raise(model: nn.Module, inputs: tuple[torch.Tensor, ...], e: Exception,
                     leaf_modules: Sequence[type]) -> fx.GraphModule:
    """The model captured by torch.export where fx failed with ``e`` (see :mod:`.export`), or
    the :class:`TraceError` naming where fx failed, export's reason and a fix that can work."""
    name, kind = getattr(e, "_fxsketch_where", ("", type(model).__name__))
    where = f"module '{name}' ({kind})" if name else f"the top-level model ({kind})"
    why = f"torch.fx cannot trace {where}: {type(e).__name__}: {first_line(e).rstrip('.')}"
    try:  # export traces through every module: a leaf the user named is not kept whole there
        return capture(model, inputs, why + ("; leaf_modules do not apply to it" if leaf_modules else ""))
    except ExportFailed as failed:
        reason, values = failed.reason, failed.data_dependent
    if values:  # a leaf would not help: fxsketch profiles every node, leaves too, on fake tensors
        leaf = (f"keeping it whole with leaf_modules=({kind},)" if name else
                "moving it into a submodule kept whole with leaf_modules=")
        fix = (f"the forward branches on tensor values, and fxsketch plans on fake tensors, which have "
               f"no values: {leaf} would fail there too. Compute both sides and pick with "
               f"torch.where(pred, a, b), or move the value-dependent code out of the model.")
    elif name:
        fix = (f"make its forward traceable (no Python control flow on tensor values), or keep it "
               f"whole by passing leaf_modules=({kind},) so fxsketch treats it as one opaque node.")
    else:  # leaf_modules cannot help here: the whole model would be one opaque node
        fix = ("make the model's own forward traceable by torch.fx or torch.export (no Python control "
               "flow on tensor values, no data-dependent shapes), e.g. by moving the untraceable code "
               "into a submodule and passing that submodule's type in leaf_modules=(...).")
    raise TraceError(f"{why}; {reason}\nFix: {fix}") from e


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; where fx cannot, capture it with torch.export (non-strict;
    see :mod:`.export`: an aten-level graph, ``gm.meta["fxsketch.capture"]`` says why); raise
    :class:`TraceError` naming the module that fx cannot trace when export fails too.

    The GraphModule's placeholders must match ``example_inputs`` in number.

    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.randn(3, 4),))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'output']
    """
    inputs = check_inputs(model, example_inputs)
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        gm = _export_or_raise(model, inputs, e, leaf_modules)
    else:
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # args hold the default value, if any
    if not len(required) <= len(inputs) <= len(placeholders):
        names = ", ".join(n.target for n in placeholders)
        raise InputError(
            f"{type(model).__name__}.forward takes {len(required)}"
            f"{'' if len(required) == len(placeholders) else f'-{len(placeholders)}'} tensor "
            f"argument(s) ({names}) but {len(inputs)} example input(s) were given"
        )
    return gm
