"""Argument normalisation shared by the ops: one rule for "an int or a tuple per axis"; and one
rule for an op called on fx proxies (a GraphModule re-traced when it is unpickled); and one rule
for a tensor's memory order (channels_last activations packed and unpacked without a copy)."""
from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

__all__ = ["fake_or_meta", "per_axis", "traceable", "memory_order", "layout_order", "dense_in", "in_order", "from_order"]


def fake_or_meta(t: torch.Tensor) -> bool:
    """Whether ``t`` has no data to read: a fake tensor (fx tracing, planning) or a meta tensor."""
    return is_fake(t) or t.device.type == "meta"


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


def memory_order(t: torch.Tensor) -> list[int]:
    """t's dims from the outermost to the innermost in memory, where ``t.permute(order)`` is then a
    contiguous view ([0, 2, 3, 1] for a channels_last NCHW tensor); ``range(t.dim())`` where t is
    contiguous or not dense (a strided slice: read in logical order, as ``reshape`` copies it).

    >>> memory_order(torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    [0, 2, 3, 1]
    """
    return layout_order(t.shape, t.stride())


def layout_order(shape, stride) -> list[int]:
    """:func:`memory_order` of a tensor of ``shape`` and ``stride`` (a planned node's layout)."""
    order = list(range(len(shape)))
    if stride is None:
        return order
    dense = sorted(order, key=lambda d: (-stride[d], d))
    if not dense_in(shape, stride, dense):
        return order
    return dense if dense != order and any(shape[d] != 1 for d in order) else order


def dense_in(shape, stride, order) -> bool:
    """Whether a tensor of ``shape`` and ``stride`` is contiguous when its dims are read in
    ``order``: each stride the product of the sizes inside it (size-1 dims are free)."""
    expect = 1
    for d in reversed(list(order)):
        if shape[d] != 1 and stride[d] != expect:
            return False
        expect *= shape[d]
    return True


def in_order(t: torch.Tensor, order) -> torch.Tensor:
    """t's values permuted to ``order``, contiguous: a view where t is laid out in that order
    (what :func:`memory_order` gave for a tensor of the same layout), else a copy."""
    return t.permute(list(order)).contiguous()


def from_order(t: torch.Tensor, order) -> torch.Tensor:
    """Inverse of :func:`in_order`: the logical view of ``t`` (laid out in ``order``)."""
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return t.permute(inverse)
