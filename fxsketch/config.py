"""Options of :func:`fxsketch.optimize`, validated in one place."""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError
from .ops.aop import check_aop
from .passes.precision import check_dtype, use_autocast
from .passes.workspace import SOURCES as WORKSPACE_SOURCES, use_source as use_workspace_source
from .ops.probes import MODES, PROBES
from .passes import options as _options
from .passes.options import OptionSettings
from .passes.solve import SolverOptions
from .units import parse_bytes

__all__ = ["Config", "METHODS", "resolve_budget"]

MEMORY_FORMATS = ("auto", "preserve", "channels_last")
"""Values of ``Config.memory_format``."""
METHODS = _options.default_methods()
"""The built-in option kinds, the default of ``methods``."""

_REPLACED = {"solver_time_limit": "solver_max_nodes", "plan_time_limit": "plan_max_nodes"}
"""Options that are gone, and what took their place (for the error on an unknown option)."""


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


@dataclass(frozen=True)
class Config:
    """How :func:`fxsketch.optimize` plans. Every field has a safe default."""

    budget: int | float | str | None = None
    """Peak bytes allowed: an int, a string such as "3.5GiB" or "800MB", or a float in (0, 1]
    meaning that fraction of the unmodified predicted peak. None: the lowest peak reachable
    within ``max_overhead``."""
    methods: tuple[str, ...] = METHODS
    """Which option kinds the planner may use: any registered kind ("probe", "lean", "recompute",
    and any added with :func:`fxsketch.passes.options.register`). "dfa" (MEM-DFA) and "dfa-plain"
    (plain DFA) replace backpropagation over the whole graph and are used alone (fxsketch/dfa.py)."""
    max_overhead: float = 0.2
    """Estimated extra step time allowed when ``budget`` is None: a fraction of the step as given
    (``overhead_against``), the layout's change and the options' extra time together."""
    overhead_against: str = "given"
    """What ``max_overhead`` and ``MemoryPlan.overhead`` measure against where the planned step is
    relaid out (``memory_format``): "given" (default), the step as the user runs it, as the
    reduction is (the layout's change measured on whole sub-batch steps, docs/layout.md); "relaid",
    the relaid-out step (the layout's change not counted, none measured)."""
    probe_rank: int | None = None
    """Force this rank r on every probed conv (for experiments); None lets the planner choose."""
    seed: int | None = None
    """Seed of a private generator for the probes: reproducible runs that leave the caller's RNG
    stream alone. None: each probed conv draws its seed from torch's default RNG."""
    probe: str = "gaussian"
    """Probe kind of the probed convs: "gaussian", "rademacher" or "orthogonal"."""
    mode: str = "spatial"
    """Sketch mode of the probed convs: "spatial" (r values per sample and channel) or "channel"."""
    aop_k: float = 0.5
    """Mem-AOP-GD (method "aop"): the fraction K / D of a layer's D outer products its dW keeps."""
    aop_policy: str = "topk"
    """Mem-AOP-GD: which K ("topk" by ||x_j|| * ||dy_j||, "weighted" sampled in proportion to it,
    "uniform"); see fxsketch.ops.outer for how the rows left out are carried."""
    aop_decay: float = 1.0
    """Mem-AOP-GD: the factor on the memory of left-out rows at each step, in [0, 1]; 0: no memory
    (plain AOP, sampling policies reweighted to be unbiased per step)."""
    aop_layers: str = "auto"
    """Mem-AOP-GD: "auto", the layers where the solver finds it pays (time saved against the
    memory it holds and its noise); "all", every linear and conv layer whose weight trains, whatever
    the cost model says and above ``max_grad_noise`` too (to study its accuracy, or where the cost
    model is wrong): the plan still minimises the peak or meets the budget around them."""
    chunked_replays: bool = True
    """Method "recompute" also offers, for a segment whose every op treats each sample on its own
    (no BatchNorm, no random op), a replay that runs the segment's forward and its backward replay
    a chunk of the batch at a time (fxsketch.ops.chunked_replay): a chunk's activations are alive
    at once instead of the batch's. Exact up to rounding (a conv's sums on another batch size)."""
    quant_inputs: str = "all"
    """Which saved inputs method "quant" may keep in 8 or 4 bits: "all", norms' and convolutions'
    (a conv's dW then reads the rounded copy; docs/quant.md); "norms", norms' only."""
    offload: str = "auto"
    """Activation offload (method "offload": saved activations to host memory, prefetched back
    before their backward use; exact). "auto": offered on CUDA, and on a CPU step only when
    ``methods`` names "offload" (on a CPU the host is the device: it frees no physical memory
    there, so it is not a default); "on": offered on any device; "off": never."""
    offload_bandwidth: float = 50e9
    """Host<->device copy rate (bytes/s) that prices offload on CUDA: PCIe Gen5 x16 carries
    63 GB/s per direction after 128b/130b encoding, pinned copies reach about 80 % of that."""
    offload_nodes: tuple[str, ...] | None = None
    """Offload exactly these nodes (by fx node name; required in every plan, on any device), or
    None to let the planner choose. A named node that saves nothing offload could move is refused."""
    autocast: Any = None
    """None (default): plan an fp32 step. torch.bfloat16 or torch.float16: plan the step as it runs
    under ``torch.autocast`` (activations, sketches and masks in the low dtype where autocast puts
    them; master weights and gradients fp32): profiling, calibration, node times and kernel
    workspace all run their forwards under that autocast. The returned module does not enter
    autocast itself: run its forward (and loss) under ``torch.autocast(device, dtype)`` as the plan
    assumes."""
    workspace: str = "measure"
    """Native kernels' workspace in the plan (convolutions: oneDNN's reorders on CPU, cuDNN's
    workspace on CUDA; fxsketch.passes.workspace): "measure" runs each conv signature alone once
    per process (at full batch, or the most samples a byte budget allows) and caches it;
    "formula" uses a fitted rule instead (no runs); "off" plans tensor bytes only."""
    memory_format: str = "auto"
    """The layout the planned step's convolutions run in. "auto" (default): "channels_last" for a
    step on CPU unless the relaid-out unmodified step peaks more than 5 % above the step as given
    (weight-dominated small inputs), "preserve" on CUDA (not yet measured there). "preserve": as the model and inputs
    come. "channels_last": each 2-d/3-d conv's input is made channels_last (NHWC / NDHWC)
    and the activations stay so; outputs that eager returns contiguous are returned contiguous.
    On CPU this removes oneDNN's reorders (the conv kernels' workspace, up to the size of their
    input or output) and runs the convs faster; values equal eager's up to floating-point rounding
    (another summation order), not bit for bit. The unmodified peak in the report stays the step
    as given; fxsketch's ops keep the layout (docs/layout.md)."""
    ratios: tuple[float, ...] = (1 / 4, 1 / 16, 1 / 64)
    """Sketch sizes the planner may choose from, as fractions of the conv input."""
    max_grad_noise: float = 8.0
    """Largest gradient noise allowed, relative to the SGD noise of each layer's dW at the
    training batch (``fxsketch.calibrate``): a bound every plan keeps. Within it, the planner
    minimises overhead plus a noise penalty. Uncalibrated convs are judged by the stated prior.
    The default is the largest of the limits 1, 2, 4, 8 whose digits runs (3 seeds) kept a mean
    test accuracy within one seed standard deviation of exact backprop, 8 with ratios of 5-7 at
    r = 1/64 of the pixels (docs/training.md, "choosing the default max_grad_noise")."""
    calibrate: bool = True
    """Measure probe noise (and node times) on a small real sub-batch of the example inputs, or on
    ``calibration_inputs`` with meta inputs, within the plan's memory. False: the prior."""
    calibration_batch: int = 8
    """Most samples calibration may use (it uses 8, 4 or 2, at most half the batch, the largest
    whose predicted peak fits under the budget or the lowest reachable peak)."""
    progress: bool | None = None
    """Show a progress bar while calibrating (conv calls folded): True always, False never, None (default) only
    when stderr is a terminal (tqdm's convention), so logs and CI output stay clean."""
    time_nodes: bool = True
    """True (default): extra step time from this machine's own timings: every node's forward and
    backward, each node timed alone on synthetic inputs of at most 4 samples
    (the same for real and meta inputs), and each lean op and probed conv against the op it replaces
    (fxsketch.passes.timing); where the step is relaid out, whole steps of both layouts on a
    sub-batch within the plan's memory (``overhead_against``). Measured once per machine and graph
    and kept on disk, so a plan does not change with load. False: a roofline estimate (FLOPs and
    bytes at this machine's matmul and copy rates), no runs, and no layout change counted; it
    misprices memory-bound ops (BatchNorm, max-pool) on CPU."""
    solver_max_nodes: int = SolverOptions.max_nodes
    """Branch-and-bound nodes HiGHS may explore in one search for a plan (a budget solve, or a
    lowest-peak solve's whole ladder of overhead caps); then the best plan found so far is used
    (always feasible). A work limit, not seconds, so that the same model, inputs and seed give
    the same plan on any machine load. Most searches close the 2 % gap at their root node; with
    the default, 100, ResNet-50's lowest-peak solves take 2-4 CPU seconds, and 300 found no
    better plan on the models of docs/optimize.md (30 left MobileNetV2 29 % higher). Raise it
    when more planning time for a possibly better plan is worth it."""
    plan_max_nodes: int | None = None
    """Nodes all solves of one ``optimize`` call may use together (the first solve, and the at
    most two re-solves when the rewritten graph comes out above the budget); None: 3 x
    solver_max_nodes."""
    solver: SolverOptions = SolverOptions()
    """The MILP's other knobs (gap, ladder of overhead caps, noise weight, reduction sizes, the
    wall-clock safety net ``safety_seconds``); ``solver_max_nodes`` overrides its node limit."""

    def __post_init__(self):
        check_dtype(self.autocast)
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", methods)
        known = tuple(_options.registered())
        bad = [m for m in methods if m not in known]
        if bad:
            raise ConfigError(f"unknown method(s) {bad}: choose from {known}")
        whole = [m for m in methods if _options.get(m).whole_graph]  # dfa: see passes/options/dfa.py
        if whole and len(methods) > 1:
            raise ConfigError(f"method {whole[0]!r} replaces backpropagation over the whole graph and cannot "
                              f"be combined with {[m for m in methods if m != whole[0]]}: use methods=({whole[0]!r},)")
        if not _is_count(self.solver_max_nodes):
            raise ConfigError(f"solver_max_nodes must be a number of nodes >= 1, got {self.solver_max_nodes!r}")
        if self.plan_max_nodes is not None and not _is_count(self.plan_max_nodes):
            raise ConfigError(f"plan_max_nodes must be a number of nodes >= 1 or None, got {self.plan_max_nodes!r}")
        if not isinstance(self.solver, SolverOptions):
            raise ConfigError(f"solver must be a fxsketch.passes.solve.SolverOptions, got {type(self.solver).__name__}")
        if not (isinstance(self.max_overhead, (int, float)) and self.max_overhead >= 0):
            raise ConfigError(f"max_overhead must be a fraction >= 0 (0.2 = 20 % extra step time), "
                             f"got {self.max_overhead!r}")
        if self.probe_rank is not None and (not isinstance(self.probe_rank, int) or self.probe_rank < 1):
            raise ConfigError(f"probe_rank must be a positive int or None, got {self.probe_rank!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int or None, got {self.seed!r}")
        if self.probe not in PROBES:
            raise ConfigError(f"unknown probe {self.probe!r}: choose from {PROBES}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}: choose from {MODES}")
        try:
            check_aop(self.aop_k, self.aop_policy, self.aop_decay)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.workspace not in WORKSPACE_SOURCES:
            raise ConfigError(f"workspace must be one of {WORKSPACE_SOURCES}, got {self.workspace!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.overhead_against not in ("given", "relaid"):
            raise ConfigError(f"overhead_against must be 'given' or 'relaid', got {self.overhead_against!r}")
        if self.aop_layers not in ("auto", "all"):
            raise ConfigError(f"aop_layers must be 'auto' or 'all', got {self.aop_layers!r}")
        if self.quant_inputs not in ("all", "norms"):
            raise ConfigError(f"quant_inputs must be 'all' or 'norms', got {self.quant_inputs!r}")
        if not isinstance(self.chunked_replays, bool):
            raise ConfigError(f"chunked_replays must be True or False, got {self.chunked_replays!r}")
        if self.offload not in ("auto", "on", "off"):
            raise ConfigError(f"offload must be 'auto', 'on' or 'off', got {self.offload!r}")
        if not (isinstance(self.offload_bandwidth, (int, float)) and 0 < self.offload_bandwidth < float("inf")):
            raise ConfigError(f"offload_bandwidth must be bytes/s > 0 (50e9: PCIe Gen5 x16), got {self.offload_bandwidth!r}")
        if self.offload_nodes is not None:
            names = (self.offload_nodes,) if isinstance(self.offload_nodes, str) else tuple(self.offload_nodes)
            if not all(isinstance(n, str) for n in names):
                raise ConfigError(f"offload_nodes must be fx node names (strings) or None, got {self.offload_nodes!r}")
            object.__setattr__(self, "offload_nodes", names)
            if "offload" not in methods:
                raise ConfigError(f"offload_nodes={names} needs the method: add 'offload' to methods (now {methods})")
        if not self.ratios or any(not (0 < r <= 1) for r in self.ratios):
            raise ConfigError(f"ratios must be fractions in (0, 1], got {self.ratios!r}")
        if isinstance(self.calibration_batch, bool) or not isinstance(self.calibration_batch, int) \
                or self.calibration_batch < 2:
            raise ConfigError(f"calibration_batch must be an int >= 2 (samples), got {self.calibration_batch!r}")
        if not (isinstance(self.max_grad_noise, (int, float)) and self.max_grad_noise > 0):
            raise ConfigError(f"max_grad_noise must be > 0, got {self.max_grad_noise!r}")
        resolve_budget(self.budget, 1)  # fail early on a malformed budget

    @classmethod
    def from_options(cls, config: "Config | None" = None, **options: Any) -> "Config":
        """``config`` (or the defaults) with ``options`` replacing its fields; an unknown name is
        refused with the list of valid ones (and the closest, for a typo)."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            hints = [f"{k!r} (replaced by {_REPLACED[k]!r}: planning is bounded by work, not seconds, "
                     f"so that it gives the same plan on any load)" if k in _REPLACED
                     else f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, names, 1))
                     else repr(k) for k in unknown]
            raise ConfigError(f"unknown option(s) {', '.join(hints)}; the options are the fields of "
                              f"fxsketch.Config: {', '.join(names)}")
        if config is not None and not isinstance(config, Config):
            raise ConfigError(f"config must be a fxsketch.Config, got {type(config).__name__}")
        return replace(config, **options) if config is not None else cls(**options)

    def planning_context(self):
        """What planning with this config runs under (a context manager): its kernel-workspace
        source (:meth:`workspace_source`) and its autocast dtype (fxsketch.passes.precision)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.workspace_source())
        stack.enter_context(use_autocast(self.autocast))
        return stack

    def workspace_source(self):
        """The kernel-workspace source for this config's planning (a context manager): measured
        calls run at full batch unless a byte budget is smaller than their tensors."""
        limit = self.budget if not isinstance(self.budget, float) else None
        return use_workspace_source(self.workspace, resolve_budget(limit, 0) if limit is not None else None)

    def options_cap(self, layout_time: float) -> float:
        """The options' extra time (a fraction of the planned, relaid-out step) that keeps the whole
        step within ``max_overhead`` of the step as given when the layout changes its time by
        ``layout_time``: (1 + layout) x (1 + options) <= 1 + max_overhead; 0 where the layout alone
        takes all of it."""
        return max((1 + self.max_overhead) / (1 + layout_time) - 1, 0.0)

    def option_settings(self, noise=None) -> OptionSettings:
        """What the option kinds read, with calibrated ``noise`` (node name -> ConvNoise) if any."""
        return OptionSettings(ratios=tuple(self.ratios), probe_rank=self.probe_rank, mode=self.mode,
                              probe=self.probe, max_grad_noise=self.max_grad_noise, noise=noise,
                              aop_k=self.aop_k, aop_policy=self.aop_policy, aop_decay=self.aop_decay,
                              aop_layers=self.aop_layers, offload=self._offload(),
                              offload_bandwidth=float(self.offload_bandwidth), offload_nodes=self.offload_nodes,
                              quant_inputs=self.quant_inputs, chunked_replays=bool(self.chunked_replays))

    def _offload(self) -> str:
        """When offload is offered (where "offload" is among the methods): "auto" becomes "on" for
        a CPU step too when the user named the methods (not the default tuple) or the nodes."""
        named = self.methods is not METHODS or self.offload_nodes is not None
        return "on" if self.offload == "auto" and named else self.offload

    def solver_options(self) -> SolverOptions:
        """The solver's knobs, with this config's node limit."""
        return replace(self.solver, max_nodes=self.solver_max_nodes)

    @property
    def total_plan_nodes(self) -> int:
        """Nodes all solves of one ``optimize`` call may use (``plan_max_nodes`` or its default)."""
        return self.plan_max_nodes if self.plan_max_nodes is not None else 3 * self.solver_max_nodes


