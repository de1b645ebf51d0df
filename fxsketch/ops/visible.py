"""Run fxsketch's own custom ops so that a dispatch-mode memory tracker sees their temporaries.

A ``torch.library`` custom op is one dispatcher call: a ``TorchDispatchMode`` sees its inputs and
outputs, not what its implementation allocates inside (the sketch's hashing buffers, the dW
estimate's chunks). fxsketch's two memory trackers — the planner's fake-step profiler and the CPU
measurement — both want those, so for ops of the ``fxsketch`` namespace they call the op's own
Python implementation (its fake implementation on fake tensors) with the tracker re-entered.
Other libraries' custom ops stay opaque, as native kernels are.
"""
from __future__ import annotations

from typing import Any, Callable

from torch._library import custom_ops
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

__all__ = ["call_visibly"]


def _implementation(func, args, kwargs) -> Callable | None:
    name = getattr(func, "_name", "")
    opdef = custom_ops.OPDEFS.get(name) if name.startswith("fxsketch::") else None
    if opdef is None:
        return None
    fake = any(isinstance(t, FakeTensor) for t in tree_leaves((args, kwargs)))
    return opdef._abstract_fn if fake else opdef._init_fn


def call_visibly(mode, func, args=(), kwargs=None) -> Any:
    """``func(*args, **kwargs)`` from inside ``mode.__torch_dispatch__``; for fxsketch's own ops,
    their implementation runs with ``mode`` active again, so ``mode`` sees each op inside."""
    kwargs = kwargs or {}
    impl = _implementation(func, args, kwargs)
    if impl is None:
        return func(*args, **kwargs)
    with mode:
        return impl(*args, **kwargs)
