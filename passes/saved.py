"""Find, empirically, what one training step allocates and what autograd saves for backward.

The graph runs forward, through the loss, and backward on fake tensors (no real memory)
under ``saved_tensors_hooks``; each tensor is resolved to its storage, so views and in-place
results count once. No per-op table: whatever autograd packs is what the node saves.

Writes, per node:
    node.meta["fxsketch.tensor"]  tuple[TensorMeta, ...]  the node's tensor outputs
    node.meta["fxsketch.saved"]   tuple[int, ...]         storages kept for its backward
    node.meta["fxsketch.grad"]    tuple[int | None, ...]  storage of each output's gradient
and ``gm.meta["fxsketch.step"]``, a :class:`StepRecord` with the storage table and the loss.
"""
from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import InputError, TraceError
from .precision import forward_context
from .reserve import correct_reserve
from .trace import first_line
from .workspace import current_source, kernel_call, workspace_bytes
from ..ops.visible import call_visibly

__all__ = ["Kind", "RESIDENT", "StorageInfo", "TensorMeta", "StepRecord", "profile_step", "require"]


class Kind(enum.Enum):
    PARAM = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    ACTIVATION = "activation"      # a node's output
    INTERNAL = "internal"          # made inside a node only to be saved (BN statistics, pool indices)
    GRAD = "gradient"              # gradient of an activation (transient)
    WORKSPACE = "workspace"        # temporaries inside one step, freed within it
    KERNEL = "kernel workspace"    # memory native kernels hold inside one step (passes.workspace)
    PARAM_GRAD = "param_gradient"  # gradient of a parameter or input leaf (kept)


RESIDENT = (Kind.PARAM, Kind.BUFFER, Kind.INPUT)
"""Kinds alive before the step begins and after it ends: no option frees them."""


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
    stride: tuple[int, ...] | None = None  # the layout (channels_last: fxsketch.ops._args.memory_order)


@dataclass
class StepRecord:
    """Graph-level result of :func:`profile_step`."""

    storages: dict[int, StorageInfo] = field(default_factory=dict)
    loss_saved: tuple[int, ...] = ()       # storages the loss function saves
    loss_allocs: tuple[int, ...] = ()      # storages the loss function creates
    output_storages: tuple[int, ...] = ()  # storages of the model's outputs (held through backward)
    # per (phase, node): most bytes alive at once among storages created within that step;
    # what exceeds the step's accounted allocations is workspace (see liveness.build_schedule)
    step_peaks: dict[tuple[str, str], int] = field(default_factory=dict)
    # per (phase, node): the most bytes alive at once within the step with a kernel's workspace
    # (passes.workspace) during its call; and how each kernel's workspace was found
    kernel_peaks: dict[tuple[str, str], int] = field(default_factory=dict)
    # step -> the kernel calls (passes.workspace.Call) it made: what an option re-running a kernel
    # at other shapes asks the workspace of
    kernel_calls: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # opaque nodes' backward steps: most bytes at once, new storages less the saved ones it freed
    net_peaks: dict[tuple[str, str], int] = field(default_factory=dict)
    # the same steps' kernel peaks net of the saved tensors freed by each call
    net_kernel_peaks: dict[tuple[str, str], int] = field(default_factory=dict)
    kernel_sources: dict[str, int] = field(default_factory=dict)
    # backward as autograd ran it: step order, and each storage it created -> (made in, died in)
    backward_order: tuple[tuple[str, str], ...] = ()
    backward_created: dict[int, tuple[str, str]] = field(default_factory=dict)
    backward_died: dict[int, tuple[str, str]] = field(default_factory=dict)


def require(node_or_gm: Any, key: str, producer: str = "passes.saved.profile_step") -> Any:
    """Read an analysis result, or say which pass must run first."""
    meta = node_or_gm.meta
    if key not in meta:
        where = getattr(node_or_gm, "name", type(node_or_gm).__name__)
        raise RuntimeError(f"{where} has no meta[{key!r}]: run {producer} first")
    return meta[key]


