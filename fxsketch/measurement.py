"""Measure the real memory and time of one training step, the ground truth the planner is checked against.

The step measured is exactly the procedure that ``passes/liveness.py`` simulates::

    out = model(*example_inputs)
    loss = loss_fn(out)          # default_loss: sum of .sum() of every floating-point output
    loss.backward()              # `out` and `loss` are still referenced until backward returns

Peak memory counts every tensor byte alive at once: parameters, buffers, inputs, activations,
saved tensors, gradients. On CUDA it is read from the caching allocator; on CPU it comes from
``LiveStorageTracker``, an exact count of live tensor storages (not process RSS, which mixes in
the allocator's caching and the interpreter).

The two sources differ slightly: the CUDA allocator rounds blocks up to 512 B and sees kernel
workspaces (cuBLAS, cuDNN), which the CPU tracker cannot see (see LiveStorageTracker).

>>> m = measure(torch.nn.Linear(4, 3), torch.randn(2, 4))
>>> print(m)  # doctest: +SKIP
peak 184 B on cpu (resident 92 B + 92 B during the step), 188 µs per step
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ._state import preserved
from .errors import ConfigError, InputError
from .ops.offload import HOST
from .ops.visible import call_visibly
from .passes.precision import forward_context, use_autocast
from .passes.trace import check_inputs
from .passes.workspace import can_measure_process, process_peak, run_fresh
from .units import format_bytes

__all__ = ["measure", "Measurement", "default_loss", "LiveStorageTracker"]

log = logging.getLogger(__name__)  # "fxsketch.measurement": each measure() at INFO; it never prints


# --------------------------------------------------------------------------------------------
# default loss


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor in a tensor or nested tuple/list/dict, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list, dict)):
        for item in (obj.values() if isinstance(obj, dict) else obj):
            yield from _tensors_in(item)


def _floating_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Every floating-point tensor in a tensor or nested tuple/list/dict, in a stable order."""
    return (t for t in _tensors_in(obj) if t.is_floating_point())


def default_loss(output: Any) -> torch.Tensor:
    """The scalar backpropagated when no ``loss_fn`` is given: ``sum(t.sum() for t in floats)``.

    Every floating-point tensor of ``output`` (a tensor, or nested tuple/list/dict of them) gets
    gradient ones, which exercises the whole backward graph like a real loss would.

    >>> default_loss({"a": torch.ones(2), "b": (torch.ones(3), torch.arange(4))})
    tensor(5.)
    """
    parts = [t.sum() for t in _floating_tensors(output)]
    if not parts:
        raise InputError(
            f"the model returned no floating-point tensor (got {type(output).__name__}), so there "
            "is nothing to backpropagate by default; pass loss_fn=... to measure(), a function "
            "from the model's output to a scalar tensor"
        )
    total = parts[0]
    for part in parts[1:]:  # a loop, not torch.stack: no extra buffer, and dtypes may differ
        total = total + part
    return total


# --------------------------------------------------------------------------------------------
# exact live-storage tracker (CPU, or any device whose ops go through the dispatcher)


