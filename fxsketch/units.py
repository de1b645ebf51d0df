"""Byte quantities: parse what users type ("3.5GiB", "800MB") and print what they read."""
from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Parse a byte size such as ``"3.5GiB"``, ``"800MB"`` or ``"1024"``.

    >>> parse_bytes("1.5KiB")
    1536
    """
    m = _PATTERN.match(str(text))
    unit = (m.group(2) or "b").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a byte size: write a number with an optional unit, "
            f"one of {', '.join(u.upper() if u != 'b' else 'B' for u in _UNITS)} (e.g. '3.5GiB', '800MB')"
        )
    return int(round(float(m.group(1)) * _UNITS[unit]))


def format_bytes(n: float) -> str:
    """Human-readable binary units: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
