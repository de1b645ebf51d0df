"""Kernel workspace: memory a native kernel allocates and frees inside one op.

No tensor tracker sees it (the fake step, :class:`fxsketch.measurement.LiveStorageTracker`), yet
the process holds it: on CPU oneDNN's convolutions reorder their operands into blocked layouts
(``aten.convolution_backward`` of a VGG-16 224x224 layer at batch 16 holds 392 MiB of them); on
CUDA cuDNN's workspace goes through the caching allocator and counts in
``torch.cuda.max_memory_allocated``. The liveness model adds it per step (a storage of kind
``KERNEL`` alive during that step only, report category "workspace"), so the planner sees it.

Which ops: :data:`KERNEL_OPS` (convolution forward and backward, where measurement showed the gap:
docs/workspace.md). How much, per call signature (op, shapes, dtype, device, arguments), by
``source``:

* ``"measure"``: run the op alone on real random tensors at its shapes, the same for real and
  meta inputs (a shape's workspace is not linear in the batch: oneDNN's 1x1 backward at batch 16
  holds 9x per sample what it holds at 8). A call whose tensors exceed the planning limit (the
  budget, where one is given) runs at the most samples that fit and is scaled by N / b, so
  planning never allocates more than the plan may. On CPU (Linux, glibc) the calls run in a
  measuring process (:class:`_Measurer`, started once and kept: a heap like :func:`run_fresh`'s)
  that returns freed buffers to the OS and reads the peak RSS
  (VmHWM after ``/proc/self/clear_refs``) minus the RSS before the call and the outputs' bytes,
  to the nearest eighth of the call's largest tensor (so page-level noise never changes a plan);
  on CUDA it reads the allocator's peak in this process. Each signature is measured once:
  cached in the process and on disk (``$FXSKETCH_CACHE/workspace.json``, per CPU, thread count
  and torch version).
* ``"formula"``: also where measuring cannot run (no Linux /proc, the measuring process failed),
  a rule fitted to
  oneDNN's CPU measurements: forward ``max(input, output)`` bytes, backward ``input + grad_output``
  bytes (``input`` counted only when dX is asked for: the reorders of what it reads and writes).
* ``"off"``: none (the plan then predicts the tensor-level peak only).
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import math
import os
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Iterable

import torch

from . import diskcache

__all__ = ["Call", "KERNEL_OPS", "SOURCES", "kernel_call", "workspace_bytes", "use_source",
           "current_source", "formula_bytes", "clear_cache", "prestart"]

aten = torch.ops.aten
KERNEL_OPS = {aten.convolution.default: "convolution", aten.convolution_backward.default: "convolution_backward"}
SOURCES = ("measure", "formula", "off")

_source: contextvars.ContextVar[tuple[str, int | None]] = contextvars.ContextVar(
    "fxsketch_workspace_source", default=("off", None))
_CACHE: dict["Call", int] = {}   # a measured run (a call at the shapes it ran) -> workspace bytes


@dataclass(frozen=True)
class Call:
    """One kernel call's signature: what its workspace depends on."""

    op: str
    shapes: tuple[tuple[int, ...] | None, ...]   # the tensor arguments' shapes (None: absent)
    params: tuple                                 # the other arguments (stride, padding, ..., output_mask)
    dtype: str
    device: str                                   # "cpu" or "cuda"
    backend: str                                  # the conv backend chosen at these shapes
    layouts: tuple[str, ...] = ()                 # per tensor argument (:func:`_layout`): kernels copy
                                                  # an expanded or strided operand before using it

    @property
    def batch(self) -> int:
        return self.shapes[self._data][0]

    @property
    def _data(self) -> int:  # the argument that carries the batch (input for both ops)
        return 0 if self.op == "convolution" else 1

    def at_batch(self, b: int) -> "Call":
        """The same call with ``b`` samples (batch-carrying arguments resized)."""
        batched = (0,) if self.op == "convolution" else (0, 1)
        shapes = tuple((b,) + s[1:] if i in batched and s is not None else s for i, s in enumerate(self.shapes))
        return Call(self.op, shapes, self.params, self.dtype, self.device, self.backend, self.layouts)


def current_source() -> str:
    return _source.get()[0]


