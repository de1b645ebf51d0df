"""Memory liveness of one training step: forward in graph order, the loss, backward in reverse.

The step is a list of :class:`Step` s; each step allocates some storages and reads others.
A storage is alive from the first step that allocates it to the last step that reads it
(pinned storages — parameters, inputs, parameter gradients, the model's outputs — to the end).
This module turns the annotations of :mod:`passes.saved` into such a schedule
(:func:`build_schedule`) and sweeps it (:func:`simulate`). Both are plain Python over
numbers, so the planner can edit a schedule (probe a conv, recompute a segment) and re-simulate.

Rules, matching what autograd does:
  forward  node n  allocates its new output storages; reads its inputs' storages
  loss             allocates the loss and what the loss function saves; reads the outputs
  backward node n  reads what n saved and the gradient of its output; allocates the gradients
                   of its inputs and of the parameters it uses
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import torch.fx as fx

from .saved import Kind, StorageInfo, StepRecord, require
from .sweep import live_bytes

__all__ = ["Step", "Schedule", "Timeline", "build_schedule", "simulate", "Category", "CATEGORIES", "category",
           "tensor_peak"]


class Category(enum.Enum):
    """What a live byte is, in every report field (breakdown, timeline plot, largest alive)."""

    PARAMETERS = "parameters"   # parameters and buffers
    INPUTS = "inputs"
    GRADIENTS = "gradients"     # parameter (and input) gradients, kept to the end of the step
    SAVED = "saved"             # activations and internals that some backward step reads
    TRANSIENT = "transient"     # everything else: activation gradients, step temporaries, unsaved outputs
    WORKSPACE = "workspace"     # native kernels' own memory within one op (passes.workspace)


CATEGORIES = tuple(c.value for c in Category)


@dataclass(frozen=True)
class Step:
    phase: str                   # "forward" | "loss" | "backward" | "recompute"
    node: str                    # fx node name ("loss" for the loss step)
    allocs: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()


@dataclass
class Schedule:
    steps: list[Step]
    storages: dict[int, StorageInfo]
    pinned: set[int] = field(default_factory=set)  # alive from allocation to the end
    # (phase, node) -> bytes the sweep over-counts at that step: an opaque node's backward frees
    # its saved tensors while it runs (measured in passes.saved), the sweep keeps them to its end
    released: dict[tuple[str, str], int] = field(default_factory=dict)

    def copy(self) -> "Schedule":
        return Schedule(list(self.steps), dict(self.storages), set(self.pinned), dict(self.released))

    def new_storage(self, nbytes: int, kind: Kind, owner: str) -> int:
        sid = max(self.storages, default=-1) + 1
        self.storages[sid] = StorageInfo(sid, int(nbytes), kind, owner)
        return sid

    def index(self, phase: str, node: str) -> int:
        for i, s in enumerate(self.steps):
            if s.phase == phase and s.node == node:
                return i
        raise KeyError(f"no {phase} step for node {node!r}")

    def edit(self, i: int, **changes) -> None:
        self.steps[i] = replace(self.steps[i], **changes)


@dataclass(frozen=True)
class Timeline:
    """What :func:`simulate` returns: live bytes at every step and the picture at the peak."""

    steps: tuple[tuple[str, str], ...]          # (phase, node) per step
    live_bytes: tuple[int, ...]
    by_category: tuple[dict[str, int], ...]     # live bytes per category, per step
    peak_bytes: int
    peak_step: int
    alive_at_peak: tuple[int, ...]              # storage ids
    intervals: dict[int, tuple[int, int]]       # storage id -> (first step, last step)
    categories: dict[int, Category] = field(default_factory=dict)  # storage id -> report category

    @property
    def peak_node(self) -> tuple[str, str]:
        return self.steps[self.peak_step]

    @property
    def tensor_peak_bytes(self) -> int:
        """The peak without kernel workspace: what a tensor-level tracker measures (CPU)."""
        return tensor_peak(self.live_bytes, self.by_category)


def tensor_peak(live_bytes, by_category) -> int:
    """Most live bytes at one step less that step's kernel workspace."""
    ws = Category.WORKSPACE.value
    return max((live - cats.get(ws, 0) for live, cats in zip(live_bytes, by_category)), default=0)


