"""``explain_image``: every explanation view of one prediction, written as figures plus a JSON manifest.

For each class present in the prediction (or each class asked for):

- ``prototype_maps``: prototype activations grouped by scale (Figures 4 / 11 top, 26);
- ``group_maps``: group activations (Figures 4 / 11 bottom, 28-29), grouped runs only;
- ``group_graph``: prototypes (training patches + activation on the image) -> groups -> class with the non-zero
  weights (Figure 4, 11; for ProtoSeg prototypes -> class with h_proto, the comparison of Figures 5, 12-13);
- ``nearest_patches``: for the class's most used prototypes, their nearest training patches and activations
  (Figures 14-19), read from ``final/nearest/``;
- ``nearest_prototypes``: for 3 cells of the class region, the 3 most activated prototypes (Figures 20-25);

and, given a ground truth, ``failure`` for each class whose IoU on the image is below the threshold (Figures 27-35).
Every view records ``available`` and its ``files`` (paths relative to the output directory) in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.failure import (
    failing_classes,
    image_confusion,
    plot_failure_overview,
    plot_failure_prototypes,
)
from scaleprotoseg.explain.graph import plot_group_graph
from scaleprotoseg.explain.maps import plot_group_maps, plot_prototype_maps
from scaleprotoseg.explain.nearest import pick_cells, plot_nearest_patches, plot_nearest_prototypes, top_prototypes_at
from scaleprotoseg.explain.resources import load_galleries
from scaleprotoseg.explain.structure import class_structure, prototype_head

__all__ = ["VIEWS", "explain_image", "parse_cells", "resolve_classes"]

VIEWS = ("prototype_maps", "group_maps", "group_graph", "nearest_patches", "nearest_prototypes")
_THUMB = 120  # long side of the activation thumbnails in the group graph


class _LazyMaps:
    """Activation maps upsampled to the display size on first use (all of them at once can be gigabytes)."""

    def __init__(self, maps: torch.Tensor | None, size: tuple[int, int]) -> None:
        self.maps, self.size, self.cache = maps, size, {}

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self.cache:
            self.cache[i] = F.upsample(self.maps[int(i)], self.size)  # type: ignore[index]
        return self.cache[i]

    def __contains__(self, i: object) -> bool:
        return self.maps is not None and isinstance(i, int) and 0 <= i < self.maps.shape[0]


def _skipped() -> dict[str, Any]:
    return {"available": False, "files": [], "reason": "not requested"}


def resolve_classes(classes: Sequence[str | int] | str | None, class_names: Sequence[str]) -> list[int] | None:
    """Class names or indices (a list, or a comma-separated string) -> sorted indices; ``None`` stays ``None``."""
    if classes is None:
        return None
    items = [s.strip() for s in classes.split(",")] if isinstance(classes, str) else list(classes)
    lower = {n.lower(): i for i, n in enumerate(class_names)}
    out = set()
    for item in items:
        if item == "":
            continue
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit() and str(item).lower() not in lower):
            idx = int(item)
            if not 0 <= idx < len(class_names):
                raise ValueError(f"--classes: index {idx} is out of range; expected 0..{len(class_names) - 1}")
            out.add(idx)
        elif str(item).lower() in lower:
            out.add(lower[str(item).lower()])
        else:
            raise ValueError(f"--classes: unknown class {item!r}; expected one of {', '.join(class_names)}")
    return sorted(out)


def parse_cells(text: str | Sequence[Sequence[int]] | None) -> list[tuple[int, int]] | None:
    """``"r,c;r,c"`` (feature-grid rows and columns) or a list of pairs -> list of (row, col)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return [(int(r), int(c)) for r, c in text]
    cells = []
    for part in text.split(";"):
        if not part.strip():
            continue
        bits = part.replace(" ", "").split(",")
        if len(bits) != 2 or not all(b.lstrip("-").isdigit() for b in bits):
            raise ValueError(f"--patches: {part!r} is not a cell; expected 'row,col' pairs separated by ';'")
        cells.append((int(bits[0]), int(bits[1])))
    return cells


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if labels.shape[:2] == tuple(size):
        return labels
    ys = (np.arange(size[0]) * labels.shape[0] / size[0]).astype(np.int64)
    xs = (np.arange(size[1]) * labels.shape[1] / size[1]).astype(np.int64)
    return labels[ys][:, xs]


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _write_overview(
    out: Path,
    image: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray | None,
    names: list[str],
    palette: np.ndarray,
    ignore_index: int,
    max_side: int,
) -> dict[str, str]:
    """input, prediction (colour), overlay, ground truth, legend and a titled summary figure."""
    files: dict[str, str] = {}
    colour = F.colorize(pred, palette)
    F.write_png(out / "input.png", image)
    F.write_png(out / "prediction.png", colour)
    F.write_png(out / "overlay.png", (0.5 * image + 0.5 * colour).astype(np.uint8))
    files.update(input="input.png", prediction="prediction.png", overlay="overlay.png")
    shown = {int(v) for v in np.unique(pred) if 0 <= v < len(names)}
    lab_disp = None
    if label is not None:
        lab = np.where(label == ignore_index, 255, label)
        F.write_png(out / "label.png", F.colorize(lab, palette))
        files["label"] = "label.png"
        shown |= {int(v) for v in np.unique(lab) if 0 <= v < len(names)}
        lab_disp = F.colorize(lab, palette)
    handles = F.legend_handles(sorted(shown), names, palette)
    fig = F.new_figure(3.2, 0.45 * len(handles) + 0.8, layout="constrained")
    fig.legend(handles=handles, loc="center", fontsize=9, frameon=False)
    fig.suptitle("Legend", fontsize=11)
    F.save_figure(fig, out / "legend.png")
    files["legend"] = "legend.png"
    panels = [
        (F.fit_image(image, max_side), "image"),
        (F.fit_image((0.5 * image + 0.5 * colour).astype(np.uint8), max_side), "prediction"),
    ]
    if lab_disp is not None:
        panels.append((F.fit_image(lab_disp, max_side), "ground truth"))
    fig = F.new_figure(3.6 * len(panels), 4.2, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (img, t) in zip(axes, panels):
        F.show_image(ax, img, t, fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6) or 1, fontsize=8)
    fig.suptitle("Prediction", fontsize=12)
    F.save_figure(fig, out / "summary.png")
    files["summary"] = "summary.png"
    return files