@contextlib.contextmanager
def use_source(source: str, max_bytes: int | None = None):
    """Within the block, fake steps count kernel workspace from ``source`` (one of :data:`SOURCES`),
    measuring no call whose tensors exceed ``max_bytes`` at full batch (a sub-batch instead)."""
    if source not in SOURCES:
        raise ValueError(f"workspace source must be one of {SOURCES}, got {source!r}")
    token = _source.set((source, max_bytes))
    try:
        yield
    finally:
        _source.reset(token)


def clear_cache(disk: bool = False) -> None:
    """Forget every measured signature in this process (and on disk with ``disk``)."""
    _CACHE.clear()
    if disk:
        with contextlib.suppress(OSError):
            diskcache.cache_path("workspace").unlink()


def _conv_backend(x, w, stride, padding, dilation, transposed, output_padding, groups) -> str:
    try:
        return str(torch._C._select_conv_backend(x, w, None, stride, padding, dilation, transposed,
                                                 output_padding, groups, None)).split(".")[-1]
    except (RuntimeError, TypeError):
        return "unknown"


def kernel_call(func, args) -> Call | None:
    """The signature of a call to one of :data:`KERNEL_OPS`, or None for any other op."""
    op = KERNEL_OPS.get(func)
    if op is None or len(args) != (9 if op == "convolution" else 11):  # aten calls them positionally
        return None
    if op == "convolution":
        x, w, b, *rest = args
        tensors = (x, w, b)
    else:
        gy, x, w, bias_sizes, *rest = args
        tensors = (gy, x, w)
        rest = [bias_sizes, *rest]
    if x.device.type not in ("cpu", "cuda"):
        return None
    conv_args = rest[-6:] if op == "convolution" else rest[1:7]
    params = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in rest)
    shapes = tuple(None if t is None else tuple(t.shape) for t in tensors)
    return Call(op, shapes, params, str(x.dtype).removeprefix("torch."), x.device.type,
                _conv_backend(x, w, *conv_args), tuple(_layout(t) for t in tensors))


def _layout(t) -> str:
    """"expanded" (a zero stride), "contiguous", "channels_last" or "strided" (anything else)."""
    if t is None:
        return "-"
    if t.numel() > 1 and 0 in t.stride():
        return "expanded"
    if t.is_contiguous():
        return "contiguous"
    fmt = _channels_last(t.dim())
    return "channels_last" if fmt is not None and t.is_contiguous(memory_format=fmt) else "strided"


def _element_size(call: Call) -> int:
    return torch.empty((), dtype=getattr(torch, call.dtype)).element_size()


def _channels_last(ndim: int):
    """The channels-last memory format of a 4-d or 5-d tensor (None for other ranks)."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def _nbytes(shape, elem: int) -> int:
    return 0 if shape is None else math.prod(shape) * elem


def _out_shapes(call: Call) -> list[tuple[int, ...]]:
    """Shapes of what the call returns (meta tensors: shapes only)."""
    out = _run(call, "meta")
    return [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def formula_bytes(call: Call) -> int:
    """The documented rule (module docstring) for a call that cannot be measured."""
    elem = _element_size(call)
    if call.op == "convolution":
        (y,) = _out_shapes(call)
        return max(_nbytes(call.shapes[0], elem), _nbytes(y, elem))
    mask = call.params[-1]
    return _nbytes(call.shapes[0], elem) + (_nbytes(call.shapes[1], elem) if mask[0] else 0)


def _tensors_for(call: Call, device: str, generator=None) -> list:
    """Tensors of the call's shapes and layouts (random values; meta: shapes only)."""
    dtype = getattr(torch, call.dtype)
    layouts = call.layouts or ("contiguous",) * len(call.shapes)
    out = []
    for shape, layout in zip(call.shapes, layouts):
        if shape is None:
            out.append(None)
            continue
        if device == "meta":
            out.append(torch.empty(shape, dtype=dtype, device="meta"))
        elif layout == "expanded":  # what a shape-only operand looks like (a stub for dX)
            out.append(torch.randn(1, dtype=dtype, device=device, generator=generator).expand(shape))
        else:
            t = torch.randn(shape, dtype=dtype, device=device, generator=generator)
            fmt = _channels_last(len(shape))
            out.append(t.contiguous(memory_format=fmt) if layout == "channels_last" and fmt else t)
    return out


