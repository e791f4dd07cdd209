"""Prototype activation maps grouped by scale and group activation maps of one class (Figures 4 and 11 top, 26,
28-29): each map (Eq. 1 / Eq. 2 on the feature grid) is upsampled nearest onto the image, one panel per prototype /
group, with a colour bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.structure import ClassStructure

__all__ = ["plot_group_maps", "plot_prototype_maps"]

MAX_COLS = 6


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[i : i + n] for i in range(0, len(items), n)] or [[]]


def plot_prototype_maps(
    display: np.ndarray,
    activations_up: dict[int, np.ndarray],
    structure: ClassStructure,
    path: str | Path,
    *,
    multiscale: bool = True,
    title: str | None = None,
) -> dict[str, Any]:
    """One row per scale (wrapped after 6 panels), one panel per prototype of the class, titled "scale s, prototype
    i" (ScaleProtoSeg) or "prototype i" (ProtoSeg, one scale). Prototypes no group uses are marked "unused"."""
    used = set(structure.used_prototypes())
    rows: list[tuple[int, list[int]]] = []
    for s in structure.num_scales_used or [0]:
        members = [p for p in structure.prototypes if structure.scales[p] == s]
        rows += [(s, chunk) for chunk in _chunks(members, MAX_COLS)]
    ncols = max(1, max(len(r[1]) for r in rows))
    fig = F.new_figure(2.7 * ncols + 0.3, 2.5 * len(rows) + 0.5)
    axes = F.grid(fig, len(rows), ncols)
    panels = []
    for i, (s, members) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(members):
                ax.axis("off")
                continue
            p = members[j]
            t = f"scale {s + 1}, prototype {p}" if multiscale else f"prototype {p}"
            if p not in used:
                t += " (unused)"
            a = activations_up[p]
            F.show_activation(ax, display, a, t, fontsize=8)
            panels.append(
                {"prototype": p, "scale": s, "used": p in used, "max": float(a.max()), "mean": float(a.mean())}
            )
    fig.suptitle(title or f"{structure.name}: prototype activations by scale", fontsize=11)
    F.save_figure(fig, path)
    return {"prototypes": panels}


def plot_group_maps(
    display: np.ndarray,
    groups_up: dict[int, np.ndarray],
    structure: ClassStructure,
    path: str | Path,
    *,
    title: str | None = None,
) -> dict[str, Any]:
    """One panel per group of the class (Eq. 2 activations), titled with the group's number, its last-layer weight
    h_group and its member prototypes (non-zero w_g)."""
    groups = structure.groups
    ncols = max(1, min(len(groups), MAX_COLS))
    nrows = max(1, -(-len(groups) // ncols))
    fig = F.new_figure(2.9 * ncols + 0.3, 2.7 * nrows + 0.5)
    axes = F.grid(fig, nrows, ncols, title_lines=2)
    panels = []
    for i in range(nrows * ncols):
        ax = axes[i // ncols, i % ncols]
        if i >= len(groups):
            ax.axis("off")
            continue
        g = groups[i]
        h = structure.class_weights.get(g, 0.0)
        members = structure.group_weights.get(g, {})
        top = sorted(members.items(), key=lambda kv: -kv[1])[:4]
        mem = ", ".join(f"p{p}:{w:.2f}" for p, w in top) + (" ..." if len(members) > 4 else "")
        F.show_activation(ax, display, groups_up[g], f"group {i + 1} (h = {h:.2f})\n{mem}", fontsize=8)
        panels.append({"group": g, "number": i + 1, "class_weight": h, "max": float(groups_up[g].max())})
    fig.suptitle(title or f"{structure.name}: group activations", fontsize=11)
    F.save_figure(fig, path)
    return {"groups": panels}