class _Registry:
    """Maps storages to small ids.

    Holds a weak reference per storage: that keeps the StorageImpl's address from being reused
    without keeping the tensor alive — a held gradient would make autograd copy instead of
    steal it (AccumulateGrad, in-place accumulation) and change what is measured.
    """

    def __init__(self):
        self.ids: dict[int, int] = {}
        self.infos: dict[int, StorageInfo] = {}
        self._keep: list[StorageWeakRef] = []

    def find(self, t: torch.Tensor) -> int | None:
        return self.ids.get(t.untyped_storage()._cdata)

    def ref(self, sid: int) -> StorageWeakRef:
        return self._keep[sid]  # ids are handed out in the order storages are added

    def mark(self, t: torch.Tensor, kind: Kind, owner: str) -> int:
        """Register ``t``'s storage, or re-label it if known (a gradient that a leaf keeps)."""
        sid = self.add(t, kind, owner)
        self.infos[sid] = StorageInfo(sid, self.infos[sid].nbytes, kind, owner)
        return sid

    def add(self, t: torch.Tensor, kind: Kind, owner: str) -> int:
        key = t.untyped_storage()._cdata
        if key not in self.ids:
            sid = len(self.ids)
            self.ids[key] = sid
            self.infos[sid] = StorageInfo(sid, t.untyped_storage().nbytes(), kind, owner)
            self._keep.append(StorageWeakRef(t.untyped_storage()))
        return self.ids[key]


