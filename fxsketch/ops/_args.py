"""Argument normalisation shared by the ops: one rule for "an int or a tuple per axis"; and one
rule for an op called on fx proxies (a GraphModule re-traced when it is unpickled)."""
from __future__ import annotations

import functools

import torch.fx as fx

__all__ = ["per_axis", "traceable"]


def traceable(fn):
    """``fn`` records itself as one call_function node when an argument is an fx Proxy (its
    argument checks would fail on proxies), and runs as it is otherwise. ``torch.fx`` re-traces a
    GraphModule's code when one is unpickled; fxsketch's ops inside it (a replayed segment's too)
    must come back as the nodes they were."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", op, args, kwargs)
        return fn(*args, **kwargs)
    return op


def per_axis(value, d: int, name: str, what: str = "") -> tuple[int, ...]:
    """``value`` as a tuple of ``d`` ints: an int (or a 1-tuple) is repeated on every axis.

    ``what`` ends the error message (" for a 2d conv"), so the caller's context is named.

    >>> per_axis(2, 3, "stride"), per_axis((1, 2), 2, "padding")
    ((2, 2, 2), (1, 2))
    """
    if isinstance(value, int):
        return (value,) * d
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * d
    if len(value) != d:
        raise ValueError(f"{name} must be an int or a tuple of {d} ints{what}, got {value}")
    return value
