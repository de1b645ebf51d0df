"""Recompute: run a graph segment under non-reentrant checkpointing and replay it in backward."""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .conv import generator_draw

__all__ = ["Recompute"]


class Recompute(nn.Module):
    """Runs a graph segment under non-reentrant checkpointing: only its inputs are kept, the
    segment is replayed in backward. Holds no state of its own: the segment's submodules are the
    model's, stored unregistered so that ``state_dict`` keys do not change.

    BatchNorm running statistics are restored after a replay (a nested replay's included), so
    they are updated once per step as in eager mode; probes are redrawn identically: torch's RNG state is preserved, and so is
    that of any ``torch.Generator`` among the inputs (the probes' private one, ``seed=``).

    Under ``torch.compile`` the segment is traced as torch's checkpoint region: AOTAutograd
    replays it in backward functionally (buffers are updated once, so nothing is restored, and
    torch's RNG ops replay their draws), and a generator's draws (``fxsketch::generator_draw``)
    are kept by a selective-checkpoint policy rather than drawn again.
    """

    keeps_inputs = True
    """The op protocol the step profiler reads: this module holds its inputs until backward
    (torch's checkpoint keeps them in its own frame, where saved-tensor hooks do not see them)."""

    def __init__(self, segment: fx.GraphModule):
        super().__init__()
        object.__setattr__(self, "segment", segment)  # unregistered on purpose (see docstring)

    def forward(self, *args):
        if torch.compiler.is_compiling():
            # traced: no Python-side replay bookkeeping (dynamo refuses side effects in a checkpoint)
            policy = dict(context_fn=_keep_generator_draws) if _generators(args) else {}
            return checkpoint(self.segment, *args, use_reentrant=False, preserve_rng_state=True, **policy)
        calls = itertools.count()
        generators = _generators(args)
        drawn_from = [g.get_state() for g in generators]

        def run(*a):
            if next(calls) == 0:
                return self.segment(*a)
            # a norm module called inside (a nested replay's too), or passed in (a quantized norm
            # takes its module)
            norms = [*_modules(self.segment), *(x for x in a if isinstance(x, nn.Module))]
            stats = [(b, b.clone()) for m in norms if isinstance(m, nn.modules.batchnorm._NormBase)
                     for b in m.buffers()]
            after = [g.get_state() for g in generators]
            for g, s in zip(generators, drawn_from):  # the replay draws what the forward drew
                g.set_state(s)
            try:
                return self.segment(*a)
            finally:
                for b, saved in stats:
                    b.copy_(saved)
                for g, s in zip(generators, after):
                    g.set_state(s)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

    def extra_repr(self) -> str:
        names = [n.name for n in self.segment.graph.nodes if n.op not in ("placeholder", "output")]
        return f"{len(names)} nodes: {names[0]} .. {names[-1]}" if names else "empty"


def _modules(segment: nn.Module):
    """The segment's modules and those of the segments of Recompute modules inside it (held
    unregistered, so ``modules()`` does not reach them)."""
    for m in segment.modules():
        yield m
        if isinstance(m, Recompute):
            yield from _modules(m.segment)


def _generators(args) -> list:
    # tensors first: dynamo cannot evaluate isinstance(tensor, torch.Generator) (a graph break)
    return [a for a in args if not isinstance(a, torch.Tensor) and isinstance(a, torch.Generator)]


def _keep_draws(ctx, op, *args, **kwargs):
    # a replay would draw the generator's next values: keep the forward's
    return CheckpointPolicy.MUST_SAVE if op is generator_draw._opoverload else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_generator_draws():
    return create_selective_checkpoint_contexts(_keep_draws)
