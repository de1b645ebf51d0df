"""Capture a model torch.fx cannot trace with ``torch.export``, as a GraphModule the passes plan.

``passes.trace.trace`` calls :func:`capture` when symbolic tracing fails on the model. The
exported graph is aten-level (``torch.ops.aten.conv2d.default``, ``aten.relu_.default``, ...;
``passes.patterns`` lists the ones the options know) and reads every parameter and buffer
through a ``get_attr`` node, re-bound here to the model's own objects, so the planned module
shares them as a traced one does. Export fixes what it saw:

* shapes: dim 0 of every input stays dynamic where export can keep it so, every other dim is
  the example's; a guard node (:func:`check_input_shapes`) refuses other shapes with the fix
  (plan again), rather than letting a shape-specialised branch run on them;
* train/eval mode: dropout and batch norm run as in the mode the model was in when planned.

Never mutates the model; torch's RNG stream is left alone.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import InputError

__all__ = ["ExportFailed", "capture", "check_input_shapes", "data_dependent"]

_NOISY = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes",
          "torch._subclasses.fake_tensor", "torch._dynamo")


class ExportFailed(Exception):
    """torch.export gave no graph fxsketch can plan; ``reason`` says why in a line,
    ``data_dependent`` whether Python control flow on tensor values is the cause."""

    def __init__(self, reason: str, data_dependent: bool):
        super().__init__(reason)
        self.reason = reason
        self.data_dependent = data_dependent


def check_input_shapes(inputs: tuple, expected: tuple, model: str) -> None:
    """The exported graph's input guard: each input has the rank and sizes it was captured at.

    ``expected`` holds, per input, per dim, a size or ``(symbol, low, high)`` for a dynamic one
    (``high`` None: unbounded); dims sharing a symbol must be equal.

    >>> check_input_shapes((torch.zeros(3, 4),), ((("s0", 2, None), 4),), "Net")
    """
    if any(isinstance(x, fx.Proxy) for x in inputs):  # fx re-tracing the code (unpickling): one node
        proxy = inputs[0].tracer.create_proxy("call_function", check_input_shapes, (inputs, expected, model), {})
        proxy.node.meta["fxsketch.guard"] = True
        return proxy
    seen: dict[str, int] = {}
    for i, (x, dims) in enumerate(zip(inputs, expected)):
        ok = isinstance(x, torch.Tensor) and x.dim() == len(dims)
        for size, want in zip(x.shape if ok else (), dims):
            if isinstance(want, int):
                ok = ok and size == want
            else:
                sym, low, high = want
                ok = ok and size >= low and (high is None or size <= high) and seen.setdefault(sym, size) == size
        if not ok:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"{model} was captured with torch.export for input {i} of shape {_describe(dims)}, "
                f"got {shape}: export fixes the shapes it saw, so plan the model again for these "
                f"shapes (fxsketch.optimize(model, inputs_of_this_shape, ...))")


def _describe(dims) -> str:
    parts = [str(d) if isinstance(d, int) else
             f"{d[0]}>={d[1]}" + (f",<={d[2]}" if d[2] is not None else "") for d in dims]
    return "(" + ", ".join(parts) + ")"


def data_dependent(e: BaseException) -> bool:
    """Whether an export failure is Python control flow on tensor values (not on shapes)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (GuardOnDataDependentSymNode, DataDependentOutputException)) \
                or "data-dependent" in str(e).split("\n", 1)[0]:
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(e: BaseException) -> str:
    """Export's message in a line: its first line and the user's line it names (the rest is a
    page of debugging advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    at = next((i for i, ln in enumerate(lines) if ln.startswith("The following call raised this error")), None)
    if at is not None and at + 2 < len(lines) and lines[at + 1].startswith("File "):
        where = lines[at + 1].replace("File ", "", 1).replace('"', "")
        first += f" (at {where}: {lines[at + 2]})"
    return first


def _higher_order(graph: fx.Graph) -> fx.Node | None:
    """A node running a higher-order op (torch.cond, while_loop, ...): export captures those,
    but fxsketch's fake-tensor profiler cannot step through them."""
    return next((n for n in graph.nodes if n.op == "call_function"
                 and isinstance(n.target, torch._ops.HigherOrderOperator)), None)


