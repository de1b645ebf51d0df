"""Find, empirically, what one training step allocates and what autograd saves for backward.

The graph runs forward, through the loss, and backward on fake tensors (no real memory)
under ``saved_tensors_hooks``; each tensor is resolved to its storage, so views and in-place
results count once. No per-op table: whatever autograd packs is what the node saves.

Writes, per node:
    node.meta["fxsketch.tensor"]  tuple[TensorMeta, ...]  the node's tensor outputs
    node.meta["fxsketch.saved"]   tuple[int, ...]         storages kept for its backward
    node.meta["fxsketch.grad"]    tuple[int | None, ...]  storage of each output's gradient
    node.meta["fxsketch.param_grads"] tuple[int, ...]     parameter-gradient storages it produces
and ``gm.meta["fxsketch.step"]``, a :class:`StepRecord` with the storage table and the loss.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

from .trace import InputError

__all__ = ["Kind", "StorageInfo", "TensorMeta", "StepRecord", "profile_step", "require"]


class Kind(enum.Enum):
    PARAM = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    ACTIVATION = "activation"      # a node's output
    INTERNAL = "internal"          # made inside a node only to be saved (BN statistics, pool indices)
    GRAD = "gradient"              # gradient of an activation (transient)
    PARAM_GRAD = "param_gradient"  # gradient of a parameter or input leaf (kept)


@dataclass(frozen=True)
class StorageInfo:
    id: int
    nbytes: int
    kind: Kind
    owner: str  # node name, parameter name, or "loss"


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    storage: int
    requires_grad: bool


@dataclass
class StepRecord:
    """Graph-level result of :func:`profile_step`."""

    storages: dict[int, StorageInfo] = field(default_factory=dict)
    loss_saved: tuple[int, ...] = ()       # storages the loss function saves
    loss_allocs: tuple[int, ...] = ()      # storages the loss function creates
    output_storages: tuple[int, ...] = ()  # storages of the model's outputs (held through backward)


def require(node_or_gm: Any, key: str, producer: str = "passes.saved.profile_step") -> Any:
    """Read an analysis result, or say which pass must run first."""
    meta = node_or_gm.meta
    if key not in meta:
        where = getattr(node_or_gm, "name", type(node_or_gm).__name__)
        raise RuntimeError(f"{where} has no meta[{key!r}]: run {producer} first")
    return meta[key]


class _Registry:
    """Maps storages to small ids. Keeps every tensor alive so that no storage address is reused."""

    def __init__(self):
        self.ids: dict[int, int] = {}
        self.infos: dict[int, StorageInfo] = {}
        self._keep: list[torch.Tensor] = []

    def find(self, t: torch.Tensor) -> int | None:
        return self.ids.get(t.untyped_storage()._cdata)

    def add(self, t: torch.Tensor, kind: Kind, owner: str) -> int:
        key = t.untyped_storage()._cdata
        if key not in self.ids:
            sid = len(self.ids)
            self.ids[key] = sid
            self.infos[sid] = StorageInfo(sid, t.untyped_storage().nbytes(), kind, owner)
            self._keep.append(t)
        return self.ids[key]


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


class _StepInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, reg: _Registry, param_of: dict[str, torch.Tensor]):
        super().__init__(gm, garbage_collect_values=False)
        self.reg = reg
        self.param_of = param_of
        self.grad_hooks: list[tuple[fx.Node, int, torch.Tensor]] = []

    def run_node(self, n: fx.Node) -> Any:
        packed: list[torch.Tensor] = []

        def pack(t):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            try:
                result = super().run_node(n)
            except Exception as e:
                where = f" (module '{n.target}')" if n.op == "call_module" else ""
                raise InputError(
                    f"the example inputs do not fit the model: node '{n.name}'{where} failed on "
                    f"fake tensors with {type(e).__name__}: {e}"
                ) from e
        metas = []
        kind = {"placeholder": Kind.INPUT}.get(n.op, Kind.ACTIVATION)
        for t in _tensors(result):
            if n.op == "get_attr":
                sid = self.reg.find(t)
                if sid is None:  # a constant tensor attribute: resident like a buffer
                    sid = self.reg.add(t, Kind.BUFFER, str(n.target))
            else:
                sid = self.reg.add(t, kind, n.name)
            metas.append(TensorMeta(tuple(t.shape), t.dtype, sid, t.requires_grad))
            if t.requires_grad:
                self.grad_hooks.append((n, len(metas) - 1, t))
        saved = []
        for t in packed:
            sid = self.reg.find(t)
            if sid is None:
                sid = self.reg.add(t, Kind.INTERNAL, n.name)
            if sid not in saved:
                saved.append(sid)
        n.meta["fxsketch.tensor"] = tuple(metas)
        n.meta["fxsketch.saved"] = tuple(saved)
        return result


def _state(gm: fx.GraphModule, mode: FakeTensorMode) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        state[name] = p
    for name, b in gm.named_buffers(remove_duplicate=False):
        state[name] = b
    fakes: dict[int, torch.Tensor] = {}  # tied parameters stay tied
    out = {}
    for name, t in state.items():
        if id(t) not in fakes:
            f = mode.from_tensor(t)
            if isinstance(t, nn.Parameter) and t.requires_grad and not f.requires_grad:
                f.requires_grad_(True)
            fakes[id(t)] = f
        out[name] = fakes[id(t)]
    return out


def _fake_input(mode: FakeTensorMode, x: torch.Tensor, gm: fx.GraphModule) -> torch.Tensor:
    """A fake copy of ``x``; a meta tensor (shape only, e.g. to plan a batch that does not fit
    here) is placed on the model's device."""
    if x.device.type != "meta":
        return mode.from_tensor(x)
    device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))
    with mode:
        f = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    return f.requires_grad_(x.requires_grad)


