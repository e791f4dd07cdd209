"""The group graph of a class (Figure 4, 11; ProtoSeg's flat version for the comparison of Figures 5, 12-13).

Left, the class's prototypes stacked by scale, each drawn as its projected training patch (and, for a sample, its
activation on the image); middle, the class's groups; right, the class. Prototype-to-group edges are the non-zero
entries of the group matrix w_g (width and label = weight), group-to-class edges the h_group weights. For ProtoSeg
(no groups) the prototypes are linked to the class with their h_proto weights. The edges are the same for every image
of the class (global explanation); the thumbnails of activations are the per-image part (local explanation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.resources import PrototypeGallery
from scaleprotoseg.explain.structure import ClassStructure

__all__ = ["plot_group_graph"]

_UNIT = 0.95  # inches per layout unit


def _thumb(ax: Any, image: np.ndarray, x0: float, y_center: float, box: float = 0.85) -> float:
    """Draw ``image`` fitted in a ``box`` x ``box`` square whose left edge is ``x0``; returns its right edge."""
    h, w = image.shape[:2]
    s = box / max(h, w, 1)
    bw, bh = w * s, h * s
    left = x0 + (box - bw) / 2
    ax.imshow(image, extent=(left, left + bw, y_center + bh / 2, y_center - bh / 2), interpolation="nearest", zorder=3)
    ax.add_patch(_rect(x0, y_center - box / 2, box, box))
    return x0 + box


def _rect(x: float, y: float, w: float, h: float, **kw: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor=kw.get("edgecolor", "#999999"), linewidth=0.8, zorder=4)


def _edge(
    ax: Any,
    a: tuple[float, float],
    b: tuple[float, float],
    weight: float,
    color: str,
    scale: float,
    label: str,
    t: float = 0.72,
) -> None:
    lw = 0.6 + scale * abs(weight)
    style = "-" if weight >= 0 else "--"
    ax.plot(
        [a[0], b[0]],
        [a[1], b[1]],
        color=color,
        linewidth=lw,
        linestyle=style,
        alpha=0.8,
        zorder=1,
        solid_capstyle="round",
    )
    mx, my = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
    ax.text(
        mx,
        my,
        label,
        fontsize=7,
        ha="center",
        va="center",
        zorder=5,
        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": color, "linewidth": 0.6},
    )


def plot_group_graph(
    structure: ClassStructure,
    gallery: PrototypeGallery,
    path: str | Path,
    *,
    palette: np.ndarray | None = None,
    activations: dict[int, np.ndarray] | None = None,
    group_maps: dict[int, np.ndarray] | None = None,
    multiscale: bool = True,
    title: str | None = None,
) -> dict[str, Any]:
    """Draw the graph of ``structure`` and return ``{"nodes": ..., "edges": ...}`` (edges as in
    :meth:`ClassStructure.edges`: only non-zero group weights). ``activations`` (prototype -> RGB overlay of its
    activation on an image) and ``group_maps`` (group -> RGB overlay) add the per-image thumbnails."""
    from matplotlib.patches import FancyBboxPatch

    from scaleprotoseg.explain.figures import hex_color

    protos = structure.used_prototypes()
    groups = structure.groups if structure.grouped else []
    n_rows = max(len(protos), len(groups), 1)
    has_act = bool(activations)
    x_label = 0.0
    x_img = 1.0
    x_proto_right = x_img + (1.9 if has_act else 0.95)
    x_group = x_proto_right + 3.0
    x_class = (x_group + 2.8) if structure.grouped else (x_proto_right + 3.4)
    width = x_class + 1.6
    top_margin = 1.0
    height = n_rows + top_margin + 0.3

    fig = F.new_figure(width * _UNIT, height * _UNIT)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.1, width)
    ax.set_ylim(height - top_margin, -top_margin)
    ax.axis("off")
    ax.set_title("")
    ax.text(
        width / 2,
        -top_margin / 2,
        title or f"{structure.name}: prototypes, groups and class",
        ha="center",
        va="center",
        fontsize=12,
        weight="bold",
    )

    def row_y(i: int, n: int) -> float:
        return (i + 0.5) * n_rows / max(n, 1)

    # prototypes, by scale
    if protos:
        ax.text(x_img + 0.425, -0.1, "training patch", fontsize=8, ha="center", va="bottom", color="#555555")
        if has_act:
            ax.text(x_img + 1.325, -0.1, "on this image", fontsize=8, ha="center", va="bottom", color="#555555")
    proto_y: dict[int, float] = {}
    last_scale = None
    for i, p in enumerate(protos):
        y = row_y(i, len(protos))
        proto_y[p] = y
        s = structure.scales[p]
        if multiscale and s != last_scale:
            ax.text(x_label, y - 0.35, f"Scale {s + 1}", fontsize=9, weight="bold", va="center")
            if last_scale is not None:
                ax.plot([x_label, x_proto_right], [y - 0.5, y - 0.5], color="#cccccc", linewidth=0.8)
            last_scale = s
        patch = gallery.patch(p)
        right = _thumb(ax, patch if patch is not None else F.placeholder(), x_img, y)
        if has_act and p in activations:  # type: ignore[operator]
            right = _thumb(ax, activations[p], right + 0.05, y)  # type: ignore[index]
        ax.text(x_label, y + 0.1, f"p{p}", fontsize=8, va="center")
    # groups
    group_y: dict[int, float] = {}
    colors = [f"C{i % 10}" for i in range(max(len(groups), 1))]
    for i, g in enumerate(groups):
        y = row_y(i, len(groups))
        group_y[g] = y
        if group_maps and g in group_maps:
            _thumb(ax, group_maps[g], x_group - 0.45, y, box=0.9)
            ax.text(
                x_group, y + 0.55, f"group {i + 1}", fontsize=9, ha="center", va="top", color=colors[i], weight="bold"
            )
        else:
            ax.add_patch(
                FancyBboxPatch(
                    (x_group - 0.55, y - 0.25),
                    1.1,
                    0.5,
                    boxstyle="round,pad=0.05",
                    facecolor="white",
                    edgecolor=colors[i],
                    linewidth=1.5,
                    zorder=3,
                )
            )
            ax.text(
                x_group,
                y,
                f"group {i + 1}",
                fontsize=9,
                ha="center",
                va="center",
                color=colors[i],
                weight="bold",
                zorder=4,
            )
    # class
    cy = n_rows / 2
    rgb = palette[structure.index] if palette is not None and structure.index < len(palette) else (80, 80, 80)
    lum = 0.299 * int(rgb[0]) + 0.587 * int(rgb[1]) + 0.114 * int(rgb[2])
    ax.add_patch(
        FancyBboxPatch(
            (x_class - 0.7, cy - 0.3),
            1.4,
            0.6,
            boxstyle="round,pad=0.08",
            facecolor=hex_color(rgb),
            edgecolor="#333333",
            linewidth=1.2,
            zorder=3,
        )
    )
    ax.text(
        x_class,
        cy,
        structure.name,
        fontsize=10,
        ha="center",
        va="center",
        weight="bold",
        zorder=4,
        color="white" if lum < 128 else "black",
    )

    edges = structure.edges()
    if structure.grouped:
        for e in edges["prototype_group"]:
            gi = groups.index(e["group"])
            _edge(
                ax,
                (x_proto_right + 0.1, proto_y[e["prototype"]]),
                (x_group - 0.6, group_y[e["group"]]),
                e["weight"],
                colors[gi],
                5.0,
                f"{e['weight']:.2f}",
            )
        hmax = max([abs(e["weight"]) for e in edges["group_class"]] + [1e-12])
        for e in edges["group_class"]:
            gi = groups.index(e["group"])
            _edge(
                ax,
                (x_group + 0.6, group_y[e["group"]]),
                (x_class - 0.75, cy),
                e["weight"] / hmax,
                colors[gi],
                3.0,
                f"{e['weight']:.2f}",
                t=0.5,
            )
    else:
        hmax = max([abs(e["weight"]) for e in edges["prototype_class"]] + [1e-12])
        for e in edges["prototype_class"]:
            _edge(
                ax,
                (x_proto_right + 0.1, proto_y[e["prototype"]]),
                (x_class - 0.75, cy),
                e["weight"] / hmax,
                "C0" if e["weight"] >= 0 else "C3",
                3.0,
                f"{e['weight']:.2f}",
            )
    if not protos:
        ax.text(x_img, n_rows / 2, "no prototype with a non-zero weight", fontsize=9, va="center")
    F.save_figure(fig, path)
    nodes = {
        "prototypes": [
            {"prototype": p, "scale": structure.scales[p], "patch": gallery.path(p) is not None} for p in protos
        ],
        "groups": [{"group": g, "number": i + 1} for i, g in enumerate(groups)],
        "class": structure.index,
    }
    return {"nodes": nodes, "edges": edges}
