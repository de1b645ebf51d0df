"""Activation offload: a node's saved tensors go to host memory in forward and come back before
their backward use.

:class:`Offload` runs one graph node under ``saved_tensors_hooks``. Its pack hook copies each
saved tensor's whole storage to host memory (pinned, on CUDA) and keeps only that copy and the
view's shape, strides and offset, so the device storage dies as soon as nothing else holds it;
tensors the plan keeps (parameters, buffers, the model's inputs and outputs) are stashed as they
are. The call returns ``(output, handle)``; :func:`offload_prefetch`, emitted after a later node,
hooks that node's backward so that the handle brings the copies back one or more backward steps
before the offloaded node's backward reads them. An unpack that finds no prefetched copy fetches
it then.

On CUDA the copies run on one side stream per device (:class:`CudaStreams`): copy out after the
forward op (the side stream waits for the compute stream, the source is ``record_stream``-ed so
the caching allocator keeps it until the copy is done), copy in at the prefetch (the device copy
is allocated on the compute stream, written on the side stream, ``record_stream``-ed), and the
unpack makes the compute stream wait for the copy-in's event. Elsewhere the copies are
synchronous. On fake or meta tensors (planning) nothing is copied: the host copy is not device
memory, and the copy in allocates the device copy only, so the planner's profiler sees exactly
the device bytes of a real step.

Host copies are counted apart from device memory: :data:`HOST` keeps their live and peak bytes,
and the CPU live-storage tracker (:mod:`fxsketch.measurement`) leaves them out of its device count.

Under ``torch.compile`` the offloaded node and the prefetch run eagerly (``torch.compiler.disable``:
dynamo traces neither saved-tensor hooks that keep Python state nor ``grad_fn`` hooks); the rest
of the module compiles, split at each offloaded node.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from ._args import fake_or_meta

__all__ = ["Offload", "OffloadHandle", "offload_prefetch", "HOST", "HostLedger", "CudaStreams", "SyncCopies"]


class HostLedger:
    """Live and peak bytes of the host copies that offload made (each is counted once, from its
    allocation until its tensor object dies).

    >>> HOST.live_bytes
    0
    """

    def __init__(self):
        self.live_bytes = 0
        self.peak_bytes = 0
        self._keys: dict[int, int] = {}   # storage address -> nbytes, while alive
        self._allocating = 0

    def is_host(self, storage) -> bool:
        """Whether ``storage`` (an UntypedStorage) holds an offloaded host copy, or is being
        allocated as one right now."""
        return self._allocating > 0 or storage._cdata in self._keys

    @contextlib.contextmanager
    def allocating(self):
        """Storages made inside are host copies (a tracker asking meanwhile is told so)."""
        self._allocating += 1
        try:
            yield
        finally:
            self._allocating -= 1

    def add(self, t: torch.Tensor) -> None:
        key, nbytes = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
        self._keys[key] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(t, self._drop, key, nbytes)

    def _drop(self, key: int, nbytes: int) -> None:
        self._keys.pop(key, None)
        self.live_bytes -= nbytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


HOST = HostLedger()
"""The process's ledger of offloaded host copies."""


def _host_copy_of(src: torch.Tensor, pinned: bool) -> torch.Tensor:
    """An empty host tensor like ``src``, entered in :data:`HOST` (never counted as device memory)."""
    with HOST.allocating():
        host = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pinned)
    HOST.add(host)
    return host