def _storage_of(t: torch.Tensor):
    """The tensor's real untyped storage, or None where there is no memory to count."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        # Wrapper subclasses, sparse and nested tensors have no single plain storage.
        return None
    # Fake and meta tensors own no memory (a FakeTensor reports device 'cpu' but its storage is meta).
    if storage.device.type == "meta" or storage.nbytes() == 0:
        return None
    return storage


class LiveStorageTracker(TorchDispatchMode):
    """Count the bytes of tensor storages alive after every op; keep the maximum.

    Each storage an op returns is registered once (keyed by its StorageImpl, so views and
    in-place results count once) through a *weak* reference: the tracker never extends a
    lifetime. After each op the live bytes are the resident storages plus the registered
    storages not yet freed. That moment, right after the op returns, is when the op's inputs
    (still referenced by the caller) and its outputs coexist: the peak for that op.

    Backward ops are seen too: the autograd engine carries the dispatch-mode stack into the
    thread that runs backward.

    >>> x = torch.randn(1000)                       # 4000 B
    >>> with LiveStorageTracker([x], record=True) as tr:
    ...     z = (x * 2) * 3
    >>> tr.peak_bytes, tr.timeline
    (12000, [('aten::mul.Tensor', 8000), ('aten::mul.Tensor', 12000)])

    What it cannot see: memory a native kernel allocates and frees inside one op (workspaces,
    temporaries of composite kernels below the dispatcher), allocator rounding and caching,
    tensors created outside any dispatched op (``torch.from_numpy``), and storages that existed
    before tracking but were not passed as ``resident`` until an op returns a view of them.
    """

    def __init__(self, resident: Iterable[torch.Tensor] = (), *, record: bool = False):
        super().__init__()
        self.record = record
        self.timeline: list[tuple[str, int]] = []
        self.resident_bytes = 0
        self.peak_bytes = 0
        # key (StorageImpl address) -> (weak ref, nbytes). The weak ref keeps the StorageImpl's
        # own memory allocated, so its address cannot be reused by another storage while listed.
        self._resident: dict[int, StorageWeakRef] = {}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._live_sum = 0  # bytes in self._live, expired entries included until dropped
        self.add_resident(resident)

    def add_resident(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count these tensors' storages as alive for the whole tracked region (each once)."""
        for t in tensors:
            storage = _storage_of(t)
            if storage is None or storage._cdata in self._resident:
                continue
            self._resident[storage._cdata] = StorageWeakRef(storage)
            self.resident_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    @property
    def live_bytes(self) -> int:
        """Bytes alive now: resident plus registered storages that have not been freed."""
        self._drop_expired()
        return self.resident_bytes + self._live_sum

    def _drop_expired(self) -> None:
        # A scan over the registered storages: a few hundred for a ResNet step, cheap beside
        # the ops. Storages have no weakref callbacks, so expiry is found by polling.
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self._live_sum -= self._live.pop(key)[1]

    def _register(self, out: Any) -> bool:
        """Register the output storages; True if the live bytes may have grown."""
        grew = False
        for t in _tensors_in(out):
            storage = _storage_of(t)
            if storage is None:
                continue
            key = storage._cdata
            if key in self._resident or HOST.is_host(storage):
                continue  # an offloaded host copy is not device memory (fxsketch.ops.offload.HOST counts it)
            nbytes = storage.nbytes()
            entry = self._live.get(key)
            if entry is None:
                self._live[key] = (StorageWeakRef(storage), nbytes)
                self._live_sum += nbytes
                grew = True
            elif entry[1] != nbytes:  # resize_ / out= ops can grow a storage in place
                self._live[key] = (entry[0], nbytes)
                self._live_sum += nbytes - entry[1]
                grew = grew or nbytes > entry[1]
        return grew

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = call_visibly(self, func, args, kwargs)  # fxsketch's own custom ops: inside counted too
        grew = self._register(out)
        # Live bytes only rise when a storage appears, so without a timeline the scan is skipped
        # for views and in-place ops.
        if grew or self.record:
            live = self.live_bytes
            self.peak_bytes = max(self.peak_bytes, live)
            if self.record:
                self.timeline.append((func.name() if hasattr(func, "name") else str(func), live))
        return out


# --------------------------------------------------------------------------------------------
# measure()


