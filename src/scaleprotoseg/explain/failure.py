"""Failure-case analysis of one image (supplement 17, Figures 27-35).

A class fails on an image when its IoU there falls below a threshold (the paper uses 0.2). For each failing class the
view shows which classes took its pixels (Figure 27), then for the true and the most confusing class their group
activations with the h_group weights (Figures 28-29) and, per group, its most activated member prototypes, each as
its training patch and its activation on the image, with the w_g weights (Figures 30-35). ProtoSeg has no groups:
the class's most activated prototypes are shown with their h_proto weights instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.resources import PrototypeGallery
from scaleprotoseg.explain.structure import ClassStructure

__all__ = ["failing_classes", "image_confusion", "plot_failure_overview", "plot_failure_prototypes"]


def image_confusion(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(C, C) confusion matrix of one image, rows = ground truth; ignore and out-of-range labels are skipped."""
    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    label = np.asarray(label, dtype=np.int64).reshape(-1)
    ok = (label != ignore_index) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    return np.bincount(label[ok] * num_classes + pred[ok], minlength=num_classes**2).reshape(num_classes, num_classes)


def failing_classes(matrix: np.ndarray, threshold: float = 0.2) -> list[dict[str, Any]]:
    """Classes with ground-truth pixels on the image and IoU < ``threshold``, with the classes that took their pixels
    (``taken_by``, fraction of the class's pixels, largest first) and the classes whose pixels they took
    (``took_from``). ``confusing_class`` is the top of ``taken_by``, else of ``took_from``, else ``None``."""
    m = np.asarray(matrix, dtype=np.int64)
    tp = np.diag(m)
    gt, pr = m.sum(1), m.sum(0)
    cases = []
    for c in np.nonzero(gt > 0)[0].tolist():
        union = gt[c] + pr[c] - tp[c]
        iou = float(tp[c] / union) if union else float("nan")
        if not iou < threshold:
            continue
        taken = [(k, m[c, k]) for k in np.argsort(-m[c], kind="stable").tolist() if k != c and m[c, k] > 0]
        took = [(k, m[k, c]) for k in np.argsort(-m[:, c], kind="stable").tolist() if k != c and m[k, c] > 0]
        conf = taken[0][0] if taken else (took[0][0] if took else None)
        cases.append(
            {
                "class": int(c),
                "iou": iou,
                "gt_pixels": int(gt[c]),
                "pred_pixels": int(pr[c]),
                "taken_by": [{"class": int(k), "pixels": int(n), "fraction": float(n / gt[c])} for k, n in taken],
                "took_from": [{"class": int(k), "pixels": int(n)} for k, n in took],
                "confusing_class": None if conf is None else int(conf),
            }
        )
    return cases


def plot_failure_overview(
    case: dict[str, Any],
    *,
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    class_names: list[str],
    palette: np.ndarray,
    ignore_index: int,
    path: str | Path,
) -> None:
    """Figure 27: image, ground truth, prediction, where the class's pixels went, and the fractions per class."""
    c = case["class"]
    name = class_names[c]
    fig = F.new_figure(16.0, 4.0, layout="constrained")
    axes = fig.subplots(1, 5, width_ratios=[1, 1, 1, 1, 1.1])
    F.show_image(axes[0], image, "image")
    lab = np.where(label == ignore_index, 255, label)
    F.show_image(axes[1], F.colorize(lab, palette), "ground truth")
    F.show_image(axes[2], F.colorize(pred, palette), "prediction")
    mask = label == c
    where = (image.astype(np.float64) * 0.35 + 255 * 0.65).astype(np.uint8)  # other pixels washed out
    where[mask] = F.colorize(pred, palette)[mask]
    F.show_image(axes[3], where, f"pixels of '{name}' coloured by prediction")
    shown = [{"class": c, "fraction": 1.0 - sum(t["fraction"] for t in case["taken_by"])}] + case["taken_by"][:7]
    ys = np.arange(len(shown))
    axes[4].barh(
        ys,
        [s["fraction"] for s in shown],
        color=[F.hex_color(palette[s["class"]]) if s["class"] < len(palette) else "#000000" for s in shown],
        edgecolor="#333333",
    )
    axes[4].set_yticks(ys, [class_names[s["class"]] for s in shown], fontsize=8)
    axes[4].invert_yaxis()
    axes[4].set_xlim(0, 1)
    axes[4].set_xlabel(f"fraction of '{name}' pixels")
    axes[4].set_title("predicted as", fontsize=9)
    fig.legend(
        handles=F.legend_handles(
            sorted(
                {
                    int(v)
                    for v in np.unique(np.concatenate([pred.reshape(-1), lab[lab != 255].reshape(-1)]))
                    if 0 <= v < len(class_names)
                }
            ),
            class_names,
            palette,
        ),
        loc="outside lower center",
        ncols=8,
        fontsize=8,
    )
    fig.suptitle(f"Failure: '{name}' IoU {case['iou']:.2f} on this image", fontsize=12)
    F.save_figure(fig, path)