class _StepTracker(TorchDispatchMode):
    """Watches the storages that ops create, step by step.

    Ops are attributed to the step set by :meth:`enter` (a forward node by the interpreter, a
    backward node by a pre-hook on its grad_fn). Per step it keeps the most bytes alive at once
    among storages created within the step (what exceeds the step's own allocations is
    workspace: PReLU's per-element weight gradient before its reduction, say). In backward it
    also records, for every storage created, the step that made it and the step in which it
    died: the gradient buffers' true lifetimes, accumulation and aliasing included.
    Storages are held weakly, so a temporary drops out when it dies.
    """

    def __init__(self, reg: _Registry):
        super().__init__()
        self.reg = reg
        self.step: tuple[str, str] = ("forward", "")
        self.order: list[tuple[str, str]] = []
        self.peak: dict[tuple[str, str], int] = {}
        self.kernel_calls: list[tuple[tuple[str, str], int, Any]] = []  # (step, live then, kernel call)
        self.net_peak: dict[tuple[str, str], int] = {}
        self._may_free: list[tuple[StorageWeakRef, int]] = []
        self._kernels = current_source() != "off"
        self.created: dict[int, tuple[str, str]] = {}   # storage id -> backward step that made it
        self.died: dict[int, tuple[str, str]] = {}      # storage id -> backward step it died in
        self._local: dict[int, tuple[StorageWeakRef, int]] = {}
        self._backward: dict[int, StorageWeakRef] = {}
        # every storage seen so far (weakly: the address is not reused while listed); a view of
        # an older storage (a parameter's .t(), say) allocates nothing
        self._seen: dict[int, StorageWeakRef] = {}

    def add_existing(self, tensors) -> None:
        for t in tensors:
            st = t.untyped_storage()
            self._seen.setdefault(st._cdata, StorageWeakRef(st))

    def made_by_an_op(self, t: torch.Tensor) -> bool:
        """Whether an op of the step produced ``t``'s storage (else it came from outside)."""
        return t.untyped_storage()._cdata in self._seen

    def enter(self, step: tuple[str, str], may_free: tuple[int, ...] = ()) -> None:
        """Attribute the next ops to ``step``; ``may_free``: storages (ids) the step may free
        while it runs (an opaque node's saved tensors), followed for its net peak."""
        self._reap()
        self.step = step
        self.order.append(step)
        self._local = {}
        self._may_free = [(self.reg.ref(s), self.reg.infos[s].nbytes) for s in may_free]
        self._may_free = [(r, n) for r, n in self._may_free if not r.expired()]
        if self._may_free:
            self.net_peak.setdefault(step, 0)

    def _reap(self) -> None:
        for sid, ref in list(self._backward.items()):
            if ref.expired():
                self.died[sid] = self.step
                del self._backward[sid]

    def finish(self) -> None:
        self._reap()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = call_visibly(self, func, args, kwargs)  # fxsketch's own custom ops: their workspace too
        out = correct_reserve(func, args, kwargs, out)  # RNN reserve buffers that fake kernels leave empty
        for t in _tensors(out):
            st = t.untyped_storage()
            if st._cdata not in self._seen:
                ref = StorageWeakRef(st)
                self._seen[st._cdata] = ref
                self._local[st._cdata] = (ref, st.nbytes())
                if self.step[0] == "backward":
                    sid = self.reg.add(t, Kind.GRAD, self.step[1])
                    self.created[sid] = self.step
                    self._backward[sid] = ref
        self._local = {k: v for k, v in self._local.items() if not v[0].expired()}
        live = net = sum(n for _, n in self._local.values())
        self.peak[self.step] = max(self.peak.get(self.step, 0), live)
        if self._may_free:
            net = live - sum(n for r, n in self._may_free if r.expired())
            self.net_peak[self.step] = max(self.net_peak[self.step], net)
        if self._kernels and (call := kernel_call(func, args)) is not None:
            self.kernel_calls.append((self.step, live, call, net))
        return out

    def kernel_peaks(self) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[tuple[str, str], int]]:
        """Per step, the most bytes alive within it with a kernel's workspace during its call; how
        many calls' workspace each source gave; and, for the steps that free saved tensors while
        they run (:meth:`enter`'s ``may_free``), the same net of what they had freed by each call."""
        found = workspace_bytes(call for _, _, call, _ in self.kernel_calls)
        peaks: dict[tuple[str, str], int] = {}
        nets: dict[tuple[str, str], int] = {}
        sources: dict[str, int] = {}
        for step, live, call, net in self.kernel_calls:
            nbytes, how = found[call]
            peaks[step] = max(peaks.get(step, 0), live + nbytes)
            if step in self.net_peak:
                nets[step] = max(nets.get(step, 0), net + nbytes)
            sources[how] = sources.get(how, 0) + 1
        return peaks, sources, nets


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


