"""The option registry: every way of changing a node besides keeping it is one class in one file here.

An option kind says
  * where it applies and what it does to the liveness model, as solver :class:`Choice` s
    (storages it releases, storages it adds and when, extra time, gradient noise), paired with
    the :class:`Candidate` the rewrite needs: :meth:`OptionKind.node_choices` per node, or
    :meth:`OptionKind.graph_choices` for options that span nodes;
  * how it rewrites the graph: :meth:`OptionKind.rewrite`.
Its runtime op's fake-tensor behaviour lives with the op (``torch.library`` fake kernels in
:mod:`fxsketch.ops`), so planning needs no special case for it. The solver never sees kinds.

Adding a kind is adding a file: subclass :class:`OptionKind`, decorate it with :func:`register`,
import the module (the built-ins are imported below).

>>> sorted(registered())
['aop', 'chunk', 'dfa', 'dfa-plain', 'lean', 'microbatch', 'offload', 'probe', 'quant', 'recompute']
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from ..cost import CostModel
from ..liveness import Schedule, Timeline
from ..saved import Kind
from ..solve import Choice, Saved

__all__ = ["Candidate", "OptionKind", "OptionSettings", "ProposalContext", "RewriteContext",
           "register", "unregister", "registered", "get", "default_methods"]


@dataclass(frozen=True)
class Candidate:
    """One option of one node (or one segment), as the rewrite pass needs it."""

    kind: str                       # the registered kind's name
    nodes: tuple[str, ...]          # the node, or the segment's nodes in order
    params: dict[str, Any] = field(default_factory=dict)
    detail: str = ""                # one line for the report, e.g. "spatial, r=16 (0.0625 of X)"


@dataclass(frozen=True)
class OptionSettings:
    """The planning settings option kinds read (from :class:`fxsketch.Config`)."""

    ratios: tuple[float, ...] = (1 / 4, 1 / 16, 1 / 64)
    probe_rank: int | None = None
    mode: str = "spatial"
    probe: str = "gaussian"
    max_grad_noise: float = 1.0
    noise: Mapping[str, Any] | None = None   # node name -> calibrated ConvNoise
    aop_k: float = 0.5                       # Mem-AOP-GD: fraction of outer products kept
    aop_policy: str = "topk"                 # Mem-AOP-GD: "topk", "weighted" or "uniform"
    aop_decay: float = 1.0                   # Mem-AOP-GD: memory decay per step (0: no memory)
    aop_layers: str = "auto"                 # Mem-AOP-GD: "auto" (where the solver wants it) or "all"
    offload: str = "auto"                    # offload: "auto" (CUDA), "on" (any device) or "off"
    offload_bandwidth: float = 50e9          # offload: host<->device bytes/s (PCIe Gen5 x16, measured-like)
    offload_nodes: tuple[str, ...] | None = None  # offload: exactly these nodes (required), None: the solver's pick
    quant_inputs: str = "all"                # quant: "all" (norms' and convs' inputs) or "norms"
    chunked_replays: bool = True             # recompute: per-sample segments also replayed in batch chunks


@dataclass
class ProposalContext:
    """What an option kind may read to describe its choices on the unmodified step."""

    gm: fx.GraphModule
    schedule: Schedule
    timeline: Timeline
    nodes: list[fx.Node]              # graph order, output node left out
    fwd: dict[str, int]               # node name -> its forward step
    bwd: dict[str, int]               # node name -> its backward step
    cost: CostModel
    saved: list[Saved]                # the problem's table of storages whose life choices change
    saved_index: dict[int, int]       # storage id -> index into ``saved``
    settings: OptionSettings
    node_pairs: dict[str, list[tuple[Choice, Candidate]]] = field(default_factory=dict)
    """Node name -> the single-node choices every enabled kind offers for it (filled before any
    :meth:`OptionKind.graph_choices` runs: a replay may use them inside its segment)."""

    def own_saved(self, n: fx.Node) -> list[int]:
        """Storages ``n`` saves for backward whose life a choice can change."""
        return [s for s in n.meta.get("fxsketch.saved", ()) if s in self.saved_index]

    def input_storage(self, n: fx.Node, i: int = 0) -> int | None:
        arg = n.all_input_nodes[i] if len(n.all_input_nodes) > i else None
        metas = arg.meta.get("fxsketch.tensor", ()) if arg is not None else ()
        return metas[0].storage if metas else None

    def module(self, n: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(n.target) if n.op == "call_module" else None

    @cached_property
    def device(self) -> torch.device:
        """The device the step runs on: its parameters' (the CPU for a meta model, or none)."""
        device = next((p.device for p in self.gm.parameters()), torch.device("cpu"))
        return torch.device("cpu") if device.type == "meta" else device

    @cached_property
    def kernel_bytes(self) -> dict[int, int]:
        """Step -> kernel workspace bytes the unmodified step holds at it (passes.workspace)."""
        out: dict[int, int] = {}
        for s, (a, b) in self.timeline.intervals.items():
            if self.schedule.storages[s].kind is Kind.KERNEL:
                for t in range(a, b + 1):
                    out[t] = out.get(t, 0) + self.schedule.storages[s].nbytes
        return out


