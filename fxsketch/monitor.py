"""Probe noise during training: re-measure each probed conv's noise ratio on a batch of the run.

The plan's noise ratios were measured once, at planning time, on the initial weights. As training
proceeds the gradient shrinks and the SGD noise grows relative to it, so the probe/SGD ratio of
a probed conv drifts. :func:`grad_noise` measures it again, on any batch and at any epoch, with
the very method planning used (:func:`fxsketch.calibrate.calibrate_convs` on an exact twin of the
optimized module, a sub-batch of at most ``samples`` samples, stated for the full batch), so a
user can check the criterion "probe noise within max_grad_noise x SGD noise" as it evolves.

>>> report = fxsketch.grad_noise(gm, (xb,), loss_fn=lambda out: F.cross_entropy(out, yb))  # doctest: +SKIP
>>> print(report)                                                                          # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import ops
from ._calibration import _padded_loss, sub_batch
from .calibrate import calibrate_convs
from .errors import InputError
from .measurement import default_loss
from .passes.trace import check_inputs
from .report import _table

__all__ = ["NoiseRow", "NoiseReport", "grad_noise"]

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class NoiseRow:
    node: str             # the probed conv's node in the optimized graph
    rank: int
    planned: float        # ratio the plan was made with (0 if unknown)
    now: float            # probe noise / SGD noise on this batch
    sgd_noise: float
    probe_noise: float


@dataclass(frozen=True)
class NoiseReport:
    """The probe/SGD noise ratio of every probed conv, now; rendered like the plan's tables."""

    rows: tuple[NoiseRow, ...]
    batch: int
    samples: int
    max_grad_noise: float | None = None

    def render(self) -> str:
        head = ("node", "rank", "planned noise", "noise now", "SGD noise", "probe noise")
        body = [(r.node, str(r.rank), f"{r.planned:.2f}x" if r.planned else "-", f"{r.now:.2f}x",
                 f"{r.sgd_noise:.3g}", f"{r.probe_noise:.3g}") for r in self.rows]
        over = [r.node for r in self.rows if self.max_grad_noise and r.now > self.max_grad_noise]
        lines = [f"probe noise of {len(self.rows)} probed conv(s), measured on {self.samples} samples, "
                 f"stated for batch {self.batch}", _table(head, body)]
        if over:
            lines.append(f"above max_grad_noise={self.max_grad_noise:g}: {', '.join(over)} (re-plan with "
                         f"fxsketch.optimize for the current weights)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _exact_twin(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, tuple[str, int]]]:
    """A GraphModule sharing ``gm``'s parameters in which every probed conv is the exact F.convNd
    again; returns it and {twin node name: (probed node name, rank)}."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    probed: dict[str, tuple[str, int]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is ops.probed_conv:
            x, w, b = (env[a] if isinstance(a, fx.Node) else a for a in (list(n.args) + [None] * 3)[:3])
            weight = gm.get_parameter(n.args[1].target)
            kw = n.kwargs
            new = graph.call_function(_CONVS[weight.dim() - 2], (x, w, b, kw.get("stride", 1),
                                      kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1)))
            probed[new.name] = (n.name, int(kw["rank"]))
            env[n] = new
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, graph), probed


def _probe_kind(gm: fx.GraphModule) -> tuple[str, str]:
    """(mode, probe) of the optimized module's probed convs (one Config made them all)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is ops.probed_conv:
            return n.kwargs.get("mode", "spatial"), n.kwargs.get("probe", "gaussian")
    return "spatial", "gaussian"


def grad_noise(gm: fx.GraphModule, example_inputs: Any, *, loss_fn: Callable | None = None,
               samples: int | None = None) -> NoiseReport:
    """Re-measure the probe/SGD noise ratio of each probed conv of an optimized module.

    ``example_inputs``: a batch of the running training (the figures are stated for its size B);
    at most ``samples`` (default: as many as planning used, else 8; at most half of B, at least 2)
    of its samples run one exact forward + backward, as at planning. ``loss_fn(output)``: the training loss (a closure over the batch's
    targets works: the outputs are padded back to B rows with zeros that carry no gradient).
    Nothing of ``gm`` changes: no ``.grad`` written, BatchNorm statistics restored.
    """
    if not isinstance(gm, fx.GraphModule):
        raise InputError(f"grad_noise needs the module fxsketch.optimize returned, got {type(gm).__name__}")
    inputs = check_inputs(gm, example_inputs)
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    plan = getattr(gm, "memory_plan", None)
    if samples is None:
        samples = getattr(plan, "calibration_batch", 0) or 8
    b = min(samples, max(2, batch // 2))
    if batch < 2 or b > batch:
        raise InputError(f"grad_noise needs a batch of at least 2 samples, got {batch}")
    twin, probed = _exact_twin(gm)
    planned = {d.rewritten: d.grad_noise for d in plan.decisions} if plan is not None else {}
    rows = []
    if probed:
        convs = {name: twin.get_parameter(node.args[1].target)
                 for node in twin.graph.nodes for name in [node.name] if name in probed}
        first: dict[int, str] = {}
        for name, w in convs.items():
            first.setdefault(id(w), name)
        with torch.no_grad():
            sub = tuple(x.detach() for x in sub_batch(inputs, batch, b))
        ranks: dict[str, list[int]] = {}
        for name, (_, rank) in probed.items():
            ranks.setdefault(first[id(convs[name])], []).append(rank)
        mode, probe = _probe_kind(gm)
        noise = calibrate_convs(twin, sub, {name: convs[name] for name in first.values()}, batch=batch,
                                loss_fn=_padded_loss(loss_fn or default_loss, b, batch), cache=False,
                                mode=mode, probe=probe, ranks=ranks)
        for name, (orig, rank) in probed.items():
            c = noise[first[id(convs[name])]]
            rows.append(NoiseRow(orig, rank, planned.get(orig, 0.0), c.ratio(rank), c.sgd_noise,
                                 c.probe_noise(rank)))
    return NoiseReport(tuple(rows), batch, b, getattr(plan, "max_grad_noise", None))