class _StepInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, reg: _Registry, workspace: _StepTracker):
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False  # our errors name the node already; fx's tail is noise
        self.reg = reg
        self.workspace = workspace
        # (node, output index, grad_fn, output_nr): the grad_fn is taken right after the node ran,
        # so an in-place op later on the same tensor does not move it
        self.grad_fns: list[tuple[fx.Node, int, Any, int]] = []
        self.grad_fn_of: dict[str, Any] = {}  # an in-place op changes it: that is no pass-through

    def run_node(self, n: fx.Node) -> Any:
        packed: list[torch.Tensor] = []

        def pack(t):
            packed.append(t)
            return t

        self.workspace.enter(("forward", n.name))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            try:
                result = super().run_node(n)
            except DataDependentOutputException as e:
                where = f" (module '{n.target}')" if n.op == "call_module" else ""
                raise TraceError(
                    f"node '{n.name}'{where} reads tensor values in Python ({e.func}), which fxsketch "
                    f"cannot follow when it plans on fake tensors. Fix: make the forward depend on "
                    f"shapes only, or move the value-dependent code out of the model."
                ) from e
            except Exception as e:
                where = f" (module '{n.target}')" if n.op == "call_module" else ""
                raise InputError(
                    f"the example inputs do not fit the model: node '{n.name}'{where} failed on "
                    f"fake tensors with {type(e).__name__}: {first_line(e)}"
                ) from e
        # a node that returns one of its inputs unchanged (nn.Identity) is that input, for
        # autograd too: it has no backward of its own
        alias = next((a.name for a in n.all_input_nodes if self.env.get(a) is result
                      and getattr(result, "grad_fn", None) is self.grad_fn_of.get(a.name)), None)
        self.grad_fn_of[n.name] = getattr(result, "grad_fn", None)
        n.meta["fxsketch.alias"] = alias if isinstance(result, torch.Tensor) else None
        metas = []
        kind = {"placeholder": Kind.INPUT}.get(n.op, Kind.ACTIVATION)
        for t in _tensors(result):
            if n.op == "get_attr":
                sid = self.reg.find(t)
                if sid is None:  # a constant tensor attribute: resident like a buffer
                    sid = self.reg.add(t, Kind.BUFFER, str(n.target))
            else:
                sid = self.reg.add(t, kind, n.name)
            metas.append(TensorMeta(tuple(t.shape), t.dtype, sid, t.requires_grad, tuple(t.stride())))
            if t.requires_grad and t.grad_fn is not None and n.op not in ("placeholder", "get_attr") \
                    and n.meta["fxsketch.alias"] is None:
                self.grad_fns.append((n, len(metas) - 1, t.grad_fn, t.output_nr))
        saved = []
        if n.op == "call_module" and getattr(self.module.get_submodule(n.target), "keeps_inputs", False):
            # the op protocol of fxsketch.ops.recompute.Recompute: a checkpointed segment keeps its
            # inputs for the replay where saved-tensor hooks do not see them; add them here
            packed = [t for a in n.all_input_nodes for t in _tensors(self.env[a])] + packed
        for t in packed:
            sid = self.reg.find(t)
            if sid is None:
                if not self.workspace.made_by_an_op(t):
                    continue  # a constant from outside the step (a captured tensor): not ours
                sid = self.reg.add(t, Kind.INTERNAL, n.name)
            if sid not in saved:
                saved.append(sid)
        # autograd keeps the pack hook (so this list) until the node's last saved tensor is
        # released: holding the tensors here would keep every one of them to the end of the
        # node's backward, where an opaque node frees them as it goes
        packed.clear()
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
    """Lets the fake parameters be swapped into the traced module (see profile_step)."""

    def __init__(self, gm: fx.GraphModule, interp: fx.Interpreter):
        super().__init__()
        self.gm = gm
        self._interp = [interp]  # a list so nn.Module does not register it

    def forward(self, *args):
        return self._interp[0].run(*args)


