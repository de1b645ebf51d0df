"""Timeline plot for MemoryPlan.save (matplotlib, an optional dependency: pip install fxsketch[plot])."""
from __future__ import annotations

import base64
import io
from pathlib import Path

from .errors import ConfigError
from .units import format_bytes

from .passes.liveness import CATEGORIES as CATEGORY_ORDER  # one vocabulary for every report field


def _figure(plan):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plan.save needs matplotlib: pip install 'fxsketch[plot]'") from e
    tl = plan.timeline
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x = range(len(tl.live_bytes))
    scale = 2**20
    stacks = [[c.get(k, 0) / scale for c in tl.by_category] for k in CATEGORY_ORDER]
    ax.stackplot(x, *stacks, labels=CATEGORY_ORDER, alpha=0.8)
    if plan.baseline is not tl:
        ax.plot(range(len(plan.baseline.live_bytes)), [b / scale for b in plan.baseline.live_bytes],
                color="black", lw=1, ls="--", label="unmodified")
    if plan.budget_bytes:
        ax.axhline(plan.budget_bytes / scale, color="red", lw=1, label="budget")
    n_fwd = sum(1 for p, _ in tl.steps if p == "forward")
    ax.axvline(n_fwd, color="gray", lw=0.8)
    ax.annotate(f"peak {format_bytes(tl.peak_bytes)}\n{plan.peak_node}",
                (tl.peak_step, tl.peak_bytes / scale), fontsize=8)
    ax.set_xlabel("step (forward →  | ← backward)")
    ax.set_ylabel("live MiB")
    ax.set_title(f"fxsketch: one training step of {plan.model}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig, plt


def save_timeline(plan, path: Path) -> Path:
    fig, plt = _figure(plan)
    suffix = path.suffix.lower()
    if suffix in (".png", ".svg", ".pdf"):
        fig.savefig(path, dpi=120)
    elif suffix in (".html", ".htm"):
        buf = io.BytesIO()
        fig.savefig(buf, format="svg")
        svg = base64.b64encode(buf.getvalue()).decode()
        text = str(plan).replace("&", "&amp;").replace("<", "&lt;")
        path.write_text(f"<!doctype html><meta charset='utf-8'><title>fxsketch plan</title>"
                        f"<img src='data:image/svg+xml;base64,{svg}'><pre>{text}</pre>")
    else:
        plt.close(fig)
        raise ConfigError(f"cannot save a plan as {suffix or 'a file without suffix'}: use .png, .svg, .pdf or .html")
    plt.close(fig)
    return path