def _seconds_text(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


@dataclass(frozen=True)
class Measurement:
    """What one real training step (forward, loss, backward) costs.

    >>> print(Measurement(peak_bytes=3 << 20, seconds=0.0042, device="cpu", resident_bytes=1 << 20))
    peak 3.00 MiB on cpu (resident 1.00 MiB + 2.00 MiB during the step), 4.20 ms per step
    """

    peak_bytes: int
    """Most tensor bytes alive at once during the step, resident ones included."""
    seconds: float
    """Median wall time of forward+loss+backward, untracked, after one warm-up step."""
    device: str
    """Where the step ran, e.g. ``'cpu'`` or ``'cuda:0'``."""
    resident_bytes: int
    """Parameters + buffers + inputs, each storage once: alive before the step begins."""
    process_peak_bytes: int | None = None
    """With ``level="process"``: resident bytes + how far the process's memory rose during the
    step (CPU: peak RSS; CUDA: the allocator's peak, kernel workspace included). None otherwise."""
    host_peak_bytes: int = 0
    """Most bytes of offloaded copies in host memory at once during the step (method "offload",
    :data:`fxsketch.ops.offload.HOST`), apart from ``peak_bytes`` even on a CPU."""

    def __str__(self) -> str:
        process = ("" if self.process_peak_bytes is None
                   else f"; process level {format_bytes(self.process_peak_bytes)}")
        if self.host_peak_bytes:
            process += f"; host memory (offloaded) {format_bytes(self.host_peak_bytes)}"
        return (
            f"peak {format_bytes(self.peak_bytes)} on {self.device} "
            f"(resident {format_bytes(self.resident_bytes)} + "
            f"{format_bytes(self.peak_bytes - self.resident_bytes)} during the step{process}), "
            f"{_seconds_text(self.seconds)} per step"
        )


def _device_of(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.device:
    """The CUDA device if any parameter, buffer or input is on one, else CPU."""
    for t in (*inputs, *model.parameters(), *model.buffers()):
        if t.device.type == "cuda":
            return t.device if t.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = _storage_of(t)
        if storage is not None:
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def _step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], loss_fn: Callable) -> None:
    """One training step; `out` and `loss` stay referenced until backward returns (the planner's model)."""
    with torch.enable_grad():  # a caller's no_grad() must not turn the step into inference
        with forward_context(_device_of(model, inputs).type):  # measure(autocast=...): as trained
            out = model(*inputs)
            loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError(
                f"loss_fn must return a scalar tensor, got "
                f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else f'shape {tuple(loss.shape)}'}"
            )
        if not loss.requires_grad:
            raise InputError(
                "the loss does not require grad: no parameter of the model requires grad and no "
                "input does, so there is no backward to measure; check requires_grad"
            )
        loss.backward()
    del out, loss


def _clear_grads(params: list[torch.nn.Parameter], inputs: tuple[torch.Tensor, ...]) -> None:
    # Each step must start from grad=None so it allocates its gradients like the first step of training.
    for t in (*params, *inputs):
        t.grad = None


def measure(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    repeat: int = 3,
    level: str = "tensor",
    autocast: torch.dtype | None = None,
) -> Measurement:
    """Run real training steps of ``model`` and report peak tensor memory and median step time.

    The step is ``out = model(*example_inputs); loss = loss_fn(out); loss.backward()``, with
    ``out`` and ``loss`` held until backward has finished (what the planner simulates). One
    warm-up step runs first, then one step measures memory (tracked on CPU, allocator statistics
    on CUDA), then ``repeat`` untracked steps are timed.

    ``level="process"`` also measures what the process uses, kernel workspace included, as
    :attr:`Measurement.process_peak_bytes`. On CPU (Linux) the step runs in a fresh process
    (model, inputs and loss_fn pickled to it) whose glibc returns freed buffers of 64 KiB and
    more to the OS (``MALLOC_MMAP_THRESHOLD_=65536``): a warm-up step, the peak RSS reset
    (``/proc/self/clear_refs``), the step; resident bytes + VmHWM - VmRSS before the step. (In a
    process that already trained, freed heap chunks are reused without raising the RSS.) On CUDA
    it is the allocator's peak (cuDNN workspace goes through it).

    ``autocast=torch.bfloat16`` (or float16) runs the forward and the loss under
    ``torch.autocast``, as a mixed-precision training step does.

    The model is left as it was: parameter ``.grad``s, buffers (BatchNorm running statistics),
    train/eval flags and the CPU/CUDA random streams are restored. Inputs are detached first,
    so backward never reaches into the caller's graph.

    >>> import torchvision
    >>> print(measure(torchvision.models.resnet18(), torch.randn(8, 3, 64, 64)))  # doctest: +SKIP
    peak 100.03 MiB on cpu (resident 45.00 MiB + 55.02 MiB during the step), 280.70 ms per step
    """
    with use_autocast(autocast):
        return _measure(model, example_inputs, loss_fn, repeat, level, autocast)


