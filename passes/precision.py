"""Mixed precision: the step fxsketch plans, calibrates, times and measures runs its forward (and
loss) under ``torch.autocast`` when a low dtype is set, as the user's training step does.

>>> with use_autocast(torch.bfloat16):
...     current() is torch.bfloat16
True
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

__all__ = ["DTYPES", "use_autocast", "current", "forward_context", "check_dtype"]

DTYPES = (torch.bfloat16, torch.float16)
"""The low dtypes ``autocast=`` accepts."""

_dtype: contextvars.ContextVar = contextvars.ContextVar("fxsketch_autocast", default=None)


def check_dtype(dtype) -> None:
    from ..errors import ConfigError
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"autocast must be None, torch.bfloat16 or torch.float16, got {dtype!r}")


@contextlib.contextmanager
def use_autocast(dtype):
    """Within the block, every forward fxsketch runs is under ``torch.autocast(dtype)`` (None: fp32)."""
    check_dtype(dtype)
    token = _dtype.set(dtype)
    try:
        yield
    finally:
        _dtype.reset(token)


def current():
    return _dtype.get()


def forward_context(device_type: str):
    """``torch.autocast(device_type, dtype)`` for the dtype in effect, or a null context. Meta
    inputs plan as on the CPU."""
    dtype = _dtype.get()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu" if device_type == "meta" else device_type, dtype=dtype)