def category(info: StorageInfo, read_in_backward: bool) -> Category:
    """The report category of a storage: activations (and internals) that backward reads count as
    saved for their whole life; anything else not resident or a parameter gradient is transient."""
    if info.kind in (Kind.PARAM, Kind.BUFFER):
        return Category.PARAMETERS
    if info.kind is Kind.INPUT:
        return Category.INPUTS
    if info.kind is Kind.PARAM_GRAD:
        return Category.GRADIENTS
    if info.kind is Kind.KERNEL:
        return Category.WORKSPACE
    if info.kind in (Kind.ACTIVATION, Kind.INTERNAL) and read_in_backward:
        return Category.SAVED
    return Category.TRANSIENT


def simulate(schedule: Schedule) -> Timeline:
    """Sweep the schedule; return live bytes per step and what is alive at the peak.

    >>> s = Schedule([Step("forward", "a", allocs=(0,)), Step("forward", "b", allocs=(1,), reads=(0,)),
    ...               Step("backward", "b", reads=(1,))], {0: StorageInfo(0, 8, Kind.ACTIVATION, "a"),
    ...               1: StorageInfo(1, 4, Kind.ACTIVATION, "b")})
    >>> simulate(s).live_bytes
    (8, 12, 4)
    """
    end = len(schedule.steps) - 1
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    backward_reads: dict[int, int] = {}  # last read in backward: a storage alive for backward is "saved"
    for i, step in enumerate(schedule.steps):
        for s in step.allocs:
            first.setdefault(s, i)
            last[s] = max(last.get(s, i), i)
        for s in step.reads:
            first.setdefault(s, i)  # read before any allocation: it existed before the step began
            last[s] = max(last.get(s, i), i)
            if step.phase in ("backward", "recompute"):
                backward_reads[s] = i
    for s, info in schedule.storages.items():
        if info.kind in (Kind.PARAM, Kind.BUFFER, Kind.INPUT):
            first[s] = 0
        if s in schedule.pinned or info.kind in (Kind.PARAM, Kind.BUFFER, Kind.INPUT, Kind.PARAM_GRAD):
            if s in first:
                last[s] = end
    n = len(schedule.steps)
    live = live_bytes(n, ((schedule.storages[s].nbytes, a, last[s]) for s, a in first.items()))
    cats = {s: category(schedule.storages[s], s in backward_reads) for s in first}
    by_cat = _categories(n, schedule, first, last, cats)
    for i, st in enumerate(schedule.steps):
        if (freed := schedule.released.get((st.phase, st.node), 0)) > 0:
            live[i] -= freed
            for c in (Category.SAVED.value, Category.TRANSIENT.value):  # what it frees is one of these
                cut = min(freed, by_cat[i][c])
                by_cat[i][c] -= cut
                freed -= cut
    peak_step = max(range(len(live)), key=live.__getitem__) if live else 0
    alive = tuple(sorted((s for s in first if first[s] <= peak_step <= last[s]),
                         key=lambda s: -schedule.storages[s].nbytes))
    return Timeline(
        steps=tuple((st.phase, st.node) for st in schedule.steps),
        live_bytes=tuple(live),
        by_category=by_cat,
        peak_bytes=live[peak_step] if live else 0,
        peak_step=peak_step,
        alive_at_peak=alive,
        intervals={s: (first[s], last[s]) for s in first},
        categories=cats,
    )


def _categories(n: int, schedule: Schedule, first, last, cats) -> tuple[dict[str, int], ...]:
    per = {c: live_bytes(n, ((schedule.storages[s].nbytes, a, last[s]) for s, a in first.items() if cats[s] is c))
           for c in Category}
    return tuple({c.value: per[c][i] for c in Category} for i in range(n))


