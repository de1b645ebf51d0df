"""Per-sample graph segments run over their batch a chunk at a time: ``ChunkedRecompute`` (replayed
chunk by chunk in backward) and ``MicroBatched`` (no replay: each chunk keeps its own saved tensors
and backpropagates on its own).

A plain replay (:class:`~fxsketch.ops.recompute.Recompute`) keeps the segment's inputs and
rebuilds, at its backward, every tensor the segment's backward reads, for the whole batch at once;
its forward makes every activation of the segment at full size too. Where every op of the segment
treats each sample on its own (convolutions, pointwise ops, pooling, GroupNorm / LayerNorm /
InstanceNorm without running statistics: no BatchNorm, no random op), the segment can run on
``chunk`` samples at a time instead:

- forward, under ``no_grad``: each chunk of the batched inputs through the segment, its output
  written into the segment's output; only one chunk's activations are alive at once;
- backward: per chunk, the segment again with grad on that chunk, its backward from the chunk's
  output gradient; dX is written chunk by chunk, parameter gradients added up over chunks.

Outputs equal the segment's eager outputs per sample (a convolution may sum in another order on
another batch size: within rounding); input gradients are per sample; parameter gradients are
sums in another order (eager's within rounding). The forward runs once more, as in any replay.
Under ``torch.compile`` a chunked replay is traced as torch's checkpoint region of the whole
batch (a micro-batched segment traces as it runs: its split, its chunks, their concatenation).
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UnsupportedError

__all__ = ["ChunkedRecompute", "MicroBatched"]


def _like(y: torch.Tensor, batch: int) -> torch.Tensor:
    """An empty tensor of ``y``'s row shape, dtype and memory layout, with ``batch`` rows."""
    shape = (batch, *y.shape[1:])
    for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if y.dim() == dim and not y.is_contiguous() and y.is_contiguous(memory_format=fmt):
            return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=fmt)
    return y.new_empty(shape)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    """The autocast settings of the devices a replay may run on (as torch's checkpoint keeps them)."""
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, n_args, *tensors):
        args, params = tensors[:n_args], tensors[n_args:]
        batch = module.batch_of(args)
        outs = None
        with torch.no_grad():
            for a in range(0, batch, module.chunk):
                ys = module.run_chunk(args, a)
                if outs is None:
                    outs = [_like(y, batch) for y in ys]
                for o, y in zip(outs, ys):
                    o[a:a + y.shape[0]].copy_(y)
                del ys
        ctx.module, ctx.n_args, ctx.batch = module, n_args, batch
        ctx.autocast = _autocast_state()  # the replay runs in backward, outside the user's autocast
        # an option inside the segment may take a module or a generator: kept as they are
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in args]
        ctx.save_for_backward(*(x for x in args if isinstance(x, torch.Tensor)))
        ctx.params = params
        ctx.single = module.single
        return outs[0] if module.single else tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        if torch.is_grad_enabled():
            raise UnsupportedError(
                "fxsketch's chunked replay does not support double backward (create_graph=True): plan "
                "with chunked_replays=False.")
        module, n_args, batch = ctx.module, ctx.n_args, ctx.batch
        saved, params = iter(ctx.saved_tensors), ctx.params
        args = [next(saved) if x is None else x for x in ctx.others]
        need = ctx.needs_input_grad[2:]
        batched = module.batched
        grads: list[torch.Tensor | None] = [
            torch.empty_like(x) if need[i] and batched[i] else None for i, x in enumerate(args)]
        grads += [None] * len(params)
        for a in range(0, batch, module.chunk):
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for device, enabled, dtype in ctx.autocast:
                    if enabled:
                        stack.enter_context(torch.autocast(device, dtype=dtype))
                xs = [x[a:a + module.chunk].detach() if batched[i] else
                      x.detach() if isinstance(x, torch.Tensor) else x for i, x in enumerate(args)]
                for i, x in enumerate(xs):
                    if need[i]:
                        x.requires_grad_(True)
                ys = module.segment(*xs)
            ys = [ys] if module.single else list(ys)
            pairs = [(y, d[a:a + y.shape[0]]) for y, d in zip(ys, douts) if d is not None and y.requires_grad]
            leaves = [i for i in range(len(need)) if need[i]]
            inputs = [xs[i] if i < n_args else params[i - n_args] for i in leaves]
            got = torch.autograd.grad([y for y, _ in pairs], inputs, [d for _, d in pairs],
                                      allow_unused=True) if pairs and inputs else [None] * len(inputs)
            del ys, pairs
            for i, g in zip(leaves, got):
                if i < n_args and batched[i]:
                    if g is None:
                        grads[i][a:a + module.chunk].zero_()
                    else:
                        grads[i][a:a + module.chunk].copy_(g)
                elif g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
            del got, xs
        return (None, None, *grads)


