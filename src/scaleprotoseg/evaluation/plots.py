"""Evaluation figures: confusion matrix and per-class IoU bars (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_confusion_matrix", "plot_per_class_iou"]

_MAX_PIXELS = 2400  # cap on the long side of a saved figure: large class counts lower the dpi, not the layout


def _new_figure(width: float, height: float) -> Any:
    # Imported here: no matplotlib work at import time, and the Agg canvas is chosen per figure (headless-safe).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _tick_positions(n: int, max_labels: int) -> np.ndarray:
    step = max(1, int(np.ceil(n / max(1, max_labels))))
    return np.arange(0, n, step)


def plot_confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    *,
    title: str | None = None,
    max_tick_labels: int = 60,
) -> Path:
    """Heat map of a (C, C) confusion matrix (rows ground truth, columns prediction) saved as a PNG.

    ``normalize`` divides each row by its ground-truth pixel count (rows without pixels stay 0). With more than
    ``max_tick_labels`` classes only every k-th class is labelled, so 150-class matrices stay legible.
    """
    m = np.asarray(matrix, dtype=np.float64)
    c = m.shape[0] if m.ndim == 2 else -1
    if m.ndim != 2 or m.shape[1] != c:
        raise ValueError(f"matrix shape {m.shape}: expected a square (C, C) confusion matrix")
    if len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} entries; expected {c}, one per matrix row")
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = float(np.clip(2.0 + 0.28 * c, 5.0, 24.0))
    fig = _new_figure(side + 1.5, side)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of ground-truth pixels" if normalize else "pixels")
    ticks = _tick_positions(c, max_tick_labels)
    fontsize = 9 if c <= 25 else 6
    ax.set_xticks(ticks, [str(class_names[i]) for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [str(class_names[i]) for i in ticks], fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if c <= 25:
        threshold = 0.5 * (1.0 if normalize else max(float(m.max()), 1.0))  # white text on the dark half
        for i in range(c):
            for j in range(c):
                if m[i, j] > 0:
                    text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                    color = "white" if m[i, j] > threshold else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
    ax.set_title(title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (pixels)"))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=min(150, int(_MAX_PIXELS / side)))
    return out


def plot_per_class_iou(
    iou: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str | None = None
) -> Path:
    """Horizontal bar chart of per-class IoU (fractions; NaN = absent class, drawn as a grey 'absent' marker), with
    the mIoU over present classes as a dashed line. Saved as a PNG."""
    values = np.asarray(iou, dtype=np.float64).reshape(-1)
    c = values.shape[0]
    if len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} entries; expected {c}, one per IoU value")
    present = np.isfinite(values)
    height = float(np.clip(1.2 + 0.22 * c, 3.0, 40.0))
    fig = _new_figure(8.0, height)
    ax = fig.add_subplot()
    y = np.arange(c)
    ax.barh(y[present], 100 * values[present], color="tab:blue", height=0.8)
    for i in y[~present]:
        ax.text(1, i, "absent", va="center", ha="left", fontsize=7, color="grey", style="italic")
    if present.any():
        miou = 100 * float(values[present].mean())
        ax.axvline(miou, color="tab:red", linestyle="--", linewidth=1, label=f"mIoU {miou:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    labels = [str(n) + ("" if p else " (absent)") for n, p in zip(class_names, present)]
    ax.set_yticks(y, labels, fontsize=9 if c <= 40 else 6)
    for tick, p in zip(ax.get_yticklabels(), present):
        if not p:
            tick.set_color("grey")
    ax.set_ylim(c - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title or f"Per-class IoU ({int(present.sum())} of {c} classes present)")
    ax.grid(axis="x", alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=min(150, int(1.5 * _MAX_PIXELS / height)))
    return out
