"""DFA and MEM-DFA as methods: cut the traced graph into local blocks and emit one DFA call.

Unlike the other kinds, DFA is no per-node choice for the solver: it replaces backpropagation
over the whole graph, so ``methods=("dfa",)`` (MEM-DFA) and ``methods=("dfa-plain",)`` (plain
DFA, the same gradients with backprop's memory) are planned by :mod:`fxsketch.dfa` without the
solver, on the same liveness model (the emitted module is profiled like any rewritten graph).
The two kinds are registered so that ``methods`` knows them; ``whole_graph`` tells
:class:`fxsketch.Config` they cannot be combined with other methods.

Blocks: the graph (dead code removed) in node order, a new block starting at every weight layer
(conv, transposed conv, linear: module or function) once the current block has one, so
whatever precedes the first weight layer joins the first block and whatever follows a weight
layer up to the next one (norms, activations, pools, residual adds) joins its block. A value
read by a later block is a *crossing* value: its producer's block gets ``B e`` as its gradient;
values read several blocks later (residual skips) simply stay alive as inputs of those blocks.
"""
from __future__ import annotations

import itertools

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedError
from ...ops.dfa import DFA, Block
from ..patterns import CONV_FUNCS, CONV_MODULES
from . import OptionKind, register

__all__ = ["DFAMethod", "PlainDFA", "WEIGHT_MODULES", "cut_blocks", "build"]

WEIGHT_MODULES = CONV_MODULES + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_WEIGHT_FUNCS = set(CONV_FUNCS) | {F.linear, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@register
class DFAMethod(OptionKind):
    """MEM-DFA: forward saves only its inputs; backward replays one block at a time."""

    name = "dfa"
    whole_graph = True
    memory = True

    def label(self, cand) -> str:
        return "MEM-DFA"


@register
class PlainDFA(DFAMethod):
    """Plain DFA: the same gradients as MEM-DFA, activations saved as backprop saves them."""

    name = "dfa-plain"
    memory = False

    def label(self, cand) -> str:
        return "DFA"


def is_weight_layer(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), WEIGHT_MODULES)
    if n.op == "call_function" and n.target in _WEIGHT_FUNCS:
        weight = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        return isinstance(weight, fx.Node) and weight.op == "get_attr"
    return False


def cut_blocks(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The compute nodes of ``gm`` in order, cut before every weight layer but the first."""
    blocks: list[list[fx.Node]] = [[]]
    has_weight = False
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if is_weight_layer(gm, n):
            if has_weight:
                blocks.append([])
            has_weight = True
        blocks[-1].append(n)
    return [b for b in blocks if b]


def _block(model: nn.Module, gm: fx.GraphModule, nodes: list[fx.Node], later: set[fx.Node],
           attrs: dict[str, int], index: int) -> Block:
    inside = set(nodes)
    reads = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                               if a not in inside and a.op != "get_attr"))
    fetched = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"))
    writes = [n for n in nodes if any(u not in inside and (u in later or u.op == "output") for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in reads + fetched}
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[w] for w in writes))
    block_gm = fx.GraphModule(model, sub, f"dfa_block_{index}")
    params = [attrs[a.target] for a in fetched if isinstance(_fetch(gm, a.target), nn.Parameter)]
    for n in nodes:
        if n.op == "call_module":
            params += [attrs[f"{n.target}.{p}"] for p, _ in gm.get_submodule(n.target).named_parameters()]
    return Block(block_gm, tuple(a.name for a in reads), tuple(attrs[a.target] for a in fetched),
                 tuple(w.name for w in writes), tuple(dict.fromkeys(params)), nodes[0].name, nodes[-1].name)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def build(model: nn.Module, gm: fx.GraphModule, *, seed: int, memory: bool) -> tuple[fx.GraphModule, DFA]:
    """A GraphModule ``inputs -> dfa(*inputs, *attributes) -> output`` over ``model``'s own
    submodules and parameters (same ``state_dict`` keys), and its :class:`DFA` module.

    ``gm`` is the traced and profiled graph (``node.meta["fxsketch.tensor"]`` says how many
    tensors each crossing value holds: one feedback matrix each)."""
    from ..rewrite import _share_modules  # the same module sharing as every rewrite

    graph = fx.Graph()
    work = fx.GraphModule(gm, _copy(gm.graph), type(model).__name__)
    work.graph.eliminate_dead_code()  # a block that reaches no output would get feedback for nothing
    out_node = next(n for n in work.graph.nodes if n.op == "output")
    _check_output(out_node.args[0], type(model).__name__)
    blocks_nodes = cut_blocks(work)
    attr_names = list(dict.fromkeys(
        [n.target for n in work.graph.nodes if n.op == "get_attr"]
        + [f"{n.target}.{p}" for b in blocks_nodes for n in b if n.op == "call_module"
           for p, _ in work.get_submodule(n.target).named_parameters()]))
    attrs = {name: i for i, name in enumerate(attr_names)}
    blocks, keys = [], {}
    for i, nodes in enumerate(blocks_nodes):
        later = {n for b in blocks_nodes[i + 1:] for n in b}
        blocks.append(_block(model, work, nodes, later, attrs, i))
    output = out_node.args[0].name
    by_name = {n.name: n for n in work.graph.nodes}
    counter = itertools.count()
    for b in blocks:
        for w in b.writes:
            if w != output:  # one matrix per tensor of a crossing value; the output gets e itself
                keys[w] = tuple(next(counter) for _ in by_name[w].meta.get("fxsketch.tensor", ()))
    placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
    dfa = DFA(blocks, [p.name for p in placeholders], attr_names, output, keys, seed, memory)

    new = fx.GraphModule(gm, graph, type(model).__name__)
    _share_modules(new, model)
    new.add_submodule("fxsketch_dfa", dfa)
    env = {p: graph.node_copy(p) for p in placeholders}
    fetched = [graph.get_attr(name) for name in attr_names]
    call = graph.call_module("fxsketch_dfa", tuple(env[p] for p in placeholders) + tuple(fetched))
    graph.output(call)
    new.graph = graph
    new.graph.lint()
    new.recompile()
    return new, dfa


def _check_output(ret, model: str) -> None:
    """DFA feeds e = dL/d(output) to every block: the model must return one floating tensor."""
    metas = ret.meta.get("fxsketch.tensor", ()) if isinstance(ret, fx.Node) else ()
    if isinstance(ret, fx.Node) and len(metas) == 1 and metas[0].dtype.is_floating_point \
            and ret.op not in ("placeholder", "get_attr"):
        return
    what = (f"a {type(ret).__name__}" if not isinstance(ret, fx.Node) else
            f"node {ret.name!r} holding {len(metas)} tensors" if len(metas) != 1 else
            f"node {ret.name!r} of dtype {metas[0].dtype}" if not metas[0].dtype.is_floating_point else
            f"its {ret.op} {ret.name!r} unchanged")
    raise UnsupportedError(f"DFA needs {model} to return one floating-point tensor computed from its "
                           f"parameters (the error e = dL/d(output) is what every block learns from), "
                           f"but it returns {what}. Fix: wrap the model so that forward returns one "
                           f"tensor (e.g. the logits), or plan without 'dfa'")


def _copy(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (same node names; node_copy keeps each node's meta)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        env[n] = new.node_copy(n, lambda a: env[a])
    return new
