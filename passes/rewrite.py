"""Apply the chosen options: emit a new GraphModule that trains like the model, in less memory.

Each candidate is emitted by its option kind (:mod:`fxsketch.passes.options`): single-node
replacements first (probe, lean), then the kinds that span nodes (recompute), so a replayed
segment carries the replaced ops inside it. Every node that now stands for a choice is marked
``node.meta["fxsketch.option"]`` (the kind's label, e.g. "probe r=16", shown in the report's
node table) and
``node.meta["fxsketch.choice"]`` (its position in ``chosen``).

The new module shares the model's submodules (so its parameters, and ``state_dict`` keys, are the
model's own); the model and the analysed graph are left untouched.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from ..ops.recompute import Recompute
from .inplace import inplace_ops
from .options import Candidate, RewriteContext, get

__all__ = ["Recompute", "rewrite"]


def _share_modules(new: fx.GraphModule, model: nn.Module) -> None:
    """Make ``new``'s module tree the model's own objects (same parameters, same state_dict keys)."""
    for name, child in model.named_children():
        setattr(new, name, child)
    for name, p in model.named_parameters(recurse=False):
        new.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):  # a non-persistent buffer stays out of state_dict
        new.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)


def rewrite(model: nn.Module, gm: fx.GraphModule, chosen: Sequence[Candidate],
            seed: int | None = None) -> fx.GraphModule:
    """Return a new GraphModule with ``chosen`` applied; ``model`` and ``gm`` are not modified.

    With a ``seed``, ops that draw random probes draw their seeds from a private generator
    (``gm.fxsketch_rng``) instead of torch's default RNG.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(model).__name__)
    _share_modules(new, model)
    rw = RewriteContext(model, new, {n.name: n for n in new.graph.nodes})
    if seed is not None and any(get(c.kind).uses_rng for c in chosen):
        new.fxsketch_rng = torch.Generator().manual_seed(seed)
        rw.generator = "fxsketch_rng"
    order = sorted(range(len(chosen)), key=lambda i: get(chosen[i].kind).spans_nodes)  # node kinds first
    for i in order:
        node = get(chosen[i].kind).rewrite(rw, chosen[i])
        node.meta["fxsketch.option"] = get(chosen[i].kind).label(chosen[i])
        node.meta["fxsketch.choice"] = i  # position in ``chosen``: the report maps decisions to nodes
    new.graph.lint()
    new.recompile()
    inplace_ops(new)  # after the cuts: a segment's inputs are never written into
    return new
