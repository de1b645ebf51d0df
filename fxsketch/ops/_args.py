"""Argument normalisation shared by the ops: one rule for "an int or a tuple per axis"."""
from __future__ import annotations

__all__ = ["per_axis"]


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
