"""Every error fxsketch raises on purpose: one base class, each naming what was wrong, where, and the fix.

Each also subclasses the builtin a caller would catch for that mistake (``TypeError`` for a bad
argument, ``ValueError`` for a bad value), so existing ``except`` clauses keep working.

>>> issubclass(BudgetError, FxsketchError) and issubclass(BudgetError, ValueError)
True
"""
from __future__ import annotations

__all__ = ["FxsketchError", "TraceError", "InputError", "ConfigError", "BudgetError", "UnsupportedError"]


class FxsketchError(Exception):
    """Base class of fxsketch's own errors."""


class TraceError(FxsketchError, RuntimeError):
    """torch.fx could not trace the model (or the forward reads tensor values); the message names
    the module or node and the fix."""


class InputError(FxsketchError, TypeError, ValueError):
    """The example inputs (or the loss function) do not fit the model: wrong type, number or
    shapes, a loss that is no scalar or needs no gradient. Names the node where one failed."""


class ConfigError(FxsketchError, ValueError):
    """An option of :class:`fxsketch.Config` (or of ``optimize``/``plan``) is unknown or malformed."""


class BudgetError(FxsketchError, ValueError):
    """The budget cannot be met; ``lowest`` is the lowest reachable predicted peak (bytes)."""

    def __init__(self, message: str, lowest: int):
        super().__init__(message)
        self.lowest = lowest


class UnsupportedError(FxsketchError, RuntimeError):
    """An fxsketch op was asked for something it cannot do (e.g. double backward through a
    probed conv); the message names the op and how to plan without it."""