def _run(call: Call, device: str, tensors=None):
    ts = _tensors_for(call, device) if tensors is None else tensors
    params = [list(p) if isinstance(p, tuple) else p for p in call.params]
    if call.op == "convolution":
        return aten.convolution.default(*ts, *params)
    gy, x, w = ts
    return aten.convolution_backward.default(gy, x, w, *params)


def _outputs_bytes(out) -> int:
    return sum(t.untyped_storage().nbytes() for t in (out if isinstance(out, tuple) else (out,)) if t is not None)


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key] = int(value.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]


def process_peak(fn, warm_up: bool = True, setup=None) -> int:
    """Bytes the process's peak RSS rose above its RSS while ``fn()`` ran (after one warm-up call
    if ``warm_up``; ``setup()`` before each call, outside the measured window: what the previous
    call left, e.g. parameter gradients, must be freed before the RSS is read). Meaningful in a
    process started by :func:`run_fresh` (freed buffers returned to the OS, no other step's freed
    chunks in the heap)."""
    setup = setup or (lambda: None)
    if warm_up:
        setup()
        fn()
    setup()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before, _ = _rss()
    fn()
    return _rss()[1] - before


def can_measure_process() -> bool:
    """Linux /proc (peak RSS and its reset) and glibc: what :func:`process_peak` needs."""
    return os.path.exists("/proc/self/clear_refs") and sys.platform.startswith("linux")


def _measure_here(call: Call) -> int:
    """One call's workspace at its own shapes, measured in this (child) process."""
    g = torch.Generator().manual_seed(0)
    ts = _tensors_for(call, "cpu", g)
    held = {}

    def once():
        out = _run(call, "cpu", ts)
        held["out"] = _outputs_bytes(out)
        del out
    return max(process_peak(once) - held["out"], 0)


def call_bytes(call: Call) -> int:
    """Bytes of a call's arguments and results: what running it alone allocates besides workspace."""
    elem = _element_size(call)
    return sum(_nbytes(s, elem) for s in call.shapes) + sum(_nbytes(s, elem) for s in _out_shapes(call))


