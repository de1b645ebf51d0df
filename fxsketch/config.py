"""Options of :func:`fxsketch.optimize`, validated in one place."""
from __future__ import annotations

from dataclasses import dataclass

from .ops.probes import MODES, PROBES
from .units import parse_bytes

__all__ = ["Config", "METHODS", "resolve_budget"]

METHODS = ("probe", "lean", "recompute")


@dataclass(frozen=True)
class Config:
    """How :func:`fxsketch.optimize` plans. Every field has a safe default."""

    budget: int | float | str | None = None
    """Peak bytes allowed: an int, a string such as "3.5GiB" or "800MB", or a float in (0, 1]
    meaning that fraction of the unmodified predicted peak. None: the lowest peak reachable
    within ``max_overhead``."""
    methods: tuple[str, ...] = METHODS
    """Which options the planner may use: any of "probe", "lean", "recompute"."""
    max_overhead: float = 0.2
    """Estimated extra step time allowed when ``budget`` is None (fraction of the step)."""
    probe_rank: int | None = None
    """Force this rank r on every probed conv (for experiments); None lets the planner choose."""
    seed: int | None = None
    """Seed of a private generator for the probes: reproducible runs that leave the caller's RNG
    stream alone. None: each probed conv draws its seed from torch's default RNG."""
    probe: str = "gaussian"
    """Probe kind of the probed convs: "gaussian", "rademacher" or "orthogonal"."""
    mode: str = "spatial"
    """Sketch mode of the probed convs: "spatial" (r values per sample and channel) or "channel"."""
    ratios: tuple[float, ...] = (1 / 4, 1 / 16, 1 / 64)
    """Sketch sizes the planner may choose from, as fractions of the conv input."""
    max_grad_noise: float = 1.0
    """Largest probe noise allowed, relative to the SGD noise of each layer's dW, measured on the
    example batch (fxsketch.calibrate). Each probed conv gets the smallest sketch within it."""
    calibrate: bool = True
    """Calibrate probe ranks from gradient noise (needs real example inputs and one real
    forward+backward). False: ranks from ``ratios`` with a heuristic noise estimate."""
    progress: bool = True
    """Show a progress bar while calibrating."""
    time_nodes: bool = True
    """Time every node's forward on the example batch (when it holds real tensors) and estimate
    extra step time from those times; False (or meta inputs): a roofline estimate from FLOPs and
    bytes with this machine's measured matmul and copy rates."""
    solver_time_limit: float = 2.0
    """Seconds HiGHS may search for a plan (a budget solve, or a lowest-peak solve's whole ladder
    of overhead caps); then the best plan found so far is used (always feasible). Small models
    solve to optimality (2 % gap) well within it; on ResNet-50 the MILP does not close in any
    practical time, and 2 s keeps planning under 5 s (docs/optimize.md). Raise it when more
    planning time for a possibly lower peak is worth it."""

    def __post_init__(self):
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", methods)
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}: choose from {METHODS}")
        if not (isinstance(self.max_overhead, (int, float)) and self.max_overhead >= 0):
            raise ValueError(f"max_overhead must be a fraction >= 0 (0.2 = 20 % extra step time), "
                             f"got {self.max_overhead!r}")
        if self.probe_rank is not None and (not isinstance(self.probe_rank, int) or self.probe_rank < 1):
            raise ValueError(f"probe_rank must be a positive int or None, got {self.probe_rank!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}: choose from {PROBES}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose from {MODES}")
        if not self.ratios or any(not (0 < r <= 1) for r in self.ratios):
            raise ValueError(f"ratios must be fractions in (0, 1], got {self.ratios!r}")
        if not (isinstance(self.max_grad_noise, (int, float)) and self.max_grad_noise > 0):
            raise ValueError(f"max_grad_noise must be > 0, got {self.max_grad_noise!r}")
        if not (isinstance(self.solver_time_limit, (int, float)) and self.solver_time_limit > 0):
            raise ValueError(f"solver_time_limit must be seconds > 0, got {self.solver_time_limit!r}")
        resolve_budget(self.budget, 1)  # fail early on a malformed budget


def resolve_budget(budget, baseline_peak: int) -> int | None:
    """Bytes allowed for a budget given as bytes, a size string, or a fraction of ``baseline_peak``.

    >>> resolve_budget("1KiB", 0), resolve_budget(0.5, 1000), resolve_budget(None, 1000)
    (1024, 500, None)
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise TypeError("budget must be bytes (int), a size string like '3.5GiB', or a fraction in (0, 1]")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget} bytes")
        return budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"a float budget is a fraction of the unmodified peak and must lie in (0, 1], "
                             f"got {budget}; give bytes as an int or a string like '3.5GiB'")
        return int(budget * baseline_peak)
    if isinstance(budget, str):
        return parse_bytes(budget)
    raise TypeError(f"budget must be bytes (int), a size string like '3.5GiB', or a fraction in (0, 1], "
                    f"got {type(budget).__name__}")
