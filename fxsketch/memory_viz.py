"""A plan's predicted step as a memory snapshot for https://pytorch.org/memory_viz.

The snapshot is the dict ``torch.cuda.memory._snapshot()`` returns and ``_dump_snapshot`` pickles:
``device_traces`` (one list of trace entries per device: ``alloc``, then ``free_requested`` and
``free_completed`` for each storage of the step, in step order) and ``segments`` (the state after
the trace: what is still allocated, as blocks of one segment). The viewer's devices are the steps:

    which="both"        device 0: the unmodified step, device 1: the optimized step
    which="unmodified"  device 0: the unmodified step
    which="optimized"   device 0: the optimized step

Every entry's ``frames`` say, innermost first, which step allocated the storage
(``forward:12:conv1``: step 12, the forward of node conv1; ``resident:0:before the step`` for
parameters, buffers and inputs), its owner, kind and category, when it is freed, and which step
of which model this is. ``time_us`` is the step index, not a time. Addresses are fake: a
first-fit allocator over the predicted lifetimes, blocks rounded up to 512 B as CUDA's
allocator does, so no two live storages overlap; sizes are the exact predicted bytes, so the
timeline's highest point is the plan's predicted peak (kernel workspace included). The segment
is that allocator's footprint, not a prediction of reserved memory. Nothing is recomputed here:
every figure comes from ``TimelineData.storages``, which the pipeline records.

>>> plan.save("plan.pickle")                            # doctest: +SKIP
>>> snap = plan.to_memory_viz(which="optimized")        # the dict, written nowhere  # doctest: +SKIP
>>> html = torch.cuda._memory_viz.trace_plot(snap)      # a self-contained page      # doctest: +SKIP
"""
from __future__ import annotations

import bisect
import pickle
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["snapshot", "write", "WHICH", "BASE_ADDRESS", "ALIGN"]

WHICH = ("both", "unmodified", "optimized")
"""The steps a snapshot can hold (the ``which`` argument)."""
BASE_ADDRESS = 0x7F00_0000_0000
"""Where each device's fake address space starts."""
ALIGN = 512
"""Blocks are rounded up to this many bytes (CUDA's caching allocator rounds to 512 B)."""
_RESIDENT = ("parameter", "buffer", "input")
_PROTOCOL = 4  # the viewer's JavaScript unpickler reads pickle protocols 2 to 4 only

# No entry carries a "category": the viewer colours by category only when one of them is named
# "unknown" (its fallback pushes to a misspelt list otherwise); the category is in the frames.


class _FirstFit:
    """Offsets for blocks allocated and freed in order: the lowest hole that fits, else the top."""

    def __init__(self):
        self.holes: list[tuple[int, int]] = []  # (offset, size), sorted, coalesced, below top
        self.top = 0
        self.high = 0                           # the footprint: the highest top reached

    def alloc(self, size: int) -> int:
        for k, (start, length) in enumerate(self.holes):
            if length >= size:
                self.holes[k:k + 1] = [(start + size, length - size)] if length > size else []
                return start
        start, self.top = self.top, self.top + size
        self.high = max(self.high, self.top)
        return start

    def free(self, start: int, size: int) -> None:
        bisect.insort(self.holes, (start, size))
        merged: list[tuple[int, int]] = []
        for s, n in self.holes:
            if merged and sum(merged[-1]) == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        if merged and sum(merged[-1]) == self.top:  # a hole at the top lowers it
            self.top = merged.pop()[0]
        self.holes = merged


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _frames(sp, steps, label: str) -> list[dict[str, Any]]:
    """What the viewer shows for one storage, innermost first (``filename:line:name``)."""
    if sp.kind in _RESIDENT:
        made = {"filename": "resident", "line": 0, "name": "before the step"}
    else:
        phase, node = steps[sp.first]
        made = {"filename": phase, "line": sp.first, "name": node}
        if node != "loss":  # the loss step and its backward are the loss function's, not a graph node's
            made["fx_node_name"] = node
    if sp.kept:
        freed = {"filename": "kept", "line": sp.last, "name": "after the step"}
    else:
        phase, node = steps[sp.last]
        freed = {"filename": "freed after", "line": sp.last, "name": f"{phase} {node}"}
    owner = {"filename": "owner", "line": 0, "name": f"{sp.owner} ({sp.kind}, {sp.category})"}
    return [made, owner, freed, {"filename": label, "line": 0, "name": "fxsketch prediction"}]


