"""A convolution whose backward runs batch chunk by batch chunk.

The forward is the module's own convolution (the same bits as eager); it saves what the
convolution saves (its input and weight). The backward calls ``aten.convolution_backward`` on
``chunk`` samples at a time, writes each chunk's dX into one dX, and adds up dW and db over the
chunks. What that buys: the kernels' own workspace, which scales with the samples of one call
(oneDNN's reorders of X and dY into blocked layouts on CPU, cuDNN's workspace on CUDA:
``passes/workspace.py``), is held for one chunk at a time. dX is the same per sample (each
sample's dX reads only that sample); dW and db are sums in another order (equal to eager within
floating-point rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ._args import traceable

__all__ = ["chunked_conv"]

aten = torch.ops.aten
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ChunkedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, chunk):
        ctx.save_for_backward(x, weight)
        ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), int(groups), int(chunk), bias is not None)
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise UnsupportedError(
                "fxsketch.ops.chunked_conv does not support double backward (create_graph=True): plan "
                "without it, methods= without 'chunk'.")
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, chunk, has_bias = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        dx = torch.empty_like(x) if mask[0] else None
        dw = db = None
        zeros = [0] * (weight.dim() - 2)
        bias_sizes = [weight.shape[0]] if has_bias else None
        for a in range(0, x.shape[0], chunk):
            gx, gw, gb = aten.convolution_backward(dy[a:a + chunk], x[a:a + chunk], weight, bias_sizes, stride,
                                                   padding, dilation, False, zeros, groups, mask)
            if mask[0]:
                dx[a:a + chunk].copy_(gx)
            if mask[1]:
                dw = gw if dw is None else dw.add_(gw)
            if mask[2]:
                db = gb if db is None else db.add_(gb)
            del gx, gw, gb
        return dx, dw, db, None, None, None, None, None


@traceable
def chunked_conv(input: torch.Tensor, module: nn.Module, *, chunk: int) -> torch.Tensor:
    """``module(input)`` for a Conv1d/2d/3d module (zeros padding, padding given as numbers) whose
    backward runs ``chunk`` samples at a time.

    >>> conv = nn.Conv2d(3, 4, 3, padding=1)
    >>> x = torch.randn(5, 3, 8, 8)
    >>> torch.equal(chunked_conv(x, conv, chunk=2), conv(x))
    True
    """
    m = module
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TypeError(f"chunked_conv takes a Conv1d/2d/3d module with zeros padding given as numbers, got {m!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a number of samples >= 1, got {chunk!r}")
    if input.dim() != m.weight.dim():
        raise ValueError(f"chunked_conv needs a batched input ({m.weight.dim()} dims), got shape {tuple(input.shape)}")
    return _ChunkedConv.apply(input, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, chunk)
