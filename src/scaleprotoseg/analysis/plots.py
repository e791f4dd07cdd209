"""Figures of the interpretability analyses: connected components per scale (Figure 3), quasi-equivariance
ratios (Figure 7) and the activation maps of quasi-equivariant pairs (Figures 8-10), consistency/stability per
percentile (Tables 3-4), group overlap per class (Table 9), active prototypes per class (Tables 3-4, 10) and
prototypes and mIoU per step (Tables 2, 7).

Every function takes the ``compute()`` output of the matching accumulator or analysis summary (or ``{run or
dataset name: output}`` to compare several), returns a matplotlib ``Figure`` drawn on the Agg canvas (no pyplot, no
global backend change, safe without a display) and writes it to ``path`` when given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def new_figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    """A Figure on the Agg canvas (no pyplot) with ``ncols`` axes in one row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)


def _named(results: Mapping[Any, Any], single_key: str) -> dict[str, Any]:
    """``{name: result}`` from either one result (recognised by ``single_key``) or a mapping of them."""
    if single_key in results:
        return {"": results}
    return dict(results)


def plot_components(results: Mapping[str, Any], path: str | Path | None = None, title: str | None = None) -> Any:
    """Figure 3: (a) mean number and (b) mean area (feature cells) of connected components per scale, one line per
    binarisation quantile p_th (line style per dataset when several are given)."""
    named = _named(results, "mean_count")
    fig, (ax_count, ax_area) = new_figure(2)
    styles = ["-", "--", ":", "-."]
    for d, (name, res) in enumerate(named.items()):
        scales = np.asarray(res["scales"]) + 1
        for qi, q in enumerate(res["quantiles"]):
            label = f"{name} p={q:g}".strip()
            kw = {"marker": "o", "linestyle": styles[d % len(styles)], "color": f"C{qi}", "label": label}
            ax_count.plot(scales, np.asarray(res["mean_count"])[:, qi], **kw)
            ax_area.plot(scales, np.asarray(res["mean_area"])[:, qi], **kw)
    for ax, what in (
        (ax_count, "(a) Average number of connected components"),
        (ax_area, "(b) Average area of the components"),
    ):
        ax.set_xlabel("Scale")
        ax.set_title(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax_count.set_ylabel("Connected components per map")
    units = {str(r.get("area_unit", "feature cells")) for r in named.values()}
    ax_area.set_ylabel(f"Area per component ({', '.join(sorted(units))})")
    for ax in (ax_count, ax_area):
        ax.set_xticks(sorted({int(s) + 1 for r in named.values() for s in np.asarray(r["scales"])}))
    fig.suptitle(title or "Binarised prototype activations per scale")
    _save(fig, path)
    return fig


def plot_equivariance(results: Mapping[Any, Any], path: str | Path | None = None, title: str | None = None) -> Any:
    """Figure 7: bars of (a) the ratio of quasi-equivariant groups, (b) of prototypes in them and (c) of classes
    with one, per dataset (x axis) and p_th (bar colour)."""
    first = next(iter(results.values()), {})
    named = {"": results} if isinstance(first, Mapping) and "ratio_groups" in first else dict(results)
    fig, axes = new_figure(3, width=4.2)
    names = list(named)
    quantiles = sorted({float(q) for r in named.values() for q in r})
    width = 0.8 / max(len(quantiles), 1)
    x = np.arange(len(names))
    panels = (
        ("ratio_groups", "(a) Quasi-equivariant groups / all groups"),
        ("ratio_prototypes", "(b) Prototypes in quasi-equivariant groups"),
        ("ratio_classes", "(c) Classes with quasi-equivariant groups"),
    )
    for ax, (key, what) in zip(axes, panels):
        for qi, q in enumerate(quantiles):
            vals = [float(named[n].get(q, {}).get(key, np.nan)) for n in names]
            ax.bar(x + (qi - (len(quantiles) - 1) / 2) * width, vals, width, label=f"p_th={q:g}", color=f"C{qi}")
        ax.set_xticks(x, [n or "run" for n in names])
        ax.set_ylabel("Ratio")
        ax.set_ylim(0, 1)
        ax.set_title(what, fontsize="medium")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Quasi-equivariance of prototypes across scales")
    _save(fig, path)
    return fig


def plot_consistency_stability(
    consistency: Mapping[str, Any] | None,
    stability: Mapping[str, Any] | None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Any:
    """Tables 3-4 per percentile: consistency and stability scores (%) as bars, the mean as a dashed line."""
    metrics = [(n, r) for n, r in (("Consistency", consistency), ("Stability", stability)) if r is not None]
    if not metrics:
        raise ValueError("plot_consistency_stability: give a consistency or a stability result")
    fig, axes = new_figure(len(metrics), width=4.2)
    for ax, (name, res) in zip(axes, metrics):
        pcts = list(res["scores"])
        vals = [res["scores"][p] for p in pcts]
        ax.bar([f"{p:g}th" for p in pcts], vals, color=[f"C{i}" for i in range(len(pcts))])
        ax.axhline(res["score"], color="k", linestyle="--", label=f"mean {res['score']:.2f}")
        ax.set_xlabel("Binarisation percentile")
        ax.set_ylabel(f"{name} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name)
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Part-based interpretability scores")
    _save(fig, path)
    return fig


def plot_group_overlap(
    overlap: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Any:
    """Table 9 per class: mean IoU (%) between the binarised activations of the groups of each class."""
    classes = sorted(overlap["class_iou"])
    vals = [overlap["class_iou"][c] for c in classes]
    labels = [class_names[c] if class_names is not None else str(c) for c in classes]
    fig, (ax,) = new_figure(1, width=max(5.0, 0.35 * len(classes) + 2))
    ax.bar(np.arange(len(classes)), vals, color="C0")
    ax.axhline(overlap["miou"], color="k", linestyle="--", label=f"mIoU {overlap['miou']:.2f}")
    ax.set_xticks(np.arange(len(classes)), labels, rotation=60, ha="right", fontsize="small")
    ax.set_xlabel("Class")
    ax.set_ylabel("IoU between groups (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Overlap of group activations (95th percentile)")
    _save(fig, path)
    return fig


def plot_equivariant_pairs(
    panels: Sequence[Mapping[str, Any]], path: str | Path | None = None, title: str | None = None
) -> Any:
    """Figures 8-10: activation maps of quasi-equivariant prototype pairs, one pair per row.

    Each panel has ``left`` and ``right``, each a mapping with ``image`` (uint8 (H, W, 3), the input at the
    downsampling that pairs the two scales), ``activation`` (h, w) and ``label`` (a caption), plus a row ``caption``.
    The activation is drawn over its image (nearest cells, semi-transparent).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(len(panels), 1)
    fig = Figure(figsize=(7.0, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no quasi-equivariant pair", ha="center", va="center")
        ax.axis("off")
    for i, panel in enumerate(panels):
        for j, side in enumerate(("left", "right")):
            part = panel[side]
            ax = fig.add_subplot(rows, 2, 2 * i + j + 1)
            image = np.asarray(part["image"])
            H, W = image.shape[:2]
            ax.imshow(image)
            ax.imshow(
                np.asarray(part["activation"]), extent=(0, W, H, 0), alpha=0.55, cmap="jet", interpolation="nearest"
            )
            ax.set_title(str(part["label"]), fontsize="small")
            ax.axis("off")
        fig.axes[-2].text(0, -0.06, str(panel.get("caption", "")), transform=fig.axes[-2].transAxes, fontsize="small")
    fig.suptitle(title or "Quasi-equivariant prototype pairs on downsampled inputs")
    _save(fig, path)
    return fig


def plot_sparsity(sparsity: Mapping[str, Any], path: str | Path | None = None) -> Any:
    """Tables 3-4, 10: active prototypes per class (``active_prototypes``) and their mean, titled with the last
    layer, its average |w| and the extra parameters (the summary of the ``sparsity`` analysis)."""
    names = list(sparsity["active_prototypes"])
    counts = np.asarray([sparsity["active_prototypes"][n] for n in names], dtype=float)
    C = len(names)
    fig, (ax,) = new_figure(1, width=max(5.0, 0.35 * C + 2))
    ax.bar(np.arange(C), counts, color="C0")
    ax.axhline(counts.mean(), color="k", linestyle="--", label=f"mean {counts.mean():.2f}")
    ax.set_xticks(np.arange(C), names, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel(f"Active prototypes (|w| >= {sparsity['threshold']:g})")
    extra = sparsity["extra_parameters"]
    avg = sparsity["avg_abs_weight"]
    ax.set_title(f"Sparsity ({sparsity['last_layer']}): avg |w| {avg:.3f}, +{extra / 1e3:.1f}K parameters")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return fig


def plot_prototype_steps(summary: Mapping[str, Any], path: str | Path | None = None) -> Any:
    """Tables 2, 7: prototypes and mIoU at each step (``steps`` of the ``prototypes`` analysis), alphas marked."""
    steps = summary["steps"]
    fig, (ax_p, ax_m) = new_figure(2)
    labels = [f"{s['step']}" + (f"\nα={s['alpha']:g}" if s["alpha"] is not None else "") for s in steps]
    x = np.arange(len(steps))
    ax_p.bar(x, [s["prototypes"] for s in steps], color="C0")
    ax_m.bar(x, [np.nan if s["miou"] is None else s["miou"] for s in steps], color="C1")
    for ax, what in ((ax_p, "Prototypes"), (ax_m, f"mIoU on {summary['split']} (%)")):
        ax.set_xticks(x, labels, fontsize="small")
        ax.set_ylabel(what)
        ax.grid(axis="y", alpha=0.3)
    ax_p.set_title("Prototypes per step (Tables 2, 7)")
    ax_m.set_title("mIoU per step")
    _save(fig, path)
    return fig


def plot_group_comparison(
    panels: Sequence[Mapping[str, Any]],
    run_labels: Mapping[str, str],
    class_names: Sequence[str],
    path: str | Path | None = None,
) -> Any:
    """Figure 6: one row per image, the image then run A's and run B's group activation maps of the row's class,
    each over the image (nearest cells, semi-transparent). Each panel has ``name``, ``class``, ``image`` (uint8
    (H, W, 3)) and, for ``a`` and ``b``, ``groups`` (N,) and ``maps`` (N, h, w); ``run_labels`` names ``a`` and ``b``
    (e.g. the run and its entropy weight) in the caption."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(len(panels), 1)
    cols = 1 + max((len(p["a"]["groups"]) + len(p["b"]["groups"]) for p in panels), default=0)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no image", ha="center", va="center")
        ax.axis("off")
    for i, panel in enumerate(panels):
        image = np.asarray(panel["image"])
        H, W = image.shape[:2]
        ax = fig.add_subplot(rows, cols, i * cols + 1)
        ax.imshow(image)
        ax.set_title(f"{panel['name']}\nclass {class_names[panel['class']]}", fontsize="small")
        ax.axis("off")
        j = 1
        for key, letter in (("a", "A"), ("b", "B")):
            for g, act in zip(panel[key]["groups"], panel[key]["maps"]):
                ax = fig.add_subplot(rows, cols, i * cols + j + 1)
                ax.imshow(image)
                ax.imshow(np.asarray(act), extent=(0, W, H, 0), alpha=0.55, cmap="jet", interpolation="nearest")
                ax.set_title(f"{letter}: group {int(g)}", fontsize="small", color="C0" if key == "a" else "C3")
                ax.axis("off")
                j += 1
    caption = "; ".join(f"{k.upper()} = {run_labels[k]}" for k in ("a", "b"))
    fig.suptitle(f"Group activations of the predicted class (Figure 6)\n{caption}", fontsize="medium")
    _save(fig, path)
    return fig
