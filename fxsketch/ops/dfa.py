"""Direct feedback alignment (DFA) and MEM-DFA: every block learns from the output error alone.

The traced graph is cut into local blocks (:mod:`fxsketch.passes.options.dfa` does the cut).
Backpropagation hands block l the gradient of block l+1's input; DFA hands it ``B_l e`` instead:
``e = dL/d(output)`` sent through a fixed random matrix ``B_l`` (per sample:
``(B_l e)[n] = B_l @ e[n].flatten()``), and the block backpropagates that locally into
its own parameters only. The last block gets ``e`` itself (``B = I`` there).
``B_l`` has uniform entries of mean 0 and variance 1/width(e) (so ``B e`` is about as large per
element as ``e``), one matrix per floating tensor that crosses into a later block. Where e is
wider than :data:`FEEDBACK_DIM` per sample (dense outputs: segmentation maps, images), it is
first count-sketched to that width by one fixed random matrix ``S`` (each element of e added with
a random sign into one of FEEDBACK_DIM hashed buckets; ``E||S e||^2 = ||e||^2``) and
``B_l = B'_l S`` with ``B'_l`` as above: still a fixed random feedback matrix per block, of rank at
most FEEDBACK_DIM, at a cost of rows x FEEDBACK_DIM per sample instead of rows x width(e) (a
24^3 segmentation map would otherwise need 10^9 entries of B per block and step).

``B_l`` is never stored: :func:`feedback` regenerates it from ``(seed, key)`` in row chunks of at
most :data:`CHUNK` elements with the same counter-based hash as the probes
(:func:`fxsketch.ops.probes.hash_positions`), so it is the same on every device and in fake mode.

Two runtimes give bit-identical parameter gradients; they differ only in memory:

* plain DFA: the model's own graph, run with autograd as usual (every block's activations are
  saved), with each value that crosses into a later block read there through :func:`dfa_cut`,
  whose backward throws away the later blocks' gradient and returns ``B e``; :func:`dfa_tap` on
  the output hands e to the cuts, :func:`dfa_state` is what they share in one step.
* MEM-DFA (:class:`DFA`): one autograd Function around the whole graph. Its forward runs under
  ``no_grad`` and saves only its inputs and the RNG state; its backward receives ``e``, replays
  the blocks one at a time with autograd on detached inputs, backpropagates each block's ``B e``
  into that block's parameters and frees the block. Activation memory is one block's, whatever
  the depth; the price is one more forward (and no input gradients are computed).

Which values get ``B e``: every floating tensor that requires grad and is read by a later block
(the items of a tuple such as ``chunk``'s cross one by one). A crossing value that later blocks
read only through ops without a gradient (sizes, comparisons) still gets ``B e`` in MEM-DFA but
none in plain DFA, the one case where the two differ (besides rounding when one parameter is
used in three or more blocks: its gradients are then summed in another order).

Parameter gradients come back through autograd as usual (``loss.backward()``, ``autograd.grad``,
optimizers: unchanged). Input gradients are not computed: an input that requires grad is refused.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedError
from .probes import hash_positions
from ._args import traceable

__all__ = ["CHUNK", "MIN_CHUNK", "FEEDBACK_DIM", "Block", "DFA", "feedback", "feedback_matrix", "dfa_state", "dfa_cut", "dfa_tap"]

CHUNK = 1 << 16
"""Most elements of ``B`` generated at once (int64 hash temporaries, 40 B per entry at their
peak); fewer when ``B e`` is small, so that they stay within a quarter of its bytes, but not
fewer than ``MIN_CHUNK``."""
MIN_CHUNK = 1 << 14
FEEDBACK_DIM = 256
"""Widest output error (elements per sample) sent through a dense feedback matrix; a wider one is
count-sketched to this width first (module docstring)."""
_SKETCH_STREAM = (1 << 31) + 1  # hash stream of S: no feedback key (small ints in block order) takes it
_M32 = (1 << 32) - 1


def _rows(seed: int, key: int, start: int, stop: int, cols: int, width: int, device, dtype) -> torch.Tensor:
    """Rows ``start:stop`` of the ``cols`` columns of feedback matrix ``key``: uniform entries of
    mean 0 and variance 1/width (one 32-bit hash each), so that ``B e`` is about as large per
    element as an e of ``width`` elements."""
    if stop * cols > _M32:
        raise UnsupportedError(f"DFA feedback matrix {key} has {stop * cols} entries, more than the "
                               f"hash's 2**32 positions: a block output is too large per sample for DFA")
    q = torch.arange(start * cols, stop * cols, dtype=torch.int64, device=device)
    u = hash_positions(seed, key, q).to(torch.float32)
    del q
    return ((u * 2.0 ** -32 - 0.5) * math.sqrt(12.0 / width)).to(dtype).view(stop - start, cols)


def _buckets_and_signs(seed: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """S's bucket (low bits of the hash) and sign (its top bit) of each of e's ``width`` elements."""
    u = hash_positions(seed, _SKETCH_STREAM, torch.arange(width, dtype=torch.int64, device=device))
    return u % FEEDBACK_DIM, (u >> 31).to(torch.float32) * -2.0 + 1.0


def _sketched(e2: torch.Tensor, seed: int) -> torch.Tensor:
    """``e2`` (n, width) as (n, min(width, FEEDBACK_DIM)): itself, or its count sketch ``S e``."""
    width = e2.shape[1]
    if width <= FEEDBACK_DIM:
        return e2
    bucket, sign = _buckets_and_signs(seed, width, e2.device)
    out = e2.new_zeros(e2.shape[0], FEEDBACK_DIM)
    return out.index_add_(1, bucket, e2 * sign.to(e2.dtype))


def _per_sample(e: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``e`` and a value of ``shape`` share a batch dimension (then B acts per sample)."""
    return e.dim() > 0 and len(shape) > 0 and shape[0] == e.shape[0]


