"""Timeline plot for MemoryPlan.save (matplotlib, an optional dependency: pip install fxsketch[plot])."""
from __future__ import annotations

import base64
import io
from pathlib import Path

from .errors import ConfigError
from .units import format_bytes

from .passes.liveness import CATEGORIES as CATEGORY_ORDER  # one vocabulary for every report field


_FORMATS = (".png", ".svg", ".pdf", ".html", ".htm")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plan.save needs matplotlib: pip install 'fxsketch[plot]'") from e
    return plt


def check_plot_path(path) -> None:
    """Raise before any planning if ``path`` cannot be drawn to (format, matplotlib)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".pickle", ".pkl"):
        return  # a memory_viz snapshot (fxsketch.memory_viz): no matplotlib needed
    if suffix not in _FORMATS:
        raise ConfigError(f"cannot save a plan as {suffix or 'a file without suffix'}: use .png, .svg, .pdf, "
                          f".html, or .pickle (a memory_viz snapshot)")
    _pyplot()


def _panel(ax, tl, title: str, budget, scale: float) -> None:
    """One timeline on its own step axis, with its own forward | backward boundary."""
    x = range(len(tl.live_bytes))
    stacks = [[c.get(k, 0) / scale for c in tl.by_category] for k in CATEGORY_ORDER]
    ax.stackplot(x, *stacks, labels=CATEGORY_ORDER, alpha=0.8)
    if budget:
        ax.axhline(budget / scale, color="red", lw=1, label="budget")
    n_fwd = sum(1 for p, _ in tl.steps if p == "forward")
    ax.axvline(n_fwd, color="gray", lw=0.8, ls=":")
    ax.text(n_fwd, ax.get_ylim()[1] * 0.95, " backward →", fontsize=7, color="gray", va="top")
    phase, node = tl.steps[tl.peak_step]
    ax.annotate(f"peak {format_bytes(tl.peak_bytes)}\n{phase} {node}", (tl.peak_step, tl.peak_bytes / scale),
                fontsize=8)
    ax.set_ylabel("live MiB")
    ax.set_title(title, fontsize=10)


def _figure(plan):
    plt = _pyplot()
    changed = plan.baseline is not plan.timeline and (plan.decisions or plan.baseline != plan.timeline)
    fig, axes = plt.subplots(2 if changed else 1, 1, figsize=(11, 7 if changed else 4.5), sharey=True,
                             squeeze=False)
    scale = 2**20
    if changed:  # two panels: the two steps have different node lists, so no shared step axis
        _panel(axes[0][0], plan.baseline, f"unmodified step of {plan.model}", plan.budget_bytes, scale)
        _panel(axes[1][0], plan.timeline, f"optimized step ({len(plan.decisions)} decisions)",
               plan.budget_bytes, scale)
    else:
        _panel(axes[0][0], plan.timeline, f"fxsketch: one training step of {plan.model}", plan.budget_bytes, scale)
    axes[-1][0].set_xlabel("step of that timeline (forward, loss, backward)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig, plt


def save_timeline(plan, path: Path) -> Path:
    check_plot_path(path)
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
