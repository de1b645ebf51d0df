"""Reserve buffers that fake kernels under-report, measured once per shape on the real kernel.

Some fused kernels return a buffer their own backward reads (oneDNN's RNN workspace, cuDNN's RNN
reserve); its size is the library's choice, and their fake (meta) kernels return it empty. The
step profiler runs on fake tensors, so it would miss the largest saved tensor of an LSTM (a 2-layer
LSTM was predicted 76 % under its measured peak). For those ops, the real kernel runs once on
uninitialised tensors of the same shapes (one op's inputs and outputs, not the step's) and the
fake output is given the size the real kernel returned. Cached per (op, shapes, dtypes, device).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

__all__ = ["RESERVE_OUTPUTS", "correct_reserve"]

RESERVE_OUTPUTS: dict[Any, int] = {}
"""op overload -> index of the output that is the reserve buffer"""
for _name, _index in (("mkldnn_rnn_layer", 3), ("_cudnn_rnn", 3), ("miopen_rnn", 3)):
    if hasattr(torch.ops.aten, _name):
        RESERVE_OUTPUTS[getattr(torch.ops.aten, _name).default] = _index

_SIZES: dict[tuple, int] = {}


def _key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, str(x.device))
    if isinstance(x, (list, tuple)):
        return tuple(_key(v) for v in x)
    return x


def _real_nbytes(func, args, kwargs, index: int) -> int:
    key = (str(func), _key(args), _key(tuple(sorted(kwargs.items()))))
    if key not in _SIZES:
        with _disable_current_modes(), torch.enable_grad():  # the kernel keeps no workspace without grad mode
            real = tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                            if isinstance(t, torch.Tensor) else t, (args, kwargs))
            out = func(*real[0], **real[1])
            _SIZES[key] = out[index].untyped_storage().nbytes()
    return _SIZES[key]


def correct_reserve(func, args, kwargs, out):
    """``out`` with its reserve buffer resized to the real kernel's, for ops in RESERVE_OUTPUTS
    whose fake kernel returned it empty; anything else unchanged."""
    index = RESERVE_OUTPUTS.get(func)
    if index is None or not isinstance(out, tuple) or out[index].numel() > 0:
        return out
    nbytes = _real_nbytes(func, args, kwargs or {}, index)
    if nbytes == 0:
        return out
    reserve = out[index].new_empty((nbytes,), dtype=torch.uint8)
    return out[:index] + (reserve.view(out[index].dtype) if out[index].dtype != torch.uint8
                          and nbytes % out[index].element_size() == 0 else reserve,) + out[index + 1:]