class _Runner(nn.Module):
    """Lets torch.func.functional_call swap fake parameters into the traced module."""

    def __init__(self, gm: fx.GraphModule, interp: fx.Interpreter):
        super().__init__()
        self.gm = gm
        self._interp = [interp]  # a list so nn.Module does not register it

    def forward(self, *args):
        return self._interp[0].run(*args)


def profile_step(
    gm: fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    loss_fn: Callable[[Any], torch.Tensor],
) -> StepRecord:
    """Run one fake training step of ``gm`` and annotate its nodes (see the module docstring)."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    reg = _Registry()
    state = _state(gm, mode)
    params = dict(gm.named_parameters(remove_duplicate=False))
    for name, t in state.items():
        reg.add(t, Kind.PARAM if name in params else Kind.BUFFER, name)
    fake_inputs = tuple(_fake_input(mode, x, gm) for x in example_inputs)
    for i, x in enumerate(fake_inputs):
        reg.add(x, Kind.INPUT, f"input{i}")

    interp = _StepInterpreter(gm, reg, state)
    runner = _Runner(gm, interp)
    record = StepRecord()
    leaf_grads: dict[int, int] = {}  # id(fake leaf) -> grad storage

    def leaf_hook(name: str, t: torch.Tensor):
        def hook(g):
            leaf_grads[id(t)] = reg.add(g, Kind.PARAM_GRAD, name)
        return hook

    seen = set()
    leaves = [(n, t) for n, t in state.items() if t.requires_grad]
    leaves += [(f"input{i}", x) for i, x in enumerate(fake_inputs) if x.requires_grad]
    for name, t in leaves:
        if id(t) not in seen:
            seen.add(id(t))
            t.register_hook(leaf_hook(name, t))

    with mode:
        out = torch.func.functional_call(runner, {f"gm.{k}": v for k, v in state.items()}, fake_inputs)
        record.output_storages = tuple(dict.fromkeys(reg.find(t) for t in _tensors(out)))
        node_grads: dict[tuple[str, int], int] = {}
        for n, i, t in interp.grad_hooks:
            if not t.is_leaf:
                def hook(g, key=(n.name, i)):
                    node_grads[key] = reg.add(g, Kind.GRAD, key[0])
                t.register_hook(hook)
        packed: list[torch.Tensor] = []
        known = set(reg.infos)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on any parameter that requires grad: "
                             "nothing to train (check requires_grad and loss_fn)")
        record.loss_allocs = tuple(reg.add(t, Kind.ACTIVATION, "loss") for t in [loss])
        record.loss_saved = tuple(dict.fromkeys(
            (reg.find(t) if reg.find(t) is not None else reg.add(t, Kind.INTERNAL, "loss")) for t in packed))
        record.loss_allocs += tuple(s for s in record.loss_saved if s not in known)
        loss.backward()

    name_of_real = {id(p): name for name, p in params.items()}
    for n in gm.graph.nodes:
        metas = n.meta.get("fxsketch.tensor", ())
        if n.op in ("get_attr", "placeholder"):
            grads = tuple(leaf_grads.get(id(t)) for t in _tensors(interp.env.get(n)))
        else:
            grads = tuple(node_grads.get((n.name, i)) for i in range(len(metas)))
        n.meta["fxsketch.grad"] = grads
        pg: list[int] = []
        if n.op == "call_module":
            for p in gm.get_submodule(n.target).parameters():
                sid = leaf_grads.get(id(state[name_of_real[id(p)]])) if id(p) in name_of_real else None
                if sid is not None and sid not in pg:
                    pg.append(sid)
        n.meta["fxsketch.param_grads"] = tuple(pg)
    record.storages = dict(reg.infos)
    gm.meta["fxsketch.step"] = record
    return record