def resolve_budget(budget, baseline_peak: int) -> int | None:
    """Bytes allowed for a budget given as bytes, a size string, or a fraction of ``baseline_peak``.

    >>> resolve_budget("1KiB", 0), resolve_budget(0.5, 1000), resolve_budget(None, 1000)
    (1024, 500, None)

    An int below 1 KiB is refused: ``budget=1`` is far more likely a typo for ``1.0`` than a
    one-byte budget.
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ConfigError("budget must be bytes (int), a size string like '3.5GiB', or a fraction in (0, 1]")
    if isinstance(budget, int):
        if budget <= 0:
            raise ConfigError(f"budget must be positive, got {budget} bytes")
        if budget < 1024:
            raise ConfigError(f"budget={budget} is {budget} B, below 1 KiB: no training step fits "
                              f"that. For a fraction of the unmodified peak write a float "
                              f"(budget={float(budget)!r} is {100 * budget:g} %); for bytes write a "
                              f"size string like '3.5GiB'")
        return budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"a float budget is a fraction of the unmodified peak and must lie in (0, 1], "
                             f"got {budget}; give bytes as an int or a string like '3.5GiB'")
        return int(budget * baseline_peak)
    if isinstance(budget, str):
        try:
            return parse_bytes(budget)
        except ValueError as e:
            raise ConfigError(f"budget: {e}") from None
    raise ConfigError(f"budget must be bytes (int), a size string like '3.5GiB', or a fraction in (0, 1], "
                    f"got {type(budget).__name__}")
