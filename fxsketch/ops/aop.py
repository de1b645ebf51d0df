"""aop_linear / aop_conv: layers whose backward computes dW from K of its D outer products (Mem-AOP-GD).

Hernandez, Rini and Duman, "Speeding-Up Back-Propagation in DNN: Approximate Outer Product with
Memory" (2021). The output, dX and db are exact (torch's own); dW is built from K = ceil(k * D)
outer products chosen by a policy, and the ones left out are carried in a memory to later steps
(:mod:`fxsketch.ops.outer` has the math and what precisely the memory holds). The layer still
saves X (dW needs its rows): the gain is time, the dW GEMM cut to K / D of its rows; the cost
is the memory, R = D - K rows of (a, b) per group, a persistent state.

The memory is two tensors the caller owns: :class:`AopMemory` holds them as registered buffers
(so they are in ``state_dict`` and the planner counts them as resident bytes), and
:func:`reset_aop_memory` clears every memory in a module. dW and the memory update are one torch
custom op, ``fxsketch::aop_weight_grad``, whose fake implementation is its real one (plain tensor
ops, no values read): a plan sees exactly the temporaries the real op allocates. Its random
draws (sampling keys, folding signs) are made by the caller from torch's RNG or ``generator``.

Under ``torch.compile`` a layer is traced whole, forward and backward with its in-place memory
update; a generator's draws go through :func:`fxsketch.ops.conv.draw`, so a compiled module
draws what the eager one draws.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .conv import draw
from .outer import POLICIES, ConvRows, LinearRows, kept_rows, memory_rows, outer_weight_grad
from .probed import ConvGeometry, _input_and_bias_grad, conv_geometry
from ._args import traceable

__all__ = ["aop_linear", "aop_conv", "aop_weight_grad", "AopMemory", "reset_aop_memory", "POLICIES",
           "kept_rows", "memory_rows", "check_aop"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def check_aop(k: float, policy: str, decay: float) -> None:
    """Refuse a fraction outside (0, 1], an unknown policy or a decay outside [0, 1]."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"aop_k is the fraction of outer products kept and must lie in (0, 1], got {k!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown aop_policy {policy!r}: choose from {POLICIES}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ValueError(f"aop_decay scales the memory each step and must lie in [0, 1], got {decay!r}")


def _weight_grad_impl(x: torch.Tensor, dy: torch.Tensor, mem_a: Optional[torch.Tensor],
                      mem_b: Optional[torch.Tensor], u: Optional[torch.Tensor], signs: Optional[torch.Tensor],
                      k: int, policy: str, decay: float, weight_shape: Sequence[int], conv: bool,
                      stride: Sequence[int], dilation: Sequence[int], pad_left: Sequence[int],
                      pad_right: Sequence[int], groups: int, dtype: torch.dtype) -> torch.Tensor:
    """dW from K = ``k`` outer products of (x, dy) and the memory (updated in place; see
    :func:`fxsketch.ops.outer.outer_weight_grad`); ``conv`` selects the rows' kind."""
    if conv:
        geo = ConvGeometry(tuple(stride), tuple(dilation), tuple(pad_left), tuple(pad_right), groups)
        src = ConvRows(x, dy, tuple(weight_shape), geo)
    else:
        src = LinearRows(x, dy)
    return outer_weight_grad(src, k, policy, decay, mem_a, mem_b, u, signs, tuple(weight_shape), dtype)


aop_weight_grad = torch.library.custom_op("fxsketch::aop_weight_grad", _weight_grad_impl,
                                          mutates_args=("mem_a", "mem_b"))
aop_weight_grad.register_fake(_weight_grad_impl)


def _draws(groups: int, d: int, k: int, policy: str, mem_a, generator, dy):
    """The policy's uniform draws and the folding signs, from ``generator`` (a CPU generator:
    drawn there and moved) or torch's RNG on dy's device."""
    r = mem_a.shape[1] if mem_a is not None else 0
    device = dy.device

    def move(t):
        return t.to(device) if t.device != device else t
    u = None
    if policy == "weighted" and r == 0 and k < d:
        u = move(draw(generator, "uniform", (groups, k), dy, device))
    elif policy != "topk":
        u = move(draw(generator, "uniform", (groups, d + r), dy, device))
    signs = move(draw(generator, "bit", (groups, d + r - k), dy, device)) if r else None
    return u, signs


def _memory(mem_a, mem_b, decay):
    """The memory tensors in use: none when absent, empty or switched off (decay 0)."""
    if mem_a is None or mem_b is None or mem_a.shape[1] == 0 or decay == 0:
        return None, None
    return mem_a, mem_b


def _no_double_backward(op: str) -> None:
    if torch.is_grad_enabled():  # create_graph=True: the approximate dW is not differentiable
        raise UnsupportedError(
            f"fxsketch.ops.{op} does not support double backward (create_graph=True, e.g. a gradient "
            f"penalty): its weight gradient is approximate. Plan without it: leave 'aop' out of methods.")


class _AopLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mem_a, mem_b, k, policy, decay, generator):
        ctx.save_for_backward(x, weight)
        ctx.memory = _memory(mem_a, mem_b, decay)
        ctx.k, ctx.policy, ctx.decay, ctx.generator = k, policy, decay, generator
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        _no_double_backward("aop_linear")
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dy.matmul(weight) if need_dx else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if need_db and ctx.has_bias else None
        dw = None
        if need_dw:
            d = x.numel() // x.shape[-1]
            k = kept_rows(d, ctx.k)
            mem_a, mem_b = ctx.memory
            u, signs = _draws(1, d, k, ctx.policy, mem_a, ctx.generator, dy)
            dw = aop_weight_grad(x, dy, mem_a, mem_b, u, signs, k, ctx.policy, float(ctx.decay),
                                 tuple(weight.shape), False, (), (), (), (), 1, weight.dtype)
        return dx, dw, db, None, None, None, None, None, None