class SyncCopies:
    """Copies on the calling thread: the CPU (the 'host' copy is a separate CPU tensor)."""

    def copy_out(self, src: torch.Tensor) -> tuple[torch.Tensor, Any]:
        host = _host_copy_of(src, pinned=False)
        host.copy_(src)
        return host, None

    def copy_in(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        return host.to(device, copy=True), None

    def wait(self, event: Any, dev: torch.Tensor | None = None) -> None:
        pass


class CudaStreams(SyncCopies):
    """Copies on a side stream, ordered against the compute stream by events. ``api`` is
    ``torch.cuda`` (a test double with the same few calls runs this logic without a GPU)."""

    def __init__(self, device: torch.device, api: Any = torch.cuda, pinned: bool = True):
        self.api = api
        self.device = device
        self.side = api.Stream(device)
        self.pinned = pinned  # page-locked host memory: what lets the DMA engine copy asynchronously

    def copy_out(self, src: torch.Tensor) -> tuple[torch.Tensor, Any]:
        host = _host_copy_of(src, self.pinned)
        self.side.wait_stream(self.api.current_stream(self.device))  # the forward op wrote src
        with self.api.stream(self.side):
            host.copy_(src, non_blocking=True)
        self.record_stream(src, self.side)  # the allocator keeps src until the copy is done
        done = self.api.Event()
        done.record(self.side)
        return host, done

    def copy_in(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        # allocated and written on the side stream: the copy starts at once, beside the compute
        # stream's queued backward kernels
        with self.api.stream(self.side):
            dev = torch.empty(host.shape, dtype=host.dtype, device=device)
            dev.copy_(host, non_blocking=True)
        ready = self.api.Event()
        ready.record(self.side)
        return dev, ready

    def wait(self, event: Any, dev: torch.Tensor | None = None) -> None:
        if event is None:
            return
        compute = self.api.current_stream(self.device)
        compute.wait_event(event)    # the backward op reads the copy only once it has landed
        if dev is not None:          # ...and the allocator keeps it until that op is done
            self.record_stream(dev, compute)

    def record_stream(self, t: torch.Tensor, stream: Any) -> None:
        t.record_stream(stream)


_STREAMS: dict[torch.device, CudaStreams] = {}


def copies_for(device: torch.device) -> SyncCopies:
    """The copier of a device: one side stream per CUDA device, synchronous copies elsewhere."""
    if device.type != "cuda":
        return SyncCopies()
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device not in _STREAMS:
        _STREAMS[device] = CudaStreams(device)
    return _STREAMS[device]


class _Entry:
    """One offloaded storage of one call: its host copy, and the device copy once fetched."""

    def __init__(self, whole: torch.Tensor, copies: SyncCopies):
        self.device, self.dtype, self.numel = whole.device, whole.dtype, whole.numel()
        self.copies = copies
        self.planning = fake_or_meta(whole)
        self.host, self.out_done = (None, None) if self.planning else copies.copy_out(whole)
        # the device copy, once fetched, lives as long as the entry: until autograd releases the
        # node's saved tensors, after its backward and that step's hooks (what the planner models)
        self.fetched: torch.Tensor | None = None
        self.ready = None

    def fetch(self) -> None:
        if self.fetched is not None:
            return
        if self.planning:  # no data: the device copy's allocation is what the profiler must see
            self.fetched = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        else:
            self.fetched, self.ready = self.copies.copy_in(self.host, self.device)

    def take(self, size, stride, offset) -> torch.Tensor:
        self.fetch()
        self.copies.wait(self.ready, self.fetched)
        return self.fetched.as_strided(size, stride, offset)


class _Packed:
    __slots__ = ("entry", "size", "stride", "offset")

    def __init__(self, entry: _Entry, t: torch.Tensor):
        self.entry, self.size, self.stride, self.offset = entry, t.size(), t.stride(), t.storage_offset()


class OffloadHandle:
    """The saved tensors of one call of an offloaded node: pack and unpack hooks, and the prefetch."""

    def __init__(self, keep: Iterable[torch.Tensor], copies: SyncCopies):
        self.keep = {t.untyped_storage()._cdata for t in keep}
        self.copies = copies
        self.entries: dict[int, _Entry] = {}   # storage address -> entry (weak: packed views own it)
        self._refs: list[weakref.ref] = []

    def pack(self, t: torch.Tensor):
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return t  # no plain storage (sparse, nested): stays on the device
        if key in self.keep or t.layout is not torch.strided:
            return t
        entry = self.entries.get(key)
        if entry is None:
            whole = t.detach().as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
            entry = self.entries[key] = _Entry(whole, self.copies)
            self._refs.append(weakref.ref(entry))
        return _Packed(entry, t)

    @staticmethod
    def unpack(p):
        return p.entry.take(p.size, p.stride, p.offset) if isinstance(p, _Packed) else p

    def release(self) -> None:
        """Stop holding the entries strongly: from now on the packed views own them (and so the
        host copies), which autograd frees after the node's backward."""
        self.entries = {}

    def prefetch(self) -> None:
        """Bring every copy back to the device (a backward hook calls this ahead of the use)."""
        for ref in self._refs:
            entry = ref()
            if entry is not None:
                entry.fetch()

    @property
    def host_bytes(self) -> int:
        return sum(e.host.untyped_storage().nbytes() for r in self._refs if (e := r()) is not None
                   and e.host is not None)


class Offload(nn.Module):
    """Runs one graph node with its saved tensors offloaded; returns ``(output, handle)``.

    ``keep``: positions of the inputs whose storages stay on the device (the model's inputs,
    resident or pinned tensors); the node's own parameters and buffers always stay. Holds no
    state: the node's module is the model's own, in an unregistered one-node GraphModule (so
    ``state_dict`` keys do not change).
    """

    def __init__(self, node_graph: fx.GraphModule, keep: tuple[int, ...] = (), host_bytes: int = 0):
        super().__init__()
        object.__setattr__(self, "node_graph", node_graph)  # unregistered on purpose (see docstring)
        self.keep = tuple(keep)
        self.host_bytes = host_bytes  # what the plan predicts this call copies to the host

    @torch.compiler.disable  # saved-tensor hooks with Python state: run eagerly, the rest compiles
    def forward(self, *args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        owned = [t for m in self.node_graph.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        keep = [args[i] for i in self.keep if isinstance(args[i], torch.Tensor)] + owned
        handle = OffloadHandle(keep, copies_for(device))
        with torch.autograd.graph.saved_tensors_hooks(handle.pack, handle.unpack):
            out = self.node_graph(*args)
        handle.release()
        return out, handle

    def extra_repr(self) -> str:
        names = [n.name for n in self.node_graph.graph.nodes if n.op not in ("placeholder", "output")]
        return f"{names[0] if names else '-'}, keep inputs {list(self.keep)}, host {self.host_bytes} B"


@torch.compiler.disable  # a grad_fn hook: dynamo does not trace grad_fn
def offload_prefetch(x: torch.Tensor, handle: OffloadHandle) -> None:
    """Once the backward op that made ``x`` has run, ``handle`` brings its copies back: the
    prefetch, ahead of the offloaded node's own backward. A statement (it returns nothing), so
    no other node's input changes and a segment replayed around ``x`` is left as it is."""
    if isinstance(handle, OffloadHandle) and isinstance(x, torch.Tensor) and x.grad_fn is not None:
        x.grad_fn.register_hook(lambda grad_inputs, grad_outputs: handle.prefetch())