def feedback_matrix(seed: int, key: int, rows: int, width: int, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """Feedback matrix ``key`` whole, (rows, width): for tests and inspection (training never
    materialises it). ``rows`` is the per-sample size of the value it feeds, ``width`` that of e.

    >>> feedback_matrix(0, 1, 3, 2).shape
    torch.Size([3, 2])
    """
    cols = min(width, FEEDBACK_DIM)
    b = _rows(seed, key, 0, rows, cols, width, device, dtype)
    if cols == width:
        return b
    bucket, sign = _buckets_and_signs(seed, width, device)
    s = torch.zeros(cols, width, dtype=dtype, device=device)
    s[bucket, torch.arange(width, device=device)] = sign.to(dtype)
    return b @ s


def feedback(e: torch.Tensor, seed: int, key: int, shape, dtype=None) -> torch.Tensor:
    """``B_key e`` reshaped to ``shape``, computed in row chunks of B (B never stored whole).

    Per sample when ``shape`` and ``e`` share their first dimension, else on the flattened tensors."""
    shape = tuple(shape)
    per_sample = _per_sample(e, shape)
    e2 = e.reshape(e.shape[0], -1) if per_sample else e.reshape(1, -1)
    rows = math.prod(shape[1:]) if per_sample else math.prod(shape)
    width = e2.shape[1]
    e2 = _sketched(e2, seed)
    cols = e2.shape[1]
    out = torch.empty(e2.shape[0], rows, dtype=e.dtype, device=e.device)
    # a chunk's hash temporaries (40 B per entry at their peak) stay within a quarter of the
    # result's bytes, or MIN_CHUNK entries (smaller chunks cost more in per-op overhead than they save)
    step = max(1, min(CHUNK, max(e2.shape[0] * rows // 40, MIN_CHUNK)) // max(cols, 1))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        out[:, a:b] = e2 @ _rows(seed, key, a, b, cols, width, e.device, e.dtype).t()
    return out.view(shape).to(dtype or e.dtype)


@dataclass(frozen=True)
class Block:
    """One local block: ``gm(*values of reads, *attrs[attr_reads])`` returns the values of ``writes``."""

    gm: fx.GraphModule
    reads: tuple[str, ...]        # values made before the block (model inputs, earlier blocks)
    attr_reads: tuple[int, ...]   # indices into the call's attribute arguments read by get_attr
    writes: tuple[str, ...]       # values of the block read after it (later blocks, the output)
    params: tuple[int, ...]       # indices of the attribute arguments that are its parameters
    first: str = ""               # first and last node, for reports
    last: str = ""


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


def _map(value: Any, keys, fn) -> Any:
    """``value`` with ``fn(tensor, key)`` applied to each trainable floating tensor of it, the
    i-th tensor leaf with feedback matrix ``keys[i]``."""
    leaves, spec = tree_flatten(value)
    keys = iter(keys)
    out = []
    for leaf in leaves:
        key = next(keys, None) if isinstance(leaf, torch.Tensor) else None
        out.append(fn(leaf, key) if key is not None and _floating(leaf) else leaf)
    return tree_unflatten(out, spec)


def _no_input_grad(names, inputs) -> None:
    bad = [name for name, x in zip(names, inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    if bad and torch.is_grad_enabled():
        raise UnsupportedError(f"DFA trains parameters only and computes no input gradient, but input "
                               f"{bad[0]!r} requires grad: pass it detached (x.detach()), or plan "
                               f"without 'dfa' for exact gradients")


class _State:
    """What plain DFA's cuts share in one step: e (set by the output's tap) and the seed."""

    def __init__(self, seed: int):
        self.seed, self.e, self.pending = seed, None, 0


class _Tap(torch.autograd.Function):
    """Identity on the output; its backward (the first to run) hands e to the cuts."""

    @staticmethod
    def forward(ctx, out, state):
        ctx.state = state
        return out.view_as(out)

    @staticmethod
    def backward(ctx, e):
        ctx.state.e = e
        return e, None


class _Cut(torch.autograd.Function):
    """Identity on a value crossing into later blocks; its backward ignores their gradient and
    returns ``B_key e`` (the cut is what keeps backprop from leaving a block)."""

    @staticmethod
    def forward(ctx, v, state, key):
        ctx.state, ctx.key, ctx.shape = state, key, v.shape
        state.pending += 1
        return v.detach()  # an alias, not a view: later blocks may modify it in place, as eagerly

    @staticmethod
    def backward(ctx, _ignored):
        state = ctx.state
        g = feedback(state.e, state.seed, ctx.key, ctx.shape)
        state.pending -= 1
        if state.pending == 0:
            state.e = None  # every cut has fired: drop e
        return g, None, None


def _rng_state(tensors) -> tuple:
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda]


@contextlib.contextmanager
def _rng_restored(state):
    """Replay with the RNG as the forward found it (dropout draws the same); restore it after."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[d for d, _ in cuda]):
        torch.set_rng_state(cpu)
        for d, s in cuda:
            torch.cuda.set_rng_state(s, d)
        yield


@contextlib.contextmanager
def _buffers_restored(buffers):
    """A replayed block updates BatchNorm statistics again: put back the values of the forward."""
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


class _MemDFA(torch.autograd.Function):
    """MEM-DFA: forward saves the inputs (and RNG state) only; backward replays block by block."""

    @staticmethod
    def forward(ctx, dfa, *args):
        ctx.dfa, ctx.rng = dfa, _rng_state(args)
        ctx.save_for_backward(*args)
        return dfa.run(args[:dfa.n_inputs], args[dfa.n_inputs:])

    @staticmethod
    def backward(ctx, e):
        dfa, args = ctx.dfa, ctx.saved_tensors
        with _rng_restored(ctx.rng), torch.enable_grad():
            grads = dfa.replay(args[:dfa.n_inputs], args[dfa.n_inputs:], e,
                               ctx.needs_input_grad[1 + dfa.n_inputs:])
        return (None,) * (1 + dfa.n_inputs) + tuple(grads)


@torch.compiler.disable
def _mem_dfa_eagerly(dfa, *args):
    """MEM-DFA under ``torch.compile``: eagerly (one graph break). Its backward replays blocks and
    calls ``torch.autograd.grad``, and it saves and restores the RNG state: nothing dynamo traces."""
    return _MemDFA.apply(dfa, *args)


class DFA(nn.Module):
    """The traced graph as DFA blocks; called as ``dfa(*inputs, *attrs)`` (attrs: the parameters
    and get_attr tensors, fetched by the enclosing graph so that they are its own).

    Holds no state of its own: the blocks are GraphModules over the model's submodules, stored
    unregistered so that ``state_dict`` keys do not change. ``keys[name]`` is the feedback
    matrix of each floating tensor of a crossing value (the output has none: it gets e)."""

    def __init__(self, blocks, inputs, attrs, output, keys, seed: int):
        super().__init__()
        object.__setattr__(self, "blocks", tuple(blocks))  # unregistered on purpose (see docstring)
        self.inputs, self.attrs, self.output = tuple(inputs), tuple(attrs), output
        self.n_inputs = len(self.inputs)
        self.keys, self.seed = dict(keys), int(seed)
        last = {}
        for i, b in enumerate(self.blocks):
            last.update((k, i) for k in b.reads)
        self._dead = [tuple(k for k, i in last.items() if i == j and k != output) for j in range(len(self.blocks))]

    def forward(self, *args):
        inputs, attrs = args[:self.n_inputs], args[self.n_inputs:]
        if not torch.is_grad_enabled():
            return self.run(inputs, attrs)
        _no_input_grad(self.inputs, inputs)
        if torch.compiler.is_compiling():
            return _mem_dfa_eagerly(self, *args)
        return _MemDFA.apply(self, *args)

    def _blocks(self, inputs, attrs, after, replaying: bool = False):
        """Run the blocks in order; ``after(block, values)`` may replace the written values."""
        env = dict(zip(self.inputs, inputs))
        for i, b in enumerate(self.blocks):
            args = [env[k] for k in b.reads] + [attrs[j] for j in b.attr_reads]
            # restored after the block's backward too: BatchNorm's backward reads its statistics
            with _buffers_restored(self._block_buffers(b, attrs)) if replaying else contextlib.nullcontext():
                outs = b.gm(*args)
                del args
                outs = after(b, outs)
            for k in self._dead[i]:
                env.pop(k, None)
            env.update(zip(b.writes, outs))
            del outs
        return env[self.output]

    def run(self, inputs, attrs):
        """The forward as the model computes it (no feedback): inference and MEM-DFA's forward."""
        return self._blocks(inputs, attrs, lambda b, outs: outs)

    def _feedbacks(self, name: str, value: Any, e: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, its gradient) for each trainable tensor of a written value: e for the
        output, ``B_key e`` for a crossing value."""
        if name == self.output:
            return [(value, e)] if _floating(value) else []
        pairs = []
        _map(value, self.keys.get(name, ()), lambda t, key: pairs.append((t, feedback(e, self.seed, key, t.shape, t.dtype))))
        return pairs

    def replay(self, inputs, attrs, e, wanted):
        """MEM-DFA's backward: replay each block on detached inputs, backpropagate its feedback
        (e for the output) into its parameters, keep only what later blocks read."""
        canon: dict[int, int] = {}
        for j, t in enumerate(attrs):
            canon.setdefault(id(t), j)  # a tied parameter gets its gradient once
        grads: list[torch.Tensor | None] = [None] * len(attrs)

        def local_backward(b, outs):
            params = [j for j in dict.fromkeys(canon[id(attrs[j])] for j in b.params) if wanted[j]]
            pairs = [p for name, v in zip(b.writes, outs) for p in self._feedbacks(name, v, e)] if params else []
            if pairs:
                targets, fb = zip(*pairs)
                del pairs
                got = torch.autograd.grad(targets, [attrs[j] for j in params], fb, allow_unused=True)
                del targets, fb
                for j, g in zip(params, got):
                    if g is not None:
                        grads[j] = g if grads[j] is None else grads[j] + g
                del got
            return tuple(self._detach(v) for v in outs)

        self._blocks(inputs, attrs, local_backward, replaying=True)
        return grads

    @staticmethod
    def _detach(value):
        leaves, spec = tree_flatten(value)
        return tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], spec)

    def _block_buffers(self, b: Block, attrs):
        return [t for m in b.gm.modules() for t in m.buffers(recurse=False)] + \
               [attrs[j] for j in b.attr_reads if not attrs[j].requires_grad]

    def extra_repr(self) -> str:
        return (f"MEM-DFA, {len(self.blocks)} blocks, "
                f"{sum(len(k) for k in self.keys.values())} feedback matrices, seed {self.seed}")


# ---- plain DFA: functions the rewritten graph calls (the model's own nodes stay in between) ----

@traceable
def dfa_state(seed: int, *inputs) -> _State:
    """The start of a plain-DFA step: what its cuts and tap share (refuses inputs needing grad)."""
    _no_input_grad([f"input {i}" for i in range(len(inputs))], inputs)
    return _State(seed)


@traceable
def dfa_cut(value: Any, state: _State, keys: tuple[int, ...]) -> Any:
    """A crossing value as later blocks read it: each trainable tensor of it through ``_Cut``."""
    return _map(value, keys, lambda t, key: _Cut.apply(t, state, key))


@traceable
def dfa_tap(out: torch.Tensor, state: _State) -> torch.Tensor:
    """The model output; its gradient e is handed to the cuts."""
    return _Tap.apply(out, state) if _floating(out) and torch.is_grad_enabled() else out