class _AopConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, mem_a, mem_b, k, policy, decay,
                generator):
        ctx.geo = conv_geometry(tuple(weight.shape), stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.memory = _memory(mem_a, mem_b, decay)
        ctx.k, ctx.policy, ctx.decay, ctx.generator = k, policy, decay, generator
        ctx.has_bias = bias is not None
        return _CONV_FN[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        _no_double_backward("aop_conv")
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = db = dw = None
        if need_dx or (need_db and ctx.has_bias):
            dx, db = _input_and_bias_grad(dy, tuple(x.shape), weight, ctx.has_bias, need_dx,
                                          need_db and ctx.has_bias, geo)
        if need_dw:
            d = x.shape[0] * math.prod(dy.shape[2:])
            k = kept_rows(d, ctx.k)
            mem_a, mem_b = ctx.memory
            u, signs = _draws(geo.groups, d, k, ctx.policy, mem_a, ctx.generator, dy)
            dw = aop_weight_grad(x, dy, mem_a, mem_b, u, signs, k, ctx.policy, float(ctx.decay),
                                 tuple(weight.shape), True, geo.stride, geo.dilation, geo.pad_left,
                                 geo.pad_right, geo.groups, weight.dtype)
        return dx, dw, db if need_db else None, *([None] * 10)


@traceable
def aop_linear(input, weight, bias=None, memory_a=None, memory_b=None, *, k: float = 0.5,
               policy: str = "topk", decay: float = 1.0, generator: torch.Generator | None = None):
    """``F.linear(input, weight, bias)`` whose dW uses K = ceil(k * D) of its D outer products
    (D: rows of ``input``, leading dims flattened). With ``memory_a`` (1, R, in_features) and
    ``memory_b`` (1, R, out_features), e.g. an :class:`AopMemory`'s buffers, the rows left out
    are carried to the next steps (updated in place at each backward); without them, or with
    ``decay=0``, there is no memory (plain AOP). Random draws come from torch's RNG or ``generator``.

    >>> x, w = torch.randn(8, 4), torch.randn(3, 4, requires_grad=True)
    >>> aop_linear(x, w, k=0.5).shape
    torch.Size([8, 3])
    """
    check_aop(k, policy, decay)
    return _AopLinear.apply(input, weight, bias, memory_a, memory_b, k, policy, decay, generator)


@traceable
def aop_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, memory_a=None,
             memory_b=None, *, k: float = 0.5, policy: str = "topk", decay: float = 1.0,
             generator: torch.Generator | None = None):
    """A 1d/2d/3d convolution (from ``weight.dim()``, any argument of ``F.convNd``) whose dW uses
    K = ceil(k * D) of its D outer products per group, D = batch x output positions (the rows of
    the unfolded patches). ``memory_a`` (G, R, taps * C_in / G) and ``memory_b`` (G, R, C_out / G)
    as for :func:`aop_linear`.

    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    >>> aop_conv(x, w, padding=1, k=0.25).shape
    torch.Size([2, 4, 8, 8])
    """
    check_aop(k, policy, decay)
    d = weight.dim() - 2
    if d not in _CONV_FN:
        raise ValueError(f"weight must be 3-, 4- or 5-dimensional (1d/2d/3d conv), got shape {tuple(weight.shape)}")
    if input.dim() not in (d + 1, d + 2):
        raise ValueError(f"a {d}d conv (weight {tuple(weight.shape)}) needs input of {d + 2} dims "
                         f"(N, C, *spatial) or {d + 1} unbatched, got input shape {tuple(input.shape)}")
    unbatched = input.dim() == d + 1
    x = input.unsqueeze(0) if unbatched else input
    y = _AopConv.apply(x, weight, bias, stride, padding, dilation, groups, memory_a, memory_b, k, policy,
                       decay, generator)
    return y.squeeze(0) if unbatched else y


class AopMemory(nn.Module):
    """The Mem-AOP-GD memory of one layer: buffers ``a`` (G, R, width of an X row) and ``b``
    (G, R, width of a dY row), zero until the first backward. In ``state_dict``, so a checkpoint
    resumes it; :meth:`reset` (or :func:`reset_aop_memory`) clears it, e.g. when the data changes."""

    def __init__(self, groups: int, rows: int, a_width: int, b_width: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("a", torch.zeros(groups, rows, a_width, dtype=dtype, device=device))
        self.register_buffer("b", torch.zeros(groups, rows, b_width, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def reset(self) -> None:
        with torch.no_grad():
            self.a.zero_()
            self.b.zero_()

    def extra_repr(self) -> str:
        g, r, wa = self.a.shape
        return f"groups={g}, rows={r}, widths=({wa}, {self.b.shape[2]})"


def reset_aop_memory(module: nn.Module) -> int:
    """Clear every Mem-AOP-GD memory in ``module`` (e.g. a module from ``fxsketch.optimize(...,
    methods=("aop",))``); returns how many were cleared.

    >>> m = nn.Module(); m.mem = AopMemory(1, 2, 4, 3); reset_aop_memory(m)
    1
    """
    found = [m for m in module.modules() if isinstance(m, AopMemory)]
    for m in found:
        m.reset()
    return len(found)
