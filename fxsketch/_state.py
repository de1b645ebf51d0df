"""Leave a model as it was: what a real forward+backward changes, saved before and restored after.

Measuring, calibrating and timing nodes all run the user's model for real; none of them may
leave a trace in it (BatchNorm running statistics, train/eval flags, parameter ``.grad``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["preserved"]


@contextlib.contextmanager
def preserved(model: nn.Module, *, grads: bool = False) -> Iterator[None]:
    """Restore ``model``'s buffers (same tensor objects, old values), train/eval flags and, with
    ``grads``, its parameters' ``.grad`` when the block exits, also on an exception.

    >>> bn = nn.BatchNorm1d(2)
    >>> with preserved(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.running_mean.tolist()
    [0.0, 0.0]
    """
    buffers = [(mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items()
               if buf is not None]
    modes = [(mod, mod.training) for mod in model.modules()]
    params = list(model.parameters()) if grads else []
    saved_grads = [p.grad for p in params]
    with torch.no_grad():
        values = [buf.clone() for _, _, buf in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for (mod, name, buf), value in zip(buffers, values):
                mod._buffers[name] = buf  # the forward may have rebound the attribute: keep identity
                buf.copy_(value)
        for mod, training in modes:
            mod.training = training
        for p, g in zip(params, saved_grads):
            p.grad = g