def _region_mean(a: np.ndarray, region: np.ndarray | None) -> float:
    return float(a[region].mean()) if region is not None and region.any() else float(a.mean())


def plot_failure_prototypes(
    structure: ClassStructure,
    *,
    display: np.ndarray,
    activations_up: dict[int, np.ndarray],
    groups_up: dict[int, np.ndarray] | None,
    region: np.ndarray | None,
    gallery: PrototypeGallery,
    multiscale: bool,
    path: str | Path,
    top: int = 3,
    title: str | None = None,
) -> dict[str, Any]:
    """Figures 30-35: one row per group of the class (its activation map, then its ``top`` member prototypes with a
    non-zero weight, most activated over ``region`` first: training patch and activation, with w_g). ProtoSeg: one
    row of the class's ``2 * top`` most activated prototypes with h_proto."""
    rows: list[dict[str, Any]] = []
    if structure.grouped:
        for g in structure.groups:
            members = structure.group_weights.get(g, {})
            ranked = sorted(members, key=lambda p: (-_region_mean(activations_up[p], region), p))[:top]
            rows.append(
                {
                    "group": g,
                    "number": structure.group_number(g),
                    "class_weight": structure.class_weights.get(g, 0.0),
                    "activation": _region_mean(groups_up[g], region) if groups_up else None,
                    "prototypes": [
                        {"prototype": p, "weight": members[p], "activation": _region_mean(activations_up[p], region)}
                        for p in ranked
                    ],
                }
            )
    else:
        ranked = sorted(structure.prototypes, key=lambda p: (-_region_mean(activations_up[p], region), p))[: 2 * top]
        rows.append(
            {
                "group": None,
                "prototypes": [
                    {
                        "prototype": p,
                        "weight": structure.class_weights.get(p, 0.0),
                        "activation": _region_mean(activations_up[p], region),
                    }
                    for p in ranked
                ],
            }
        )
    per_row = max([len(r["prototypes"]) for r in rows] + [1])
    lead = 1 if structure.grouped else 0
    ncols = lead + 2 * per_row
    fig = F.new_figure(2.3 * ncols, 2.5 * max(len(rows), 1) + 0.5)
    axes = F.grid(fig, max(len(rows), 1), ncols, title_lines=2)
    for i, row in enumerate(rows):
        if structure.grouped:
            F.show_activation(
                axes[i, 0],
                display,
                groups_up[row["group"]],  # type: ignore[index]
                f"group {row['number']} (h = {row['class_weight']:.2f})",
                fontsize=8,
            )
        for j in range(lead, ncols):
            axes[i, j].axis("off")
        for j, e in enumerate(row["prototypes"]):
            p = e["prototype"]
            patch = gallery.patch(p)
            scale = f", scale {structure.scales[p] + 1}" if multiscale else ""
            wname = "w" if structure.grouped else "h"
            ax_p, ax_a = axes[i, lead + 2 * j], axes[i, lead + 2 * j + 1]
            ax_p.axis("on")
            ax_a.axis("on")
            F.show_image(
                ax_p,
                patch if patch is not None else F.placeholder(),
                f"prototype {p}{scale}\n{wname} = {e['weight']:.2f}",
                fontsize=8,
            )
            F.show_activation(ax_a, display, activations_up[p], f"activation (mean {e['activation']:.3g})", fontsize=8)
    fig.suptitle(title or f"{structure.name}: most activated prototypes per group", fontsize=11)
    F.save_figure(fig, path)
    return {"rows": rows}
