"""The DFA branch of :func:`fxsketch.optimize`: ``methods=("dfa",)`` (MEM-DFA) or ``("dfa-plain",)``.

DFA replaces backpropagation over the whole graph, so there is nothing for the solver to choose:
the graph is cut into blocks and emitted as one DFA call (:mod:`fxsketch.passes.options.dfa`),
and the emitted module is verified on the same liveness model as every plan (one fake step,
profiled: the replay in MEM-DFA's backward is seen op by op). The report says what it reaches;
a budget it does not meet is a :class:`BudgetError` naming the peak it reaches.

    analysis -> build (cut, emit) -> verify (profile the emitted module) -> budget check -> report
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .config import Config, resolve_budget
from .errors import BudgetError, UnsupportedError
from .passes import options as registry
from .passes.options.dfa import build
from .report import Decision, Option
from .units import format_bytes

__all__ = ["selected", "optimize_dfa"]

try:
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY as _PRESERVED
except ImportError:  # pragma: no cover - older torch
    _PRESERVED = "_user_preserved_attributes"


def selected(config: Config) -> str | None:
    """The whole-graph method of ``config.methods`` ("dfa" or "dfa-plain"), or None."""
    return next((m for m in config.methods if registry.get(m).whole_graph), None)


def _seed(config: Config) -> int:
    if config.seed is not None:
        return config.seed
    with torch.random.fork_rng(devices=[]):  # drawn from torch's RNG, which is left where it was
        return int(torch.randint(0, 2**31 - 1, ()))


def _check_inputs(analysis) -> None:
    bad = [i for i, x in enumerate(analysis.inputs) if x.requires_grad]
    if bad:
        raise UnsupportedError(f"DFA trains parameters only and computes no input gradient, but "
                               f"example_inputs[{bad[0]}] requires grad: pass it detached, or plan "
                               f"without 'dfa' for exact gradients")


def optimize_dfa(model: nn.Module, analysis, config: Config) -> fx.GraphModule:
    """The DFA module of ``model`` (``analysis``: the pipeline's), with its verified memory plan."""
    from . import pipeline  # the pipeline's verify and report assembly (it imports nothing of this)

    method = selected(config)
    memory = registry.get(method).memory
    _check_inputs(analysis)
    seed = _seed(config)
    emitted = build(model, analysis.gm, seed=seed, memory=memory)
    gm = emitted.gm
    schedule, timeline = pipeline.verify(gm, analysis.inputs, analysis.loss_fn)
    budget = resolve_budget(config.budget, analysis.timeline.peak_bytes)
    name = "MEM-DFA" if memory else "DFA"
    if budget is not None and timeline.peak_bytes > budget:
        hint = ("methods=('dfa',) (MEM-DFA: the same gradients, one block's activations)" if not memory
                else "a smaller batch, or fewer/smaller layers per block (MEM-DFA holds one block's "
                     "activations, the crossing values, parameters and their gradients)")
        raise BudgetError(
            f"budget {format_bytes(budget)} cannot be met for {analysis.model_name} with methods "
            f"{tuple(config.methods)}: {name} reaches a predicted peak of {format_bytes(timeline.peak_bytes)} "
            f"(unmodified: {format_bytes(analysis.timeline.peak_bytes)}). To go lower: {hint}; or raise "
            f"the budget to at least {format_bytes(timeline.peak_bytes)}.", timeline.peak_bytes)
    node = next(n for n in gm.graph.nodes if n.name == emitted.node)
    node.meta["fxsketch.option"] = f"{name}, {len(emitted.blocks)} blocks"
    node.meta["fxsketch.choice"] = 0
    blocks = " | ".join(f"{a}..{b}" if a != b else a for a, b in emitted.blocks)
    n_fb = sum(len(k) for k in emitted.keys.values())
    decision = Decision(
        node=f"{emitted.blocks[0][0]}..{emitted.blocks[-1][1]}", option=Option(method),
        detail=f"{name}: {len(emitted.blocks)} blocks, {n_fb} feedback matrices (seed {seed})",
        freed_bytes=max(0, analysis.timeline.peak_bytes - timeline.peak_bytes), rewritten=node.name)
    notes = [f"{name}: each block's output gradient is B_l e (e = dL/d(output), B_l fixed random, "
             f"regenerated from the seed, never stored); the last block gets e: gradients are not "
             f"backprop's, so check accuracy (docs/training.md)",
             f"{name} blocks: {blocks}" if len(blocks) <= 400 else f"{name}: {len(emitted.blocks)} blocks",
             "extra step time not estimated for DFA (see docs/training.md for measured step times)"]
    if memory:
        notes.insert(1, "MEM-DFA: forward saves only the inputs and the RNG state; backward replays "
                        "one block at a time, so activation memory is one block's, not the depth's")
    gm.memory_plan = pipeline.make_plan(analysis, gm, schedule, timeline, decisions=(decision,),
                                        budget=budget, notes=notes, cost_estimator="none")
    gm.meta.setdefault(_PRESERVED, {})["memory_plan"] = gm.memory_plan
    return gm