def _sub_batch(call: Call, max_bytes: int | None) -> int:
    """All N samples if the call's tensors fit in ``max_bytes`` (None: no limit), else the most
    that do (at least 1)."""
    n = call.batch
    if max_bytes is None or call_bytes(call) <= max_bytes:
        return n
    per_sample = max(call_bytes(call.at_batch(1)), 1)
    return max(1, min(n, max_bytes // per_sample))


def _measure_cpu(runs: list[Call]) -> dict[Call, int] | None:
    """Workspace bytes of each call at its own shapes, measured in this process's measuring
    process (:class:`_Measurer`); None where that cannot run."""
    if not can_measure_process():
        return None
    try:
        values = _MEASURER.ask([_to_json(r) for r in runs])
    except (RuntimeError, ValueError, OSError):
        return None
    return {r: int(v) for r, v in zip(runs, values)}


def _fresh_env() -> dict[str, str]:
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
                OMP_NUM_THREADS=str(torch.get_num_threads()))


class _Measurer:
    """One measuring process (a fresh heap, see :func:`run_fresh`), started at the first call that
    needs measuring and kept for this process's life, so that a plan that meets new signatures
    several times (analysis, calibration batch, each verified rewrite) pays for one start (about
    3 s: importing torch), not one per batch. Requests and answers are one JSON line each."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         env=_fresh_env())
        return self.proc

    def prestart(self) -> None:
        """Start the process now (its start overlaps the caller's tracing)."""
        if can_measure_process():
            with self.lock:
                self._start()

    def ask(self, calls: list[dict], timeout: float = 900) -> list[int]:
        with self.lock:
            proc = self._start()
            try:
                proc.stdin.write(json.dumps(calls) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], timeout)
                line = proc.stdout.readline() if ready else ""
            except OSError:
                line = ""
            if not line:
                self.close()
                raise RuntimeError("the measuring process failed or ran past its time")
            return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None


_MEASURER = _Measurer()
atexit.register(_MEASURER.close)


def run_fresh(args: list[str], stdin: str = "", timeout: float = 900) -> str:
    """stdout of ``python args`` in a fresh process whose glibc returns freed buffers of 64 KiB and
    more to the OS (``MALLOC_MMAP_THRESHOLD_=65536``) with this process's thread count: a heap
    without another step's freed chunks, which peak RSS needs (a chunk already in the heap is
    reused without raising it)."""
    try:
        done = subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, env=_fresh_env(),
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the measuring process ran past {timeout:g} s") from e
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return done.stdout


def _to_json(call: Call) -> dict:
    return dict(op=call.op, shapes=call.shapes, params=call.params, dtype=call.dtype, device=call.device,
                backend=call.backend, layouts=call.layouts)


def _from_json(d: dict) -> Call:
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v
    return Call(d["op"], tuple(None if s is None else tuple(s) for s in d["shapes"]), tup(d["params"]),
                d["dtype"], d["device"], d["backend"], tuple(d["layouts"]))


def _snapped(call: Call, nbytes: float) -> int:
    """A measured workspace to the nearest multiple of an eighth of the call's largest tensor (at
    least 1 MiB): oneDNN's temporaries are copies of its operands, and the page-level noise of
    RSS (~0.1 MiB) must not make two runs plan differently."""
    elem = _element_size(call)
    largest = max(_nbytes(s, elem) for s in [*call.shapes, *_out_shapes(call)])
    quantum = max(largest / 8, 1 << 20)
    return int(round(nbytes / quantum) * quantum)


def _measure_cuda(runs: list[Call]) -> dict[Call, int]:
    """Workspace bytes of each call at its own shapes on the current CUDA device: the allocator's
    peak above what the call's inputs and outputs hold."""
    got = {}
    for r in runs:
        ts = _tensors_for(r, "cuda")
        _outputs_bytes(_run(r, "cuda", ts))  # warm-up: cuDNN's choice of algorithm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = _run(r, "cuda", ts)
        torch.cuda.synchronize()
        got[r] = max(torch.cuda.max_memory_allocated() - before - _outputs_bytes(out), 0)
        del out
    return got


def _disk_key(call: Call) -> str:
    return f"{diskcache.machine_key(torch.device('cpu'))}|{json.dumps(_to_json(call))}"


def _load_disk(calls: list[Call]) -> None:
    known = diskcache.read("workspace")
    for c in calls:
        if c.device == "cpu" and (v := known.get(_disk_key(c))) is not None:
            _CACHE[c] = int(v)


def _store_disk(measured: dict[Call, int]) -> None:
    diskcache.update("workspace", {_disk_key(c): v for c, v in measured.items() if c.device == "cpu"})


def prestart(device: torch.device) -> None:
    """Start the measuring process ahead of need where a plan on ``device`` will measure."""
    if current_source() == "measure" and device.type in ("cpu", "meta"):
        _MEASURER.prestart()


def workspace_bytes(calls: Iterable[Call], source: str | None = None) -> dict[Call, tuple[int, str]]:
    """(bytes, how it was found: "measured" or "formula") per call. Measuring runs each call at
    its sub-batch (:func:`_sub_batch`) unless the caches hold that run, and scales it to the batch."""
    source, max_bytes = _source.get() if source is None else (source, None)
    calls = list(dict.fromkeys(calls))
    if source == "off":
        return {c: (0, "off") for c in calls}
    runs = {c: c.at_batch(_sub_batch(c, max_bytes)) for c in calls} if source == "measure" else {}
    todo = [r for r in dict.fromkeys(runs.values()) if r not in _CACHE]
    _load_disk(todo)
    todo = [r for r in todo if r not in _CACHE]
    if todo:
        cpu = [r for r in todo if r.device == "cpu"]
        cuda = [r for r in todo if r.device == "cuda"]
        measured = (_measure_cpu(cpu) or {}) if cpu else {}
        if cuda and torch.cuda.is_available():
            measured.update(_measure_cuda(cuda))
        _CACHE.update(measured)
        _store_disk(measured)
    got = {}
    for c in calls:
        run = runs.get(c)
        if run is not None and run in _CACHE:
            scaled = _CACHE[run] * c.batch / run.batch
            got[c] = (_snapped(c, scaled) if c.device == "cpu" else int(scaled), "measured")
        else:
            got[c] = (formula_bytes(c), "formula")
    return got


def _child() -> None:
    """The measuring process: one JSON list of calls per stdin line, their workspace bytes as one
    JSON line on stdout each (until stdin closes)."""
    for line in sys.stdin:
        calls = [_from_json(d) for d in json.loads(line)]
        print(json.dumps([_measure_here(c) for c in calls]), flush=True)


if __name__ == "__main__":
    _child()