def _device(tl, label: str, device: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trace entries of one timeline and its segment (none if nothing is allocated)."""
    order = []  # (step, 0 free | 1 alloc, storage): a storage is freed before the step after its last read
    for i, sp in enumerate(tl.storages):
        if sp.nbytes > 0:
            order.append((sp.first, 1, i))
            if not sp.kept:
                order.append((sp.last + 1, 0, i))
    order.sort()
    heap, addr, trace = _FirstFit(), {}, []
    frames = {i: _frames(tl.storages[i], tl.steps, label) for _, _, i in order}
    for t, alloc, i in order:
        sp = tl.storages[i]
        size = _rounded(sp.nbytes)
        if alloc:
            a = addr[i] = BASE_ADDRESS + heap.alloc(size)
        else:
            a = addr.pop(i)
            heap.free(a - BASE_ADDRESS, size)
        for action in ("alloc",) if alloc else ("free_requested", "free_completed"):
            trace.append({"action": action, "addr": a, "size": sp.nbytes, "stream": 0, "frames": frames[i],
                          "time_us": t})
    if heap.high == 0:
        return trace, []
    blocks, at, end = [], BASE_ADDRESS, BASE_ADDRESS + heap.high
    for a, i in sorted((a, i) for i, a in addr.items()):  # still allocated after the step
        if a > at:
            blocks.append({"address": at, "size": a - at, "requested_size": 0, "state": "inactive", "frames": []})
        size = _rounded(tl.storages[i].nbytes)
        blocks.append({"address": a, "size": size, "requested_size": tl.storages[i].nbytes,
                       "state": "active_allocated", "frames": frames[i]})
        at = a + size
    if at < end:
        blocks.append({"address": at, "size": end - at, "requested_size": 0, "state": "inactive", "frames": []})
    used = sum(b["requested_size"] for b in blocks)
    return trace, [{"device": device, "address": BASE_ADDRESS, "total_size": heap.high, "allocated_size": used,
                    "active_size": used, "requested_size": used, "stream": 0, "segment_type": "large",
                    "segment_pool_id": (0, 0), "is_expandable": False, "frames": [], "blocks": blocks}]


def snapshot(plan, which: str = "both") -> dict[str, Any]:
    """The predicted step(s) of ``plan`` (a :class:`fxsketch.MemoryPlan`) as a memory snapshot
    dict; ``which`` is "both", "unmodified" or "optimized" (see the module docstring)."""
    if which not in WHICH:
        raise ConfigError(f"which must be one of {WHICH}, got {which!r}")
    steps = {"unmodified": (plan.baseline, f"unmodified step of {plan.model}"),
             "optimized": (plan.timeline, f"optimized step of {plan.model} ({len(plan.decisions)} decisions)")}
    chosen = [steps["unmodified"], steps["optimized"]] if which == "both" else [steps[which]]
    traces, segments = [], []
    for device, (tl, label) in enumerate(chosen):
        if tl.steps and not tl.storages:
            raise ConfigError(f"this plan of {plan.model} holds no storage lifetimes (it was made by an older "
                              f"fxsketch): make it again with fxsketch.plan or fxsketch.optimize to export it")
        trace, segment = _device(tl, label, device)
        traces.append(trace)
        segments += segment
    return {"segments": segments, "device_traces": traces,
            "fxsketch": {"model": plan.model, "devices": [label for _, label in chosen],
                         "peak_bytes": [tl.peak_bytes for tl, _ in chosen]}}


def write(snap: dict[str, Any], path: str | Path) -> Path:
    """Pickle a snapshot as ``torch.cuda.memory._dump_snapshot`` does (in a protocol the viewer reads)."""
    path = Path(path)
    with path.open("wb") as f:
        pickle.dump(snap, f, protocol=_PROTOCOL)
    return path
