"""Recompute: run a graph segment under non-reentrant checkpointing and replay it in backward."""
from __future__ import annotations

import itertools

import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Recompute"]


class Recompute(nn.Module):
    """Runs a graph segment under non-reentrant checkpointing: only its inputs are kept, the
    segment is replayed in backward. Holds no state of its own: the segment's submodules are the
    model's, stored unregistered so that ``state_dict`` keys do not change.

    BatchNorm running statistics are restored after a replay, so they are updated once per step
    as in eager mode; probes are redrawn identically (the RNG state is preserved).
    """

    keeps_inputs = True
    """The op protocol the step profiler reads: this module holds its inputs until backward
    (torch's checkpoint keeps them in its own frame, where saved-tensor hooks do not see them)."""

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
