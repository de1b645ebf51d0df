"""The live-bytes sweep: bytes alive at every step, given what lives from which step to which.

One function, used by the liveness model, the candidate builder and the solver, so that every
figure of a plan comes from the same arithmetic (a difference array, then a running sum).

>>> live_bytes(4, [(8, 0, 1), (4, 1, 3)])
[8, 12, 4, 4]
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["live_bytes"]


def live_bytes(n_steps: int, spans: Iterable[tuple[int, int, int]], base: Iterable[int] | None = None) -> list[int]:
    """Bytes alive at each of ``n_steps`` steps: ``base[t]`` (0 if None) plus every span
    ``(nbytes, first, last)`` alive at t (first <= t <= last, both inclusive)."""
    delta = [0] * (n_steps + 1)
    for nbytes, first, last in spans:
        delta[first] += nbytes
        delta[last + 1] -= nbytes
    out, run = [], 0
    base = list(base) if base is not None else [0] * n_steps
    for t in range(n_steps):
        run += delta[t]
        out.append(base[t] + run)
    return out