@dataclass
class RewriteContext:
    """The graph being rewritten, and what kinds need to emit into it."""

    model: nn.Module
    gm: fx.GraphModule                # the new module (its graph is ``gm.graph``)
    by_name: dict[str, fx.Node]       # node name -> node, of the new graph
    generator: str | None = None      # attribute name of the probes' private torch.Generator
    counter: Any = field(default_factory=itertools.count)  # unique suffixes for submodules
    standing: dict[str, fx.Node] = field(default_factory=dict)  # a replaced node's name -> what stands for it
    items: dict[str, fx.Node] = field(default_factory=dict)  # an output of a multi-output cut -> its getitem

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def replace(self, old: fx.Node, new: fx.Node) -> fx.Node:
        """Make ``new`` stand for ``old`` everywhere and drop ``old`` (its scope meta moves over, and
        its tensor meta: ``new`` computes the same value)."""
        new.meta.update({k: v for k, v in old.meta.items() if k.startswith("fxsketch.scope") or k == "fxsketch.tensor"})
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)
        self.by_name.pop(old.name, None)
        self.by_name[new.name] = new
        self.standing[old.name] = new
        return new


class OptionKind:
    """Base class of an option kind; subclasses set ``name`` and override what applies."""

    name: ClassVar[str] = ""
    default: ClassVar[bool] = False      # among the methods used when the user names none
    spans_nodes: ClassVar[bool] = False  # rewritten after every single-node replacement
    uses_rng: ClassVar[bool] = False     # its op draws from the probes' generator (``seed=``)
    whole_graph: ClassVar[bool] = False  # replaces backprop over the whole graph (dfa): used alone
    in_replays: ClassVar[bool] = False   # its node choices may apply inside a replayed segment

    def node_choices(self, ctx: ProposalContext, n: fx.Node) -> Iterable[tuple[Choice, Candidate]]:
        """The choices this kind offers for node ``n`` (none by default)."""
        return ()

    def graph_choices(self, ctx: ProposalContext) -> Iterable[tuple[Choice, Candidate]]:
        """Choices that span several nodes, offered once per graph (none by default)."""
        return ()

    def rewrite(self, rw: RewriteContext, cand: Candidate) -> fx.Node:
        """Emit ``cand`` into ``rw.graph``; return the node that now stands for it."""
        raise NotImplementedError(f"option kind {self.name!r} has no rewrite")

    def label(self, cand: Candidate) -> str:
        """The node table's option column for ``cand`` (the kind's name by default)."""
        return self.name


_REGISTRY: dict[str, OptionKind] = {}


def register(cls: type[OptionKind]) -> type[OptionKind]:
    """Class decorator: make the kind ``cls.name`` available to ``methods=`` and the planner."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a class attribute `name`")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> dict[str, OptionKind]:
    """Name -> kind, in registration order (which is also the order choices are offered in)."""
    return dict(_REGISTRY)


def get(name: str) -> OptionKind:
    if name not in _REGISTRY:
        raise KeyError(f"no option kind {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def default_methods() -> tuple[str, ...]:
    return tuple(name for name, kind in _REGISTRY.items() if kind.default)


from . import probe, lean, recompute, dfa  # noqa: E402,F401  (the built-in kinds register themselves)
from . import aop  # noqa: E402,F401  (Mem-AOP-GD: registered, not a default method)
from . import quant  # noqa: E402,F401  (norm inputs saved in 8 or 4 bits)
from . import offload  # noqa: E402,F401  (saved activations to host memory; offered on CUDA)
from . import chunk  # noqa: E402,F401  (conv backward chunk by chunk: a fraction of its workspace)
from . import microbatch  # noqa: E402,F401  (per-sample segments run a batch chunk at a time)
