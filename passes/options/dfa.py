"""DFA and MEM-DFA as methods: cut the traced graph into local blocks and emit the DFA module.

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
import operator
from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedError
from ...ops.dfa import DFA, Block, dfa_cut, dfa_state, dfa_tap
from ..patterns import CONV_FUNCS, CONV_MODULES
from . import OptionKind, register

__all__ = ["DFAMethod", "PlainDFA", "WEIGHT_MODULES", "Emitted", "cut_blocks", "build"]

WEIGHT_MODULES = CONV_MODULES + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_WEIGHT_FUNCS = set(CONV_FUNCS) | {F.linear, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@register
class DFAMethod(OptionKind):
    """MEM-DFA: forward saves only its inputs; backward replays one block at a time."""

    name = "dfa"
    whole_graph = True
    memory = True  # MEM-DFA's replaying call (False: plain DFA, the model's graph with cuts)

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


@dataclass(frozen=True)
class Emitted:
    """What :func:`build` made: the module, the node that stands for the method in its graph
    (the DFA call; plain DFA: the tap on the output), the blocks and the feedback keys."""

    gm: fx.GraphModule
    node: str
    blocks: tuple[tuple[str, str], ...]      # (first node, last node) of each block
    keys: dict[str, tuple[int, ...]]         # crossing value -> feedback matrix per tensor of it
    seed: int


def build(model: nn.Module, gm: fx.GraphModule, *, seed: int, memory: bool) -> Emitted:
    """The DFA module of ``model`` over its own submodules and parameters (same ``state_dict``
    keys). MEM-DFA: a graph ``inputs -> fxsketch_dfa(*inputs, *attributes) -> output`` (the
    attributes fetched by the graph, so the module's own tensors are used and get gradients).
    Plain DFA: the model's graph with each crossing value read by later blocks through
    :func:`~fxsketch.ops.dfa.dfa_cut` and the output through :func:`~fxsketch.ops.dfa.dfa_tap`,
    so the liveness model sees every node's forward and backward as in backprop.

    ``gm`` is the traced and profiled graph (``node.meta["fxsketch.tensor"]`` says how many
    tensors each crossing value holds: one feedback matrix each, numbered in block order)."""
    work = fx.GraphModule(gm, _copy(gm.graph), type(model).__name__)
    work.graph.eliminate_dead_code()  # a block that reaches no output would get feedback for nothing
    _getitems_with_source(work.graph)
    out_node = next(n for n in work.graph.nodes if n.op == "output")
    _check_output(out_node.args[0], type(model).__name__)
    output = out_node.args[0].name
    blocks_nodes = cut_blocks(work)
    block_of = {n: i for i, b in enumerate(blocks_nodes) for n in b}
    writes = [n for b in blocks_nodes for n in b
              if n.name != output and any(block_of.get(u, -1) > block_of[n] for u in n.users)]
    counter = itertools.count()  # one matrix per tensor of a crossing value; the output gets e itself
    keys = {w.name: tuple(next(counter) for _ in w.meta.get("fxsketch.tensor", ())) for w in writes}
    spans = tuple((b[0].name, b[-1].name) for b in blocks_nodes)
    if memory:
        new, node = _emit_mem(model, work, blocks_nodes, keys, output, seed)
    else:
        new, node = _emit_plain(model, work, block_of, writes, keys, seed)
    return Emitted(new, node, spans, keys, seed)


def _finish(model: nn.Module, gm: fx.GraphModule, graph: fx.Graph, name: str) -> fx.GraphModule:
    from ..rewrite import _share_modules  # the same module sharing as every rewrite

    new = fx.GraphModule(gm, graph, name)
    _share_modules(new, model)
    new.graph.lint()
    new.recompile()
    return new


def _emit_plain(model, work: fx.GraphModule, block_of, writes, keys, seed: int):
    graph = work.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        state = graph.call_function(dfa_state, (seed, *placeholders))
    for w in writes:
        later = [u for u in w.users if block_of.get(u, -1) > block_of[w]]
        with graph.inserting_after(w):
            cut = graph.call_function(dfa_cut, (w, state, keys[w.name]))
        for u in later:
            u.replace_input_with(w, cut)
    out_node = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out_node):
        tap = graph.call_function(dfa_tap, (out_node.args[0], state))
    out_node.args = (tap,)
    return _finish(model, work, _copy(graph), type(model).__name__), tap.name


def _emit_mem(model, work: fx.GraphModule, blocks_nodes, keys, output: str, seed: int):
    attr_names = list(dict.fromkeys(
        [n.target for n in work.graph.nodes if n.op == "get_attr"]
        + [f"{n.target}.{p}" for b in blocks_nodes for n in b if n.op == "call_module"
           for p, _ in work.get_submodule(n.target).named_parameters()]))
    attrs = {name: i for i, name in enumerate(attr_names)}
    blocks = [_block(model, work, nodes, {n for b in blocks_nodes[i + 1:] for n in b}, attrs, i)
              for i, nodes in enumerate(blocks_nodes)]
    placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
    dfa = DFA(blocks, [p.name for p in placeholders], attr_names, output, keys, seed)
    graph = fx.Graph()
    env = {p: graph.node_copy(p) for p in placeholders}
    fetched = [graph.get_attr(name) for name in attr_names]
    call = graph.call_module("fxsketch_dfa", tuple(env[p] for p in placeholders) + tuple(fetched))
    graph.output(call)
    new = _finish(model, work, fx.Graph(), type(model).__name__)
    new.add_submodule("fxsketch_dfa", dfa)
    new.graph = graph  # set once the DFA module is there for the call to resolve
    new.graph.lint()
    new.recompile()
    return new, call.name


def _getitems_with_source(graph: fx.Graph) -> None:
    """Move each ``getitem`` of a value read only through ``getitem`` (a tuple such as
    ``chunk``'s) right after that value: the items, not the tuple, then cross into later blocks,
    so an item that no later block reads gets no feedback."""
    for n in list(graph.nodes):
        users = list(n.users)
        if n.op in ("placeholder", "get_attr", "output") or not users or not all(
                u.op == "call_function" and u.target is operator.getitem and len(u.all_input_nodes) == 1
                for u in users):
            continue
        for u in reversed(users):
            n.append(u)


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