def build_schedule(gm: fx.GraphModule) -> Schedule:
    """Turn the annotations of :func:`passes.saved.profile_step` into a :class:`Schedule`."""
    record: StepRecord = require(gm, "fxsketch.step")
    storages = record.storages
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    steps: list[Step] = []
    for n in nodes:
        metas = require(n, "fxsketch.tensor")
        outs = tuple(dict.fromkeys(
            m.storage for m in metas if storages[m.storage].owner == n.name
            and storages[m.storage].kind is Kind.ACTIVATION))
        internal = tuple(s for s in n.meta["fxsketch.saved"] if storages[s].kind is Kind.INTERNAL
                         and storages[s].owner == n.name)
        reads = tuple(dict.fromkeys(m.storage for a in n.all_input_nodes
                                    for m in a.meta["fxsketch.tensor"]))
        steps.append(Step("forward", n.name, allocs=outs + internal, reads=reads))
    steps.append(Step("loss", "loss", allocs=record.loss_allocs,
                      reads=record.output_storages + record.loss_saved))
    # backward in the order autograd ran it; gradient buffers live as observed (made in one
    # step, freed in another: accumulation and pass-through aliasing included)
    made: dict[tuple[str, str], list[int]] = {}
    died: dict[tuple[str, str], list[int]] = {}
    for sid, key in record.backward_created.items():
        if record.backward_died.get(sid) == key:
            continue  # a temporary of one step: the step's workspace accounts for it
        made.setdefault(key, []).append(sid)
        if sid in record.backward_died:
            died.setdefault(record.backward_died[sid], []).append(sid)
    by_name = {n.name: n for n in nodes}
    for key in dict.fromkeys(record.backward_order):
        phase, name = key
        saved = record.loss_saved if name == "loss" else by_name[name].meta["fxsketch.saved"]
        steps.append(Step("backward", name, allocs=tuple(made.get(key, ())),
                          reads=tuple(saved) + tuple(died.get(key, ()))))
    schedule = Schedule(steps, dict(storages), set(record.output_storages))
    _add_workspace(schedule, record.step_peaks, record.kernel_peaks, record.net_peaks, record.net_kernel_peaks)
    return schedule


def _add_workspace(schedule: Schedule, step_peaks: dict[tuple[str, str], int],
                   kernel_peaks: dict[tuple[str, str], int],
                   net_peaks: dict[tuple[str, str], int] | None = None,
                   net_kernel_peaks: dict[tuple[str, str], int] | None = None) -> None:
    """Give each step a workspace storage for what its ops held beyond the step's new storages,
    and a kernel-workspace storage for what its kernels held beyond that; where ``net_peaks``
    has the step (an opaque node's backward: its most bytes at once net of the saved tensors
    it freed), what the sweep will over-count there goes to ``schedule.released``."""
    seen: set[int] = set()
    for i, step in enumerate(schedule.steps):
        new = [s for s in step.allocs if s not in seen]
        seen.update(step.allocs)
        accounted = sum(schedule.storages[s].nbytes for s in new)
        key = (step.phase, step.node)
        extra = step_peaks.get(key, 0) - accounted
        if extra > 0:
            ws = schedule.new_storage(extra, Kind.WORKSPACE, step.node)
            schedule.edit(i, allocs=schedule.steps[i].allocs + (ws,))
        if net_peaks and key in net_peaks:
            # a kernel's workspace comes at its call, net of what the step had freed by then (all
            # of it before any free, for one opaque op; a micro-batched segment frees chunk by chunk)
            kpeak = kernel_peaks.get(key, 0)
            knet = (net_kernel_peaks or {}).get(key, kpeak)
            schedule.released[key] = max(accounted, step_peaks.get(key, 0), kpeak) - max(net_peaks[key], knet)
        kernel = kernel_peaks.get(key, 0) - max(accounted, step_peaks.get(key, 0))
        if kernel > 0:
            ks = schedule.new_storage(kernel, Kind.KERNEL, step.node)
            schedule.edit(i, allocs=schedule.steps[i].allocs + (ks,))
