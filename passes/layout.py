"""Channels-last layout (``Config.memory_format="channels_last"``): a graph pass that runs the
step's 2-d and 3-d convolutions in NHWC / NDHWC.

Each conv's input gets ``contiguous(memory_format=channels_last)`` (a copy where it comes in
another layout, e.g. the image batch; returns the tensor itself where it is already so). torch's
elementwise ops, norms and pools keep that layout, and so do fxsketch's (lean ReLU masks, max-pool
offsets and quantized BatchNorm inputs are packed as the tensor lies in memory), so the
activations stay channels_last between convs. Each graph output of 4 or more dims that eager
returns contiguous gets ``contiguous()``, so the caller sees eager's strides.

Why: on CPU oneDNN runs NCHW convolutions by reordering their operands into a blocked layout,
workspace of up to the size of the conv's input or output per call (``passes/workspace.py``);
in NHWC it reads and writes the tensors as they lie. Values equal eager's up to floating-point
rounding: the kernels sum in another order.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..ops._args import dense_in

__all__ = ["to_channels_last", "conv_nodes"]

_MODULES = (nn.Conv2d, nn.Conv3d)
_FUNCTIONS = {F.conv2d: 2, F.conv3d: 3, torch.conv2d: 2, torch.conv3d: 3}


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The 2-d and 3-d convolution nodes of ``gm`` (modules and functional calls)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _MODULES) \
                or n.op == "call_function" and n.target in _FUNCTIONS:
            out.append(n)
    return out


def _is_contiguous(meta) -> bool:
    return meta.stride is None or dense_in(meta.shape, meta.stride, range(len(meta.shape)))


def to_channels_last(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place as described in the module docstring; the number of convs whose
    input is made channels_last. Reads the output strides of eager from the node metadata of a
    profiled graph (``fxsketch.tensor``), where present."""
    convs, done = conv_nodes(gm), 0
    for n in convs:
        x = n.args[0] if n.args else n.kwargs.get("input")
        dims = 4 if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
                     or _FUNCTIONS.get(n.target) == 2) else 5
        if not isinstance(x, fx.Node):
            continue
        meta = x.meta.get("fxsketch.tensor")
        if meta and len(meta[0].shape) != dims:
            continue  # an unbatched conv input: no channels_last layout of that rank
        fmt = torch.channels_last if dims == 4 else torch.channels_last_3d
        with gm.graph.inserting_before(n):
            cl = gm.graph.call_method("contiguous", (x,), {"memory_format": fmt})
        if n.args:
            n.args = (cl, *n.args[1:])
        else:
            n.kwargs = {**n.kwargs, "input": cl}
        done += 1
    if done:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaves, spec = tree_flatten(out.args[0])
        new = []
        for leaf in leaves:
            meta = leaf.meta.get("fxsketch.tensor") if isinstance(leaf, fx.Node) else None
            if meta and len(meta) == 1 and len(meta[0].shape) >= 4 and math.prod(meta[0].shape) > 0 \
                    and _is_contiguous(meta[0]):
                with gm.graph.inserting_before(out):
                    leaf = gm.graph.call_method("contiguous", (leaf,))
            new.append(leaf)
        out.args = (tree_unflatten(new, spec),)
        gm.graph.lint()
        gm.recompile()
    return done