class ChunkedRecompute(nn.Module):
    """Runs a per-sample graph segment ``chunk`` samples at a time in forward (under ``no_grad``)
    and replays it chunk by chunk in backward (module docstring). Holds no state of its own: the
    segment's submodules are the model's, stored unregistered so that ``state_dict`` keys do not
    change. ``batched[i]``: whether the segment's i-th input is split along dim 0 (an activation)
    or passed whole (a weight, say).

    >>> seg = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    >>> m = ChunkedRecompute(seg, chunk=2, batched=(True,))
    >>> x = torch.randn(5, 3, 8, 8)
    >>> torch.allclose(m(x), seg(x), atol=1e-6)
    True
    """

    def __init__(self, segment: fx.GraphModule, chunk: int, batched: tuple[bool, ...]):
        super().__init__()
        if chunk < 1 or not any(batched):
            raise ValueError(f"ChunkedRecompute needs chunk >= 1 and a batched input, got {chunk}, {batched}")
        object.__setattr__(self, "segment", segment)  # unregistered on purpose (see docstring)
        self.chunk = int(chunk)
        self.batched = tuple(bool(b) for b in batched)
        outputs = next(n for n in segment.graph.nodes if n.op == "output").args[0]
        self.single = not isinstance(outputs, (tuple, list))

    def batch_of(self, args) -> int:
        sizes = {x.shape[0] for x, b in zip(args, self.batched) if b}
        if len(sizes) != 1:
            raise UnsupportedError(f"fxsketch's chunked replay got batched inputs of sizes {sorted(sizes)}: "
                                   "its segment's inputs must share their first dim (re-plan for these inputs).")
        return sizes.pop()

    def run_chunk(self, args, a: int) -> list[torch.Tensor]:
        ys = self.segment(*(x[a:a + self.chunk] if b else x for x, b in zip(args, self.batched)))
        return [ys] if self.single else list(ys)

    def forward(self, *args):
        if len(args) != len(self.batched) or not all(isinstance(x, torch.Tensor) for x, b in zip(args, self.batched) if b):
            raise UnsupportedError(f"fxsketch's chunked replay takes {len(self.batched)} inputs, got "
                                   f"{[type(x).__name__ for x in args]}")
        if torch.compiler.is_compiling():
            # traced: torch's checkpoint region, replayed whole (AOTAutograd plans its own memory)
            return checkpoint(self.segment, *args, use_reentrant=False)
        # the segment's parameters, and those of a module it takes as an input (a quantized norm's)
        mods = [self.segment, *(x for x in args if isinstance(x, nn.Module))]
        params = list({id(p): p for m in mods for p in m.parameters() if p.requires_grad}.values())
        return _Chunked.apply(self, len(args), *args, *params)

    def extra_repr(self) -> str:
        names = [n.name for n in self.segment.graph.nodes if n.op not in ("placeholder", "output")]
        return f"{len(names)} nodes: {names[0]} .. {names[-1]}, chunks of {self.chunk}" if names else "empty"


class MicroBatched(nn.Module):
    """Runs a per-sample graph segment ``chunk`` samples at a time, with grad, and concatenates the
    chunks' outputs: each chunk's autograd graph keeps what its ops save (as the whole batch's would,
    in sum) and backpropagates on its own, so the segment's unsaved activations in forward and its
    activation gradients in backward are a chunk's, not the batch's, and each chunk's saved
    tensors are freed as its backward ends. Nothing runs twice. The segment may hold fxsketch's
    own ops (lean ReLUs, probed or quantized convs): they are per sample too. The inputs
    ``batched`` are split with ``torch.split`` (their gradient is put together once, at the end).

    >>> seg = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    >>> x = torch.randn(5, 3, 8, 8)
    >>> torch.allclose(MicroBatched(seg, chunk=2, batched=(True,))(x), seg(x), atol=1e-6)
    True
    """

    def __init__(self, segment: fx.GraphModule, chunk: int, batched: tuple[bool, ...]):
        super().__init__()
        if chunk < 1 or not any(batched):
            raise ValueError(f"MicroBatched needs chunk >= 1 and a batched input, got {chunk}, {batched}")
        object.__setattr__(self, "segment", segment)  # the model's modules, unregistered (as Recompute)
        self.chunk = int(chunk)
        self.batched = tuple(bool(b) for b in batched)
        outputs = next(n for n in segment.graph.nodes if n.op == "output").args[0]
        self.single = not isinstance(outputs, (tuple, list))

    def forward(self, *args):
        if len(args) != len(self.batched) or not all(isinstance(x, torch.Tensor) for x, b in zip(args, self.batched) if b):
            raise UnsupportedError(f"fxsketch's micro-batched segment takes {len(self.batched)} inputs, got "
                                   f"{[type(x).__name__ for x in args]}")
        parts = [x.split(self.chunk) if b else None for x, b in zip(args, self.batched)]
        counts = {len(p) for p in parts if p is not None}
        if len(counts) != 1:
            raise UnsupportedError("fxsketch's micro-batched segment got batched inputs of different sizes "
                                   f"{sorted({x.shape[0] for x, b in zip(args, self.batched) if b})}: re-plan for these inputs.")
        outs = []
        for c in range(counts.pop()):
            ys = self.segment(*(x if p is None else p[c] for x, p in zip(args, parts)))
            outs.append([ys] if self.single else list(ys))
        cat = [torch.cat(col) for col in zip(*outs)]
        return cat[0] if self.single else tuple(cat)

    def extra_repr(self) -> str:
        names = [n.name for n in self.segment.graph.nodes if n.op not in ("placeholder", "output")]
        return f"{len(names)} nodes: {names[0]} .. {names[-1]}, chunks of {self.chunk}" if names else "empty"
