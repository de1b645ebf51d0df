"""The memory plan: data (frozen dataclasses) and its renderers (text, JSON, plot, memory_viz).

Renderers only format what the data holds; nothing is recomputed here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

from .passes.liveness import tensor_peak
from .units import format_bytes

__all__ = ["Option", "Decision", "NodeRow", "StorageSpan", "TimelineData", "MemoryPlan"]


class Option(str):
    """The name of an option kind; one object per name, so ``d.option is Option.PROBE`` works for
    the built-in kinds and ``Option("mine")`` for a kind registered later.

    >>> Option("probe") is Option.PROBE, Option.PROBE.value
    (True, 'probe')
    """

    _interned: dict[str, "Option"] = {}

    def __new__(cls, name: str) -> "Option":
        name = str(name)
        if name not in cls._interned:
            cls._interned[name] = super().__new__(cls, name)
        return cls._interned[name]

    @property
    def value(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"Option({str(self)!r})"

    def __reduce__(self):
        return (Option, (str(self),))


Option.KEEP, Option.PROBE, Option.LEAN, Option.RECOMPUTE = (Option(k) for k in ("keep", "probe", "lean", "recompute"))


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one node."""

    node: str                     # the node of the model's graph, or "first..last" of a segment
    option: Option
    detail: str = ""              # e.g. "spatial, r=64 (1/16 of X)" or "segment bn1..relu"
    freed_bytes: int = 0          # at the predicted peak step of the rewritten graph: what the
                                  # node(s) would hold there without this choice, minus what it holds
    extra_time: float = 0.0       # estimated extra step time, fraction of the planned (relaid-out) step
    grad_noise: float = 0.0       # probe noise / SGD noise of this layer's dW (0 if exact)
    rewritten: str = ""           # the node that stands for it in the rewritten graph


@dataclass(frozen=True)
class NodeRow:
    """One line of the per-node table."""

    name: str
    op: str
    target: str
    shape: tuple[int, ...] | None
    output_bytes: int
    saved_bytes: int              # bytes kept for this node's backward, not counting parameters
    freed: str                    # when the output's storage is released, e.g. "backward layer1_0_conv1"
    option: str = "keep"


@dataclass(frozen=True)
class StorageSpan:
    """One storage of the step and the steps it is alive (both inclusive): what the memory_viz
    export turns into an alloc / free pair."""

    owner: str                    # the node whose output it is, a parameter name, or "loss"
    kind: str                     # passes.saved.Kind value: "parameter", "activation", "gradient", ...
    category: str                 # report category: "saved", "transient", "workspace", ...
    nbytes: int
    first: int                    # the step that allocates it (0 for parameters, buffers, inputs)
    last: int                     # the last step that reads it
    kept: bool = False            # alive past the step (parameters, inputs, their gradients, outputs)