@contextlib.contextmanager
def _quiet():
    """Export logs whole graphs and hints at WARNING when it fails; the TraceError says it in a line."""
    loggers = [logging.getLogger(name) for name in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_args(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs export traces with: meta tensors (shapes only) become fake tensors on the
    model's device, so nothing of the batch is allocated."""
    if not any(x.device.type == "meta" for x in inputs):
        return inputs
    from torch._subclasses.fake_tensor import FakeTensorMode
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return tuple(mode.from_tensor(x) if x.device.type != "meta" else
                     torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
                     .requires_grad_(x.requires_grad) for x in inputs)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    args = _export_args(model, inputs)
    auto = getattr(torch.export.Dim, "AUTO", None)  # torch >= 2.5
    with torch.random.fork_rng(devices=[]), _quiet():
        try:  # a dynamic batch first: the module then runs at other batch sizes too
            if auto is not None:
                batch = tuple({0: auto} if x.dim() else None for x in inputs)
                return torch.export.export(model, args, dynamic_shapes=batch, strict=False)
        except Exception as e:
            if data_dependent(e):
                raise ExportFailed(f"torch.export cannot capture it either: {_reason(e)}", True) from e
        try:
            return torch.export.export(model, args, strict=False)
        except Exception as e:
            raise ExportFailed(f"torch.export cannot capture it either: {_reason(e)}", data_dependent(e)) from e


def _expected_shapes(ep: torch.export.ExportedProgram, placeholders: Sequence[fx.Node]) -> tuple:
    ranges = ep.range_constraints
    out = []
    for p in placeholders:
        val = p.meta.get("val")
        dims = []
        for size in getattr(val, "shape", ()):
            if isinstance(size, int):
                dims.append(size)
                continue
            expr = size.node.expr
            vr = ranges.get(expr)
            low = _bound(vr.lower) if vr is not None else None
            dims.append((str(expr), low or 0, _bound(vr.upper) if vr is not None else None))
        out.append(tuple(dims))
    return tuple(out)


def _bound(v) -> int | None:
    """A range end as an int, None where it is infinite (sympy's oo, torch's int_oo)."""
    return int(v) if isinstance(v, int) or getattr(v, "is_Integer", False) else None


def _plain_outputs(graph: fx.Graph, out_spec) -> bool:
    """Turn the pytree codegen into fx's plain one where the outputs are tensors in tuples,
    lists and dicts (what a traced module returns); keep it otherwise."""
    def plain(spec) -> bool:
        return spec.is_leaf() or (spec.type in (tuple, list, dict) and all(plain(c) for c in spec.children_specs))
    if out_spec is None or not plain(out_spec):
        return False
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat = output.args[0]
    flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
    graph.set_codegen(fx.graph.CodeGen())
    output.args = (pytree.tree_unflatten(flat, out_spec),)
    return True


def _share_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make every parameter and buffer the graph reads the model's own object (by name), and
    tensors that are neither (export's lifted constants) non-persistent: the state_dict keys
    are the model's."""
    persistent = set(model.state_dict().keys())
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        path, _, attr = name.rpartition(".")
        try:
            owner = gm.get_submodule(path)
        except AttributeError:
            continue
        if getattr(owner, attr, None) is t:
            continue
        if isinstance(t, nn.Parameter):
            owner.register_parameter(attr, t)
        elif hasattr(owner, attr):
            owner.register_buffer(attr, t, persistent=name in persistent)
    own = {name for name, _ in named}
    for name, _ in list(gm.named_buffers(remove_duplicate=False)):
        if name not in own:
            path, _, attr = name.rpartition(".")
            gm.get_submodule(path)._non_persistent_buffers_set.add(attr)


def _scope(n: fx.Node) -> str:
    """The innermost module path export recorded for the node ("" for the model's own code)."""
    stack = n.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("", None))[0] if stack else ""
    return path.split("@")[0]


def capture(model: nn.Module, inputs: tuple[torch.Tensor, ...], why: str) -> fx.GraphModule:
    """Export ``model`` at ``inputs`` and return the graph as a plain GraphModule that shares the
    model's parameters and buffers; ``why``: torch.fx's failure, for the plan's note.

    Raises :class:`ExportFailed` with export's reason when export cannot capture it either.
    """
    training = {m: m.training for m in model.modules()}
    try:
        ep = _export(model, inputs)
    finally:
        for m, flag in training.items():  # export runs the forward: leave every flag as it was given
            m.training = flag
    try:
        exported = ep.module(check_guards=False)
    except TypeError:  # older torch
        exported = ep.module()
    graph = exported.graph
    hop = _higher_order(graph)
    if hop is not None:
        scope = f" in module '{_scope(hop)}'" if _scope(hop) else ""
        raise ExportFailed(f"torch.export captures it with {hop.target.name()} (node '{hop.name}'{scope}), "
                           f"which fxsketch cannot profile on fake tensors", True)
    for n in list(graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            graph.erase_node(n)
    out_spec = getattr(exported, "_out_spec", None)
    _plain_outputs(graph, out_spec)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    expected = _expected_shapes(ep, placeholders)
    if placeholders:
        with graph.inserting_after(placeholders[-1]):
            guard = graph.call_function(check_input_shapes, (tuple(placeholders), expected, type(model).__name__))
        guard.meta["fxsketch.guard"] = True  # recompute never replays it (options/recompute.py)
    for n in graph.nodes:
        n.meta["fxsketch.scope"] = _scope(n)
        if n.op == "call_module":
            n.meta["fxsketch.opaque"] = False
    graph._tracer_cls, graph._tracer_extras = None, {}  # export's tracer cannot re-trace a pickled module
    gm = fx.GraphModule(exported, graph, type(model).__name__)
    _share_state(gm, model)
    graph.lint()
    gm.recompile()
    dynamic = [f"input {i} dim 0" for i, dims in enumerate(expected) if dims and not isinstance(dims[0], int)]
    shapes = ", ".join(_describe(d) for d in expected)
    gm.meta["fxsketch.capture"] = (
        f"captured with torch.export (non-strict) because {why}; an aten-level graph for input shapes "
        f"{shapes}" + (f" ({', '.join(dynamic)} dynamic)" if dynamic else "")
        + ": the plan is for these shapes, plan again for others; dropout and batch norm keep the "
          "train/eval mode the model had")
    return gm