def _measure(model, example_inputs, loss_fn, repeat: int, level: str, autocast) -> Measurement:
    inputs = check_inputs(model, example_inputs)
    if not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"repeat must be a positive int (number of timed steps), got {repeat!r}")
    if level not in ("tensor", "process"):
        raise ConfigError(f"level must be 'tensor' (live tensor bytes) or 'process' (what the process "
                          f"uses, kernel workspace included), got {level!r}")
    loss_fn = default_loss if loss_fn is None else loss_fn
    # Fresh leaves sharing the caller's storage: input grads land on them, not on the caller's tensors.
    inputs = tuple(x.detach().requires_grad_(x.requires_grad and x.is_floating_point()) for x in inputs)

    device = _device_of(model, inputs)
    params = list(model.parameters())
    buffers = [(mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items() if buf is not None]
    resident = [*params, *(buf for _, _, buf in buffers), *inputs]
    resident_bytes = _storage_bytes(resident)

    rng_devices = [device.index] if device.type == "cuda" else []
    with preserved(model, grads=True), torch.random.fork_rng(devices=rng_devices, device_type="cuda"):
        _clear_grads(params, inputs)
        _step(model, inputs, loss_fn)  # warm-up: lazy init, cuBLAS/cuDNN handles, allocator
        _clear_grads(params, inputs)
        HOST.reset_peak()
        host_before = HOST.live_bytes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            _step(model, inputs, loss_fn)
            torch.cuda.synchronize(device)
            # Resident tensors were allocated before `before` was read; add them back once.
            peak = torch.cuda.max_memory_allocated(device) - before + resident_bytes
        else:
            with LiveStorageTracker(resident) as tracker:
                _step(model, inputs, loss_fn)
            peak = tracker.peak_bytes
        host_peak = HOST.peak_bytes - host_before
        times = []
        for _ in range(repeat):
            _clear_grads(params, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _step(model, inputs, loss_fn)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        process = None
        if level == "process":
            _clear_grads(params, inputs)
            process = int(peak) if device.type == "cuda" else _process_peak(model, inputs, loss_fn, resident_bytes,
                                                                              autocast)
    m = Measurement(
        peak_bytes=int(peak),
        seconds=statistics.median(times),
        device=str(device),
        resident_bytes=int(resident_bytes),
        process_peak_bytes=process,
        host_peak_bytes=int(host_peak),
    )
    log.info("measure %s: %s", type(model).__name__, m)
    return m


def _process_peak(model, inputs, loss_fn, resident_bytes: int, autocast=None) -> int:
    """Resident bytes + the rise of peak RSS during one step, in a fresh process (see :func:`measure`)."""
    if not can_measure_process():
        raise ConfigError("level='process' needs Linux (/proc) on CPU")
    with tempfile.TemporaryDirectory(prefix="fxsketch-") as tmp:
        path = os.path.join(tmp, "step.pt")
        try:
            torch.save((model, inputs, loss_fn, autocast), path)
        except Exception as e:  # pickling: a lambda loss_fn, a module holding a lock...
            raise ConfigError(f"level='process' runs the step in a fresh process, so the model, inputs and "
                              f"loss_fn must pickle (a module-level loss function, not a lambda): "
                              f"{type(e).__name__}: {e}") from None
        out = run_fresh(["-m", __name__, path])
    return resident_bytes + int(out.split()[-1])


def _child(path: str) -> None:
    """The process-level step: load (model, inputs, loss_fn), warm up, print the rise of peak RSS."""
    model, inputs, loss_fn, autocast = torch.load(path, weights_only=False)
    params = list(model.parameters())
    with use_autocast(autocast):
        print(process_peak(lambda: _step(model, inputs, loss_fn), setup=lambda: _clear_grads(params, inputs)))


if __name__ == "__main__":
    import sys
    _child(sys.argv[1])