@dataclass(frozen=True)
class TimelineData:
    steps: tuple[tuple[str, str], ...]
    live_bytes: tuple[int, ...]
    by_category: tuple[dict[str, int], ...]
    peak_bytes: int
    peak_step: int
    storages: tuple[StorageSpan, ...] = ()  # every storage's lifetime (empty in plans pickled before it was recorded)

    @property
    def tensor_peak_bytes(self) -> int:
        """The peak without kernel workspace: what a tensor-level tracker measures (CPU)."""
        return tensor_peak(self.live_bytes, self.by_category)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one training step (forward, loss, backward), before and after planning.

    ``print(plan)`` shows the summary and the per-node table; ``plan.to_dict()`` is JSON-ready;
    ``plan.save("plan.png")`` (or .svg / .html) draws the timeline; ``plan.save("plan.pickle")``
    writes it as a memory snapshot for https://pytorch.org/memory_viz (:mod:`fxsketch.memory_viz`).
    """

    model: str
    parameter_bytes: int
    input_bytes: int
    baseline: TimelineData
    timeline: TimelineData
    rows: tuple[NodeRow, ...]
    alive_at_peak: tuple[tuple[str, str, int], ...]  # (owner, category, bytes), largest first
    decisions: tuple[Decision, ...] = ()
    budget_bytes: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    cost_estimator: str = ""      # how extra time was estimated: "measured" | "roofline" | ""
    max_grad_noise: float | None = None  # the noise bound the plan kept (None: plan of the unmodified step)
    calibration_batch: int = 0    # samples probe noise was measured on (0: uncalibrated)
    host_live_bytes: tuple[int, ...] = ()  # per step of ``timeline``: offloaded copies in host memory
                                           # (method "offload"), never part of the device figures
    layout_time: float = 0.0      # the relaid-out step (docs/layout.md) against the step as given, minus 1
                                  # (negative: faster); 0 where the layout is as given or not measured

    @property
    def host_peak_bytes(self) -> int:
        """Most bytes of offloaded copies in host memory at once (0 without offload)."""
        return max(self.host_live_bytes, default=0)

    @property
    def extra_time(self) -> float:
        """Estimated extra step time of all decisions together (fraction of the planned, relaid-out
        step; :attr:`overhead` is against the step as given, the layout's change included)."""
        return sum(d.extra_time for d in self.decisions)

    @property
    def overhead(self) -> float:
        """Estimated step time against the step as given, minus 1: the layout's change and the
        decisions' extra time together; what ``max_overhead`` bounds."""
        return (1 + self.layout_time) * (1 + self.extra_time) - 1

    @property
    def baseline_peak_bytes(self) -> int:
        return self.baseline.peak_bytes

    @property
    def peak_bytes(self) -> int:
        return self.timeline.peak_bytes

    @property
    def tensor_peak_bytes(self) -> int:
        """The predicted peak without kernel workspace (``fxsketch.measure``'s tensor level)."""
        return self.timeline.tensor_peak_bytes

    @property
    def peak_step(self) -> int:
        return self.timeline.peak_step

    @property
    def peak_node(self) -> str:
        phase, node = self.timeline.steps[self.timeline.peak_step]
        return f"{phase} {node}"

    @property
    def breakdown(self) -> dict[str, int]:
        return dict(self.timeline.by_category[self.timeline.peak_step])

    # ---- renderers -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for tl in ("baseline", "timeline"):
            d[tl]["steps"] = [list(s) for s in d[tl]["steps"]]
            # one row per storage, its fields named once: a dict each would double the JSON
            d[tl]["storage_fields"] = [f.name for f in fields(StorageSpan)]
            d[tl]["storages"] = [list(astuple(s)) for s in getattr(self, tl).storages]
        d["decisions"] = [{**asdict(x), "option": x.option.value} for x in self.decisions]
        d["extra_time"] = self.extra_time
        d["overhead"] = self.overhead
        d["baseline_peak_bytes"] = self.baseline_peak_bytes
        d["peak_bytes"] = self.peak_bytes
        d["tensor_peak_bytes"] = self.tensor_peak_bytes
        d["peak_node"] = self.peak_node
        d["breakdown"] = self.breakdown
        d["host_peak_bytes"] = self.host_peak_bytes
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    def summary(self) -> str:
        b = self.breakdown
        lines = [
            f"fxsketch memory plan for {self.model}",
            f"  parameters        {format_bytes(self.parameter_bytes):>12}",
            f"  inputs            {format_bytes(self.input_bytes):>12}",
            f"  predicted peak    {format_bytes(self.peak_bytes):>12}  at step {self.peak_step} "
            f"({self.peak_node})",
        ]
        if self.decisions:
            ratio = self.baseline_peak_bytes / max(self.peak_bytes, 1)
            lines.append(f"  unmodified peak   {format_bytes(self.baseline_peak_bytes):>12}  "
                         f"({ratio:.2f}x lower after planning)")
            lines.append(f"  extra step time   {100 * self.extra_time:>11.1f}%  estimated "
                         f"({self.cost_estimator or 'roofline'}), {len(self.decisions)} decisions")
        if self.layout_time:
            lines.append(f"  layout            {100 * self.layout_time:>+11.1f}%  channels_last step against the "
                         f"step as given")
            lines.append(f"  overhead          {100 * self.overhead:>+11.1f}%  estimated against the step as given")
        if self.budget_bytes is not None:
            lines.append(f"  budget            {format_bytes(self.budget_bytes):>12}")
        if self.host_peak_bytes:
            lines.append(f"  host (offloaded)  {format_bytes(self.host_peak_bytes):>12}  peak in host memory, "
                         f"not in the device peak")
        lines.append("  at the peak:  " + ",  ".join(f"{k} {format_bytes(v)}" for k, v in b.items()))
        top = ", ".join(f"{o} ({c}, {format_bytes(n)})" for o, c, n in self.alive_at_peak[:5])
        lines.append(f"  largest alive:  {top}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def decisions_table(self) -> str:
        if not self.decisions:
            return ""
        head = ("node", "option", "detail", "freed at peak", "extra time", "grad noise")
        rows = [(d.node, d.option.value, d.detail, format_bytes(d.freed_bytes),
                 f"{100 * d.extra_time:.1f}%", f"{d.grad_noise:.2f}" if d.grad_noise else "-")
                for d in self.decisions]
        return _table(head, rows)

    def node_table(self) -> str:
        head = ("node", "op", "target", "output shape", "saved for bwd", "freed at", "option")
        rows = [(r.name, r.op, _short(r.target), "x".join(map(str, r.shape)) if r.shape else "-",
                 format_bytes(r.saved_bytes) if r.saved_bytes else "-", r.freed, r.option)
                for r in self.rows]
        return _table(head, rows)

    def render(self, *, nodes: bool = True) -> str:
        """Summary, the decisions, and (with ``nodes``) the per-node table."""
        parts = [self.summary()]
        if self.decisions:
            parts += ["", "decisions:", self.decisions_table()]
        if nodes:
            parts += ["", self.node_table()]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render(nodes=True)

    def to_memory_viz(self, path: str | Path | None = None, which: str = "both") -> dict[str, Any]:
        """The predicted step(s) as a ``torch.cuda.memory._snapshot()`` dict, pickled to ``path``
        if given, for https://pytorch.org/memory_viz. ``which``: "unmodified", "optimized" or
        "both" (device 0 the unmodified step, device 1 the optimized one); docs/memory_viz.md.
        """
        from .memory_viz import snapshot, write
        snap = snapshot(self, which)
        if path is not None:
            write(snap, Path(path))
        return snap

    def save(self, path: str | Path) -> Path:
        """Draw the timeline (live bytes per step, by category) to .png, .svg, .pdf or .html;
        .pickle writes both steps as a memory snapshot instead (:meth:`to_memory_viz`)."""
        path = Path(path)
        if path.suffix.lower() in (".pickle", ".pkl"):
            self.to_memory_viz(path)
            return path
        from ._plot import save_timeline
        return save_timeline(self, path)


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*head), sep] + [fmt.format(*map(str, r)) for r in rows])
