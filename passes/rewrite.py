"""Apply the chosen options: emit a new GraphModule that trains like the model, in less memory.

- probe:     ``call_module conv`` (or ``F.convNd``) -> ``fxsketch.ops.probed_conv(x, weight, bias, ...)``
- lean:      ReLU / LeakyReLU / max-pool -> ``fxsketch.ops.lean_*``
- recompute: a node range -> one call of a :class:`Recompute` module that runs the range under
             ``torch.utils.checkpoint`` (non-reentrant) and replays it in backward.

The new module shares the model's submodules (so its parameters, and ``state_dict`` keys, are the
model's own); the model and the analysed graph are left untouched.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from .candidates import Candidate

__all__ = ["Recompute", "rewrite"]


class Recompute(nn.Module):
    """Runs a graph segment under non-reentrant checkpointing: only its inputs are kept, the
    segment is replayed in backward. Holds no state of its own: the segment's submodules are the
    model's, stored unregistered so that ``state_dict`` keys do not change.

    BatchNorm running statistics are restored after a replay, so they are updated once per step
    as in eager mode; probes are redrawn identically (the RNG state is preserved).
    """

    keeps_inputs = True  # read by passes.saved: the checkpoint holds the inputs until the replay

    def __init__(self, segment: fx.GraphModule):
        super().__init__()
        object.__setattr__(self, "segment", segment)  # unregistered on purpose (see docstring)

    def forward(self, *args):
        calls = itertools.count()

        def run(*a):
            if next(calls) == 0:
                return self.segment(*a)
            stats = [(b, b.clone()) for m in self.segment.modules()
                     if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers()]
            try:
                return self.segment(*a)
            finally:
                for b, saved in stats:
                    b.copy_(saved)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

    def extra_repr(self) -> str:
        names = [n.name for n in self.segment.graph.nodes if n.op not in ("placeholder", "output")]
        return f"{len(names)} nodes: {names[0]} .. {names[-1]}" if names else "empty"


def _share_modules(new: fx.GraphModule, model: nn.Module) -> None:
    """Make ``new``'s module tree the model's own objects (same parameters, same state_dict keys)."""
    for name, child in model.named_children():
        setattr(new, name, child)
    for name, p in model.named_parameters(recurse=False):
        new.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        new.register_buffer(name, b)


def _attr(graph: fx.Graph, target, like: fx.Node):
    if target is None:
        return None
    if isinstance(target, fx.Node):  # a node of the analysed graph: its copy in this one
        return next(n for n in graph.nodes if n.name == target.name)
    with graph.inserting_before(like), warnings.catch_warnings():
        # fx warns for attributes that are not parameters, buffers or modules; the probes'
        # private torch.Generator (gm.fxsketch_rng) is a plain attribute on purpose
        warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node")
        return graph.get_attr(target)


def _probe(graph: fx.Graph, n: fx.Node, p: dict, generator: str | None) -> fx.Node:
    w, b = _attr(graph, p["weight"], n), _attr(graph, p["bias"], n)
    extra = dict(generator=_attr(graph, generator, n)) if generator else {}
    with graph.inserting_before(n):
        new = graph.call_function(ops.probed_conv, (n.args[0], w, b), dict(
            stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
            rank=p["rank"], mode=p["mode"], probe=p["probe"], **extra))
    return new


def _lean(graph: fx.Graph, n: fx.Node, p: dict) -> fx.Node:
    x = n.args[0]
    with graph.inserting_before(n):
        if p["op"] == "relu":
            return graph.call_function(ops.lean_relu, (x,), dict(inplace=p["inplace"]))
        if p["op"] == "leaky_relu":
            return graph.call_function(ops.lean_leaky_relu, (x,), dict(
                negative_slope=p["negative_slope"], inplace=p["inplace"]))
        return graph.call_function(ops.lean_max_pool, (x,), dict(
            kernel_size=p["kernel_size"], stride=p["stride"], padding=p["padding"],
            dilation=p["dilation"], ceil_mode=p["ceil_mode"]))


def _recompute(gm: fx.GraphModule, model: nn.Module, names: Sequence[str], index: int) -> None:
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    seg = [by_name[name] for name in names]
    inside = set(seg)
    inputs = list(dict.fromkeys(a for n in seg for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in seg if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for n in seg:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
    segment = fx.GraphModule(model, sub, f"segment_{index}")
    name = f"fxsketch_recompute_{index}"
    gm.add_submodule(name, Recompute(segment))
    for a in inputs:
        if a.op == "get_attr":  # a weight fetched inside the range: fetch it before the call
            seg[0].prepend(a)
    with graph.inserting_before(seg[0]):
        call = graph.call_module(name, tuple(inputs))
        if len(outputs) == 1:
            outputs[0].replace_all_uses_with(call)
        else:
            for k, o in enumerate(outputs):
                o.replace_all_uses_with(graph.call_function(
                    __import__("operator").getitem, (call, k)))
    for n in reversed(seg):
        graph.erase_node(n)


def rewrite(model: nn.Module, gm: fx.GraphModule, chosen: Sequence[Candidate],
            seed: int | None = None) -> fx.GraphModule:
    """Return a new GraphModule with ``chosen`` applied; ``model`` and ``gm`` are not modified.

    With a ``seed``, the probed convs draw their seeds from a private generator
    (``gm.fxsketch_rng``) instead of torch's default RNG.
    """
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, type(model).__name__)
    _share_modules(new, model)
    generator = None
    if seed is not None and any(c.kind == "probe" for c in chosen):
        new.fxsketch_rng = torch.Generator().manual_seed(seed)
        generator = "fxsketch_rng"
    by_name = {n.name: n for n in graph.nodes}
    for cand in chosen:
        if cand.kind in ("probe", "lean"):
            n = by_name[cand.nodes[0]]
            rep = _probe(graph, n, cand.params, generator) if cand.kind == "probe" else _lean(graph, n, cand.params)
            rep.meta.update({k: v for k, v in n.meta.items() if k.startswith("fxsketch.scope")})
            n.replace_all_uses_with(rep)
            graph.erase_node(n)
    for i, cand in enumerate(c for c in chosen if c.kind == "recompute"):
        _recompute(new, model, cand.nodes, i)
    graph.lint()
    new.recompile()
    return new
