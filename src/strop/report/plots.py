"""Small PNG plots for the report. Each function returns PNG bytes, or None when there is nothing to plot.

matplotlib's `Figure` is used directly (no pyplot), so no GUI backend or global state is involved and
plotting works in threads and headless machines alike. Figures are 7×3.5 in at 100 dpi: a report with
a handful of them stays far below 1 MB.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from strop.report.diagnose import series, smooth

FIGSIZE = (7.0, 3.5)
SHORT_FIGSIZE = (7.0, 2.6)
DPI = 100


def loss_plot(records: list[dict], best_step=None) -> bytes | None:
    """Training loss (raw, faint, and smoothed) and validation loss against step, on one figure, with
    the validation loss of each source of a mixture or each earlier stage (`val_loss/NAME`) dashed."""
    steps, loss = series(records, "loss")
    vsteps, vloss = series(records, "val_loss")
    if len(loss) == 0 and len(vloss) == 0:
        return None
    fig, ax = new_figure(FIGSIZE)
    if len(loss):
        ax.plot(steps, loss, color="C0", alpha=0.3, linewidth=1, label="train (raw)")
        ax.plot(steps, smooth(loss), color="C0", linewidth=2, label="train (smoothed)")
    if len(vloss):
        ax.plot(vsteps, vloss, color="C1", marker="o", markersize=4, linewidth=1.5, label="validation")
    parts = sorted({k for r in records for k in r if k.startswith("val_loss/")})
    for i, key in enumerate(parts):
        psteps, ploss = series(records, key)
        if len(ploss):
            color = f"C{(i + 3) % 10}"
            ax.plot(psteps, ploss, color=color, linestyle="--", marker=".", linewidth=1.2, label=key[9:])
    if best_step is not None and len(vloss) and best_step in vsteps:
        ax.axvline(best_step, color="C2", linestyle=":", linewidth=1.2, label=f"best step {best_step}")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def lr_plot(records: list[dict]) -> bytes | None:
    steps, lr = series(records, "lr")
    if len(lr) < 2:
        return None
    fig, ax = new_figure(SHORT_FIGSIZE)
    ax.plot(steps, lr, color="C4", linewidth=1.5)
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return to_png(fig)


def length_plot(histogram: dict | None, max_length=None) -> bytes | None:
    """Token lengths per split from `{"edges": [n+1], "train": [n], "validation": [n]}`, as the share
    of each split's examples, so a small validation split is comparable with train."""
    if not isinstance(histogram, dict):
        return None
    edges = histogram.get("edges")
    if not isinstance(edges, list) or len(edges) < 2:
        return None
    fig, ax = new_figure(SHORT_FIGSIZE)
    drawn = False
    for split, color, fill in (("train", "C0", True), ("validation", "C1", False)):
        counts = histogram.get(split)
        if not isinstance(counts, list) or len(counts) != len(edges) - 1 or sum(counts) <= 0:
            continue
        share = np.asarray(counts, dtype=float) / sum(counts)
        ax.stairs(
            share, edges, fill=fill, alpha=0.45 if fill else 1.0, color=color, linewidth=1.5, label=split
        )
        drawn = True
    if not drawn:
        return None
    if isinstance(max_length, (int, float)) and edges[0] <= max_length <= edges[-1] * 1.05:
        ax.axvline(max_length, color="C3", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set(xlabel="tokens per example", ylabel="share of examples", title="Example length")
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def overlay_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, smoothed: bool
) -> bytes | None:
    """One line per run (legend = run name); with `smoothed`, the raw curve is drawn faintly beneath."""
    curves = {name: c for name, c in curves.items() if len(c[1])}
    if not curves:
        return None
    fig, ax = new_figure(FIGSIZE)
    for i, (name, (steps, values)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if smoothed:
            ax.plot(steps, values, color=color, alpha=0.2, linewidth=1)
            ax.plot(steps, smooth(values), color=color, linewidth=2, label=name)
        else:
            ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=1.5, label=name)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def new_figure(size: tuple[float, float]):
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # fixed metadata keeps the bytes identical for identical inputs (diffable reports)
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()