@torch.no_grad()
def explain_image(
    predictor: Any,
    image: np.ndarray,
    out_dir: str | Path,
    *,
    label: np.ndarray | None = None,
    run_dir: str | Path | None = None,
    classes: Sequence[str | int] | str | None = None,
    patches: str | Sequence[Sequence[int]] | None = None,
    iou_threshold: float = 0.2,
    top_prototypes: int = 3,
    num_cells: int = 3,
    max_side: int = 512,
    name: str | None = None,
    views: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Explain ``predictor``'s prediction on ``image`` (uint8 RGB) into ``out_dir``; returns the manifest (also
    written as ``out_dir/manifest.json``).

    ``label``: ground truth (H, W) in the model's class indices (ignore index allowed) -> failure view.
    ``run_dir``: the run, for ``final/prototypes`` and ``final/nearest`` (default: ``predictor.run_dir`` if set;
    without it, or when ``predictor.stage`` is a checkpoint they were not written from, patches are placeholders).
    ``classes``: restrict to these classes (names or indices; also explains a class absent from the prediction).
    ``patches``: feature-grid cells ``"r,c;r,c"`` for the nearest-prototypes view (default: ``num_cells`` cells
    spread over each class region). ``top_prototypes``: how many of a class's most used prototypes get a
    nearest-patches figure. ``max_side``: long side of the image in the figures. ``views``: compute only these of
    :data:`VIEWS` (default all; the failure view depends on ``label`` only).
    """
    from scaleprotoseg.data.io import to_rgb_uint8
    from scaleprotoseg.ops import resize_labels

    image = to_rgb_uint8(np.asarray(image), source=name or "image")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = predictor.info
    names = list(info.class_names)
    palette = np.asarray(info.palette, dtype=np.uint8).reshape(-1, 3)
    C = len(names)
    H, W = image.shape[:2]
    if label is not None:
        label = np.asarray(label).astype(np.int64)
        if label.shape != (H, W):
            raise ValueError(f"label of shape {label.shape} does not match the image ({H}, {W}); expected equal sizes")

    selected = set(VIEWS if views is None else views)
    unknown = selected - set(VIEWS)
    if unknown:
        raise ValueError(f"views {sorted(unknown)} are not known; expected some of {', '.join(VIEWS)}")

    x = predictor.preprocess(image)
    pred = predictor.predict_tensor(x)[0].cpu().numpy().astype(np.int64)
    mo = predictor.maps(x)
    display = F.fit_image(image, max_side)
    dsize = (int(display.shape[0]), int(display.shape[1]))
    pred_disp = _resize_nearest(pred, dsize)
    manifest: dict[str, Any] = {
        "version": 1,
        "name": name,
        "method": info.method,
        "stage": info.stage,
        "image_size": [H, W],
        "display_size": list(dsize),
        "files": _write_overview(out, image, pred, label, names, palette, info.ignore_index, max_side),
        "predicted_classes": [int(c) for c in np.unique(pred) if 0 <= c < C],
        "classes": [],
        "failure": None,
        "notes": [],
    }

    head = prototype_head(predictor.model)
    if head is None or mo.activations is None:
        manifest["notes"].append(f"{info.method} has no prototypes: only the prediction (and its errors) is explained")
        if label is not None:
            manifest["failure"] = _failure(
                out,
                image,
                display,
                pred,
                label,
                None,
                names,
                palette,
                info.ignore_index,
                iou_threshold,
                _LazyMaps(None, dsize),
                None,
                None,
                False,
            )
        return _finish(out, manifest)

    run_dir = run_dir if run_dir is not None else getattr(predictor, "run_dir", None)
    gallery, nearest = load_galleries(run_dir, getattr(predictor, "stage", None))
    for problem in (gallery.problem, nearest.problem):
        if problem:
            manifest["notes"].append(problem)
    acts = mo.activations[0].float()
    grid = (int(acts.shape[-2]), int(acts.shape[-1]))
    groups = None if mo.group_activations is None else mo.group_activations[0].float()
    acts_up = _LazyMaps(acts, dsize)
    groups_up = _LazyMaps(groups, dsize) if groups is not None else None
    pcls = head.prototype_class.detach().cpu().tolist()
    pscale = head.prototype_scale.detach().cpu().tolist()
    multiscale = head.num_scales > 1
    pred_grid = resize_labels(torch.from_numpy(pred), grid).numpy()
    logits_grid = mo.logits[0].float().numpy()
    cells_given = parse_cells(patches)
    if cells_given:
        bad = [c for c in cells_given if not (0 <= c[0] < grid[0] and 0 <= c[1] < grid[1])]
        if bad:
            raise ValueError(f"--patches: cells {bad} are outside the feature grid of {grid[0]} x {grid[1]} cells")
    manifest["grid"] = list(grid)
    manifest["output_stride"] = int(getattr(info, "output_stride", 8))

    wanted = resolve_classes(classes, names)
    todo = manifest["predicted_classes"] if wanted is None else wanted
    small = F.fit_image(display, _THUMB)
    ctx = dict(gallery=gallery, class_names=names, prototype_class=pcls, prototype_scale=pscale, multiscale=multiscale)
    for c in todo:
        s = class_structure(head, c, names)
        cdir = out / f"class_{c:03d}_{F.slug(names[c])}"
        region = pred_disp == c
        done: dict[str, Any] = {}
        # prototype activations by scale
        if "prototype_maps" not in selected:
            done["prototype_maps"] = _skipped()
        else:
            f = cdir / "prototype_maps.png"
            res = plot_prototype_maps(
                display,
                {p: acts_up[p] for p in s.prototypes},
                s,
                f,
                multiscale=multiscale,
                title=f"{names[c]}: prototype activations by scale",
            )
            done["prototype_maps"] = {"available": True, "files": [_rel(f, out)], **res}
        # group activations
        if "group_maps" not in selected:
            done["group_maps"] = _skipped()
        else:
            if s.grouped and groups_up is not None:
                f = cdir / "group_maps.png"
                res = plot_group_maps(
                    display, {g: groups_up[g] for g in s.groups}, s, f, title=f"{names[c]}: group activations"
                )
                done["group_maps"] = {"available": True, "files": [_rel(f, out)], **res}
            else:
                done["group_maps"] = {"available": False, "files": [], "reason": "this model has no groups (ProtoSeg)"}
        # group graph
        if "group_graph" not in selected:
            done["group_graph"] = _skipped()
        else:
            f = cdir / "group_graph.png"
            thumbs = {p: F.blend_activation(small, F.upsample(acts[p], small.shape[:2])) for p in s.used_prototypes()}
            gthumbs = None
            if s.grouped and groups is not None:
                gthumbs = {g: F.blend_activation(small, F.upsample(groups[g], small.shape[:2])) for g in s.groups}
            res = plot_group_graph(
                s,
                gallery,
                f,
                palette=palette,
                activations=thumbs,
                group_maps=gthumbs,
                multiscale=multiscale,
                title=f"{names[c]}: " + ("prototypes -> groups -> class" if s.grouped else "prototypes -> class"),
            )
            done["group_graph"] = {"available": True, "files": [_rel(f, out)], **res}
        # nearest training patches of the most used prototypes
        if "nearest_patches" not in selected:
            done["nearest_patches"] = _skipped()
        else:
            weight = s.decision_weight()
            usage = {
                p: weight[p] * float(acts_up[p][region].mean() if region.any() else acts_up[p].mean())
                for p in s.prototypes
                if weight.get(p, 0.0) > 0
            }
            top = sorted(usage, key=lambda p: (-usage[p], p))[:top_prototypes]
            if nearest.available:
                entries, files = [], []
                for p in top:
                    f = cdir / f"nearest_patches_p{p:04d}.png"
                    entries.append(
                        {
                            **plot_nearest_patches(
                                p, display=display, activation=acts_up[p], nearest=nearest, path=f, **ctx
                            ),
                            "usage": usage[p],
                        }
                    )
                    files.append(_rel(f, out))
                done["nearest_patches"] = {"available": bool(files), "files": files, "prototypes": entries}
                if not files:
                    done["nearest_patches"]["reason"] = "no prototype of this class has a positive decision weight"
            else:
                done["nearest_patches"] = {
                    "available": False,
                    "files": [],
                    "reason": nearest.problem,
                    "prototypes": [{"prototype": p, "usage": usage[p]} for p in top],
                }
        # nearest prototypes of cells
        if "nearest_prototypes" not in selected:
            done["nearest_prototypes"] = _skipped()
        else:
            cells = cells_given or pick_cells(pred_grid, c, num_cells, score=logits_grid[c])
            entries, files = [], []
            for i, cell in enumerate(cells):
                best = top_prototypes_at(acts, cell, 3)
                f = cdir / f"nearest_prototypes_cell{i + 1}.png"
                plot_nearest_prototypes(
                    i,
                    cells,
                    best,
                    display=display,
                    grid=grid,
                    activations_up={p: acts_up[p] for p, _ in best},
                    path=f,
                    **ctx,
                )
                entries.append(
                    {
                        "cell": list(cell),
                        "prototypes": [p for p, _ in best],
                        "activations": [a for _, a in best],
                        "classes": [pcls[p] for p, _ in best],
                    }
                )
                files.append(_rel(f, out))
            done["nearest_prototypes"] = {"available": bool(files), "files": files, "cells": entries}
        manifest["classes"].append(
            {
                "index": c,
                "name": names[c],
                "present": c in manifest["predicted_classes"],
                "pixels": int((pred == c).sum()),
                "directory": _rel(cdir, out),
                "structure": s.to_dict(),
                "views": done,
            }
        )

    if label is not None:
        manifest["failure"] = _failure(
            out,
            image,
            display,
            pred,
            label,
            head,
            names,
            palette,
            info.ignore_index,
            iou_threshold,
            acts_up,
            groups_up,
            gallery,
            multiscale,
        )
    return _finish(out, manifest)


def _failure(
    out: Path,
    image: np.ndarray,
    display: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray,
    head: Any | None,
    names: list[str],
    palette: np.ndarray,
    ignore_index: int,
    threshold: float,
    acts_up: _LazyMaps,
    groups_up: _LazyMaps | None,
    gallery: Any,
    multiscale: bool,
) -> dict[str, Any]:
    C = len(names)
    m = image_confusion(pred, label, C, ignore_index)
    tp, gt, pr = np.diag(m), m.sum(1), m.sum(0)
    union = gt + pr - tp
    iou = {names[c]: (float(tp[c] / union[c]) if union[c] else None) for c in range(C)}
    cases = failing_classes(m, threshold)
    label_disp = _resize_nearest(label, display.shape[:2])
    fdir = out / "failure"
    for case in cases:
        c = case["class"]
        stem = f"{c:03d}_{F.slug(names[c])}"
        files: dict[str, Any] = {}
        f = fdir / f"{stem}_overview.png"
        plot_failure_overview(
            case,
            image=display,
            label=label_disp,
            pred=_resize_nearest(pred, display.shape[:2]),
            class_names=names,
            palette=palette,
            ignore_index=ignore_index,
            path=f,
        )
        files["overview"] = _rel(f, out)
        region = label_disp == c
        roles = [("true", c)] + (
            [("confusing", case["confusing_class"])] if case["confusing_class"] is not None else []
        )
        if head is None:  # DeepLabv2: the confusion only
            roles = []
        details = {}
        for role, k in roles:
            s = class_structure(head, k, names)
            if s.grouped and groups_up is not None:
                f = fdir / f"{stem}_groups_{role}_{F.slug(names[k])}.png"
                plot_group_maps(
                    display,
                    {g: groups_up[g] for g in s.groups},
                    s,
                    f,
                    title=f"group activations of '{names[k]}' ({role} class)",
                )
                files[f"groups_{role}"] = _rel(f, out)
            f = fdir / f"{stem}_prototypes_{role}_{F.slug(names[k])}.png"
            res = plot_failure_prototypes(
                s,
                display=display,
                activations_up={p: acts_up[p] for p in s.prototypes},
                groups_up=None if groups_up is None else {g: groups_up[g] for g in s.groups},
                region=region,
                gallery=gallery,
                multiscale=multiscale,
                path=f,
                title=f"'{names[k]}' ({role} class): most activated prototypes"
                + (" per group" if s.grouped else " (h_proto weights)"),
            )
            files[f"prototypes_{role}"] = _rel(f, out)
            details[role] = {"class": k, "name": names[k], **res}
        case.update(
            name=names[c],
            files=files,
            details=details,
            confusing_name=None if case["confusing_class"] is None else names[case["confusing_class"]],
        )
    return {"threshold": threshold, "iou": iou, "cases": cases}


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _finish(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = _json_safe(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