@contextlib.contextmanager
def _quiet(name: str):
    """Silence a logger: fake tensors log a traceback for every op that fails on shapes, which
    fxsketch turns into an InputError naming the node."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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

    workspace = _StepTracker(reg)
    workspace.add_existing(list(state.values()) + list(fake_inputs))
    interp = _StepInterpreter(gm, reg, workspace)
    runner = _Runner(gm, interp)
    record = StepRecord()
    leaf_grads: dict[int, int] = {}  # id(fake leaf) -> grad storage

    def leaf_hook(name: str, t: torch.Tensor):
        def hook(g):
            leaf_grads[id(t)] = reg.mark(g, Kind.PARAM_GRAD, name)
        return hook

    seen = set()
    leaves = [(n, t) for n, t in state.items() if t.requires_grad]
    leaves += [(f"input{i}", x) for i, x in enumerate(fake_inputs) if x.requires_grad]
    for name, t in leaves:
        if id(t) not in seen:
            seen.add(id(t))
            t.register_hook(leaf_hook(name, t))

    # The fake parameters stay swapped in through backward too (what torch.func.functional_call
    # does for a forward only): a checkpointed segment replays its forward during backward.
    swap = _reparametrize_module(runner, {f"gm.{k}": v for k, v in state.items()})
    device_type = fake_inputs[0].device.type if fake_inputs else "cpu"
    with mode, workspace, swap, _quiet("torch._subclasses.fake_tensor"):
        with forward_context(device_type):  # the user's autocast, if any (passes.precision)
            out = runner(*fake_inputs)
        record.output_storages = tuple(dict.fromkeys(reg.find(t) for t in _tensors(out)))
        node_grads: dict[tuple[str, int], int] = {}
        by_fn: dict[int, tuple[Any, list[tuple[fx.Node, int, int]]]] = {}
        for n, i, fn, nr in interp.grad_fns:
            by_fn.setdefault(id(fn), (fn, []))[1].append((n, i, nr))
        for fn, users in by_fn.values():
            def prehook(grad_outputs, users=users):
                for n, i, nr in users:
                    g = grad_outputs[nr]
                    if g is not None:
                        node_grads[(n.name, i)] = reg.add(g, Kind.GRAD, n.name)
                node = users[0][0]  # the node that made this grad_fn
                # a node whose backward is several autograd nodes (an opaque module; under
                # autocast, any layer: its weight gradient is cast back to fp32 after its saved
                # inputs are freed) frees what it saved, and its output gradient, as it runs
                frees = tuple(node.meta.get("fxsketch.saved", ())) + tuple(
                    node_grads[(n.name, i)] for n, i, _ in users if (n.name, i) in node_grads)
                workspace.enter(("backward", node.name), frees)
            fn.register_prehook(prehook)
        packed: list[torch.Tensor] = []
        known = set(reg.infos)
        workspace.enter(("loss", "loss"))
        # a loss_fn may hold real tensors (its targets), used in its forward and backward
        mode.allow_non_fake_inputs = True
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            with forward_context(device_type):
                loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not loss.requires_grad:
            raise InputError("the loss does not depend on any parameter that requires grad: "
                             "nothing to train (check requires_grad and loss_fn)")
        record.loss_allocs = tuple(reg.add(t, Kind.ACTIVATION, "loss") for t in [loss])
        # the loss's targets are captured constants (made by no op of the step): not counted
        record.loss_saved = tuple(dict.fromkeys(
            (reg.find(t) if reg.find(t) is not None else reg.add(t, Kind.INTERNAL, "loss"))
            for t in packed if reg.find(t) is not None or workspace.made_by_an_op(t)))
        record.loss_allocs += tuple(s for s in record.loss_saved if s not in known)
        packed.clear()  # as in run_node: let autograd free them when it is done with them
        workspace.enter(("backward", "loss"))
        loss.backward()
        workspace.finish()
        for name, t in leaves:
            # AccumulateGrad keeps a copy in the leaf's layout where the gradient came in another
            # (a conv's dW channels_last beside a contiguous weight); the hook saw the original,
            # which dies in its step: the copy is what the leaf keeps
            g = t.grad
            if g is not None and reg.find(g) is not None and reg.find(g) != leaf_grads.get(id(t)):
                leaf_grads[id(t)] = reg.mark(g, Kind.PARAM_GRAD, name)

    for n in gm.graph.nodes:
        metas = n.meta.get("fxsketch.tensor", ())
        if n.op in ("get_attr", "placeholder"):
            grads = tuple(leaf_grads.get(id(t)) for t in _tensors(interp.env.get(n)))
        else:
            grads = tuple(node_grads.get((n.name, i)) for i in range(len(metas)))
        n.meta["fxsketch.grad"] = grads
    record.storages = dict(reg.infos)
    record.step_peaks = dict(workspace.peak)
    record.kernel_peaks, record.kernel_sources, record.net_kernel_peaks = workspace.kernel_peaks()
    for step, _, call, _ in workspace.kernel_calls:
        record.kernel_calls[step] = record.kernel_calls.get(step, ()) + (call,)
    record.net_peaks = dict(workspace.net_peak)
    record.backward_order = tuple(k for k in workspace.order if k[0] == "backward")
    record.backward_created = dict(workspace.created)
    record.backward_died = dict(workspace.died)
    gm.meta["fxsketch.step"] = record
    return record
