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

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from scaleprotoseg.explain.resources import NearestGallery, PrototypeGallery, load_galleries
from scaleprotoseg.explain.structure import ClassStructure, class_structure, prototype_head
from scaleprotoseg.models.heads import ModelOutput, PrototypeHead
from scaleprotoseg.models.segmenter import Segmenter
from scaleprotoseg.ops import resize_labels, upsample_logits

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


@dataclass(frozen=True)
class _ImageAnalysis:
    """What every view of one image reads: the image, its prediction, the model's maps, the classes to explain and
    the output directory."""

    image: np.ndarray  # uint8 RGB (H, W, 3)
    label: np.ndarray | None  # ground truth (H, W) int64, or None
    pred: np.ndarray  # prediction (H, W) int64
    maps: ModelOutput  # the model's output on the feature grid, on the CPU
    display: np.ndarray  # the image as the figures show it (long side max_side)
    pred_display: np.ndarray  # the prediction at the display size
    out: Path
    names: list[str]
    palette: np.ndarray  # (C, 3) uint8
    ignore_index: int
    classes: tuple[int, ...] = ()  # the classes explained view by view

    @property
    def display_size(self) -> tuple[int, int]:
        return int(self.display.shape[0]), int(self.display.shape[1])

    @property
    def predicted_classes(self) -> list[int]:
        return [int(c) for c in np.unique(self.pred) if 0 <= c < len(self.names)]

    def rel(self, path: Path) -> str:
        """``path`` relative to the output directory, as the manifest lists it."""
        return _rel(path, self.out)


@dataclass(frozen=True)
class _PrototypeMaps:
    """The prototype side of one image: the head, the activation maps (feature grid, and upsampled to the display size
    on demand), the galleries of the run, and the options of the per-class views."""

    head: PrototypeHead
    acts: torch.Tensor  # (P, h, w)
    groups: torch.Tensor | None  # (G, h, w), grouped heads only
    acts_up: _LazyMaps
    groups_up: _LazyMaps | None
    gallery: PrototypeGallery
    nearest: NearestGallery
    cells: list[tuple[int, int]] | None  # the cells asked for (None: picked per class)
    top_prototypes: int
    num_cells: int

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.acts.shape[-2]), int(self.acts.shape[-1])

    @property
    def multiscale(self) -> bool:
        return self.head.num_scales > 1

    @property
    def prototype_class(self) -> list[int]:
        return self.head.prototype_class.detach().cpu().tolist()

    def context(self, names: list[str]) -> dict[str, Any]:
        """The keyword arguments the nearest-patch figures share."""
        return dict(
            gallery=self.gallery,
            class_names=names,
            prototype_class=self.prototype_class,
            prototype_scale=self.head.prototype_scale.detach().cpu().tolist(),
            multiscale=self.multiscale,
        )


def _single_pass(predictor: Any, x: torch.Tensor) -> bool:
    """Whether the predictor's test protocol is the plain forward pass upsampled (``whole``, one input scale of 1, no
    flip, not tiled), so that the prediction can come from the forward pass the maps come from."""
    settings, tiled = getattr(predictor, "inference", None), getattr(predictor, "tiled", None)
    if settings is None or tiled is None:
        return False
    return (
        settings.mode == "whole"
        and tuple(float(s) for s in settings.msc_scales) in ((), (1.0,))
        and not settings.flip
        and not tiled(int(x.shape[-2]), int(x.shape[-1]))
    )


def _inference_logits(model: torch.nn.Module, out: ModelOutput) -> torch.Tensor:
    """The class scores that prediction computes (``Segmenter.logits``) for the input of the forward pass ``out``.

    A prototype head's inference path sums in another order than its forward pass (:mod:`scaleprotoseg.models.fused`;
    the logits differ by float round-off), so they are computed again from the forward pass's features, without the
    backbone: that keeps the labels bit-identical to :meth:`Predictor.predict`'s. DeepLabv2's (and a wrapped model's,
    which prediction calls as a plain module) are the forward pass's own.
    """
    head = model.head if isinstance(model, Segmenter) else None
    if isinstance(head, PrototypeHead) and out.features is not None:
        return head.logits_from_features(out.features).float()
    return out.logits.float()


def _predict_and_map(predictor: Any, x: torch.Tensor) -> tuple[np.ndarray, ModelOutput]:
    """The prediction (H, W) int64 of the normalised image ``x`` (1, 3, H, W) with the predictor's test protocol,
    and the model's maps (on the CPU), with one backbone pass when the protocol allows it."""
    if not _single_pass(predictor, x):
        # the protocol runs the network on other inputs than the maps' forward pass (resized, at other scales,
        # flipped or in tiles): its prediction needs passes of its own
        pred = predictor.predict_tensor(x)[0].cpu().numpy().astype(np.int64)
        return pred, predictor.maps(x)
    out = predictor.model(x.to(predictor.device))
    # the upsampling of evaluation.inference.predict_logits in whole mode
    logits = upsample_logits(_inference_logits(predictor.model, out), (int(x.shape[-2]), int(x.shape[-1])))
    pred = logits.argmax(1)[0].cpu().numpy().astype(np.int64)
    return pred, out.map(lambda t: t.detach().cpu())


def _write_overview(a: _ImageAnalysis, max_side: int) -> dict[str, str]:
    """input, prediction (colour), overlay, ground truth, legend and a titled summary figure."""
    out, image, names, palette = a.out, a.image, a.names, a.palette
    files: dict[str, str] = {}
    colour = F.colorize(a.pred, palette)
    F.write_png(out / "input.png", image)
    F.write_png(out / "prediction.png", colour)
    F.write_png(out / "overlay.png", (0.5 * image + 0.5 * colour).astype(np.uint8))
    files.update(input="input.png", prediction="prediction.png", overlay="overlay.png")
    shown = {int(v) for v in np.unique(a.pred) if 0 <= v < len(names)}
    lab_disp = None
    if a.label is not None:
        lab = np.where(a.label == a.ignore_index, 255, a.label)
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


def _analyse(predictor: Any, image: np.ndarray, out: Path, label: np.ndarray | None, max_side: int) -> _ImageAnalysis:
    """Predict and map ``image`` once for every view."""
    info = predictor.info
    x = predictor.preprocess(image)
    pred, maps = _predict_and_map(predictor, x)
    display = F.fit_image(image, max_side)
    return _ImageAnalysis(
        image=image,
        label=label,
        pred=pred,
        maps=maps,
        display=display,
        pred_display=_resize_nearest(pred, (int(display.shape[0]), int(display.shape[1]))),
        out=out,
        names=list(info.class_names),
        palette=np.asarray(info.palette, dtype=np.uint8).reshape(-1, 3),
        ignore_index=info.ignore_index,
    )


def _prototype_maps(
    a: _ImageAnalysis,
    head: PrototypeHead,
    galleries: tuple[PrototypeGallery, NearestGallery],
    cells: list[tuple[int, int]] | None,
    top_prototypes: int,
    num_cells: int,
) -> _PrototypeMaps:
    """The activation maps of ``a`` (a prototype model's) with the head, the galleries and the view options."""
    assert a.maps.activations is not None
    acts = a.maps.activations[0].float()
    groups = None if a.maps.group_activations is None else a.maps.group_activations[0].float()
    return _PrototypeMaps(
        head=head,
        acts=acts,
        groups=groups,
        acts_up=_LazyMaps(acts, a.display_size),
        groups_up=_LazyMaps(groups, a.display_size) if groups is not None else None,
        gallery=galleries[0],
        nearest=galleries[1],
        cells=cells,
        top_prototypes=top_prototypes,
        num_cells=num_cells,
    )


def _check_cells(cells: list[tuple[int, int]] | None, grid: tuple[int, int]) -> None:
    bad = [c for c in cells or [] if not (0 <= c[0] < grid[0] and 0 <= c[1] < grid[1])]
    if bad:
        raise ValueError(f"--patches: cells {bad} are outside the feature grid of {grid[0]} x {grid[1]} cells")


def _view_prototype_maps(a: _ImageAnalysis, p: _PrototypeMaps, s: ClassStructure, cdir: Path) -> dict[str, Any]:
    """Prototype activations of the class by scale."""
    f = cdir / "prototype_maps.png"
    title = f"{a.names[s.index]}: prototype activations by scale"
    res = plot_prototype_maps(
        a.display, {q: p.acts_up[q] for q in s.prototypes}, s, f, multiscale=p.multiscale, title=title
    )
    return {"available": True, "files": [a.rel(f)], **res}


def _view_group_maps(a: _ImageAnalysis, p: _PrototypeMaps, s: ClassStructure, cdir: Path) -> dict[str, Any]:
    """Group activations of the class (grouped heads only)."""
    if not (s.grouped and p.groups_up is not None):
        return {"available": False, "files": [], "reason": "this model has no groups (ProtoSeg)"}
    f = cdir / "group_maps.png"
    groups_up = p.groups_up
    res = plot_group_maps(
        a.display, {g: groups_up[g] for g in s.groups}, s, f, title=f"{a.names[s.index]}: group activations"
    )
    return {"available": True, "files": [a.rel(f)], **res}


def _view_group_graph(a: _ImageAnalysis, p: _PrototypeMaps, s: ClassStructure, cdir: Path) -> dict[str, Any]:
    """Prototypes (training patch, activation thumbnail) -> groups -> class with the non-zero weights."""
    f = cdir / "group_graph.png"
    small = F.fit_image(a.display, _THUMB)
    thumbs = {q: F.blend_activation(small, F.upsample(p.acts[q], small.shape[:2])) for q in s.used_prototypes()}
    gthumbs = None
    if s.grouped and p.groups is not None:
        gthumbs = {g: F.blend_activation(small, F.upsample(p.groups[g], small.shape[:2])) for g in s.groups}
    res = plot_group_graph(
        s,
        p.gallery,
        f,
        palette=a.palette,
        activations=thumbs,
        group_maps=gthumbs,
        multiscale=p.multiscale,
        title=f"{a.names[s.index]}: " + ("prototypes -> groups -> class" if s.grouped else "prototypes -> class"),
    )
    return {"available": True, "files": [a.rel(f)], **res}


def _view_nearest_patches(a: _ImageAnalysis, p: _PrototypeMaps, s: ClassStructure, cdir: Path) -> dict[str, Any]:
    """Nearest training patches of the class's most used prototypes (decision weight x mean activation)."""
    region = a.pred_display == s.index
    weight = s.decision_weight()
    usage = {
        q: weight[q] * float(p.acts_up[q][region].mean() if region.any() else p.acts_up[q].mean())
        for q in s.prototypes
        if weight.get(q, 0.0) > 0
    }
    top = sorted(usage, key=lambda q: (-usage[q], q))[: p.top_prototypes]
    if not p.nearest.available:
        prototypes = [{"prototype": q, "usage": usage[q]} for q in top]
        return {"available": False, "files": [], "reason": p.nearest.problem, "prototypes": prototypes}
    entries, files = [], []
    ctx = p.context(a.names)
    for q in top:
        f = cdir / f"nearest_patches_p{q:04d}.png"
        drawn = plot_nearest_patches(q, display=a.display, activation=p.acts_up[q], nearest=p.nearest, path=f, **ctx)
        entries.append({**drawn, "usage": usage[q]})
        files.append(a.rel(f))
    view: dict[str, Any] = {"available": bool(files), "files": files, "prototypes": entries}
    if not files:
        view["reason"] = "no prototype of this class has a positive decision weight"
    return view


def _view_nearest_prototypes(a: _ImageAnalysis, p: _PrototypeMaps, s: ClassStructure, cdir: Path) -> dict[str, Any]:
    """The 3 most activated prototypes of cells of the class region (or of the cells asked for)."""
    c = s.index
    pred_grid = resize_labels(torch.from_numpy(a.pred), p.grid).numpy()
    cells = p.cells or pick_cells(pred_grid, c, p.num_cells, score=a.maps.logits[0].float().numpy()[c])
    pcls, ctx = p.prototype_class, p.context(a.names)
    entries, files = [], []
    for i, cell in enumerate(cells):
        best = top_prototypes_at(p.acts, cell, 3)
        f = cdir / f"nearest_prototypes_cell{i + 1}.png"
        activations_up = {q: p.acts_up[q] for q, _ in best}
        plot_nearest_prototypes(
            i, cells, best, display=a.display, grid=p.grid, activations_up=activations_up, path=f, **ctx
        )
        entries.append(
            {
                "cell": list(cell),
                "prototypes": [q for q, _ in best],
                "activations": [v for _, v in best],
                "classes": [pcls[q] for q, _ in best],
            }
        )
        files.append(a.rel(f))
    return {"available": bool(files), "files": files, "cells": entries}


_View = Callable[[_ImageAnalysis, _PrototypeMaps, ClassStructure, Path], dict[str, Any]]
_VIEW_FUNCTIONS: dict[str, _View] = {
    "prototype_maps": _view_prototype_maps,
    "group_maps": _view_group_maps,
    "group_graph": _view_group_graph,
    "nearest_patches": _view_nearest_patches,
    "nearest_prototypes": _view_nearest_prototypes,
}


def _explain_class(a: _ImageAnalysis, p: _PrototypeMaps, c: int, selected: set[str]) -> dict[str, Any]:
    """The views of class ``c`` asked for (in the order of :data:`VIEWS`), as its manifest entry."""
    s = class_structure(p.head, c, a.names)
    cdir = a.out / f"class_{c:03d}_{F.slug(a.names[c])}"
    views = {v: _VIEW_FUNCTIONS[v](a, p, s, cdir) if v in selected else _skipped() for v in VIEWS}
    return {
        "index": c,
        "name": a.names[c],
        "present": c in a.predicted_classes,
        "pixels": int((a.pred == c).sum()),
        "directory": a.rel(cdir),
        "structure": s.to_dict(),
        "views": views,
    }


def _manifest(a: _ImageAnalysis, info: Any, name: str | None, max_side: int) -> dict[str, Any]:
    """The manifest's image part, with the overview figures written."""
    return {
        "version": 1,
        "name": name,
        "method": info.method,
        "stage": info.stage,
        "image_size": list(a.image.shape[:2]),
        "display_size": list(a.display_size),
        "files": _write_overview(a, max_side),
        "predicted_classes": a.predicted_classes,
        "classes": [],
        "failure": None,
        "notes": [],
    }


def _checked_label(label: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """The ground truth as int64, refused unless of the image's ``size``."""
    if label is None:
        return None
    label = np.asarray(label).astype(np.int64)
    if label.shape != size:
        raise ValueError(f"label of shape {label.shape} does not match the image {size}; expected equal sizes")
    return label


def _checked_views(views: Sequence[str] | None) -> set[str]:
    selected = set(VIEWS if views is None else views)
    unknown = selected - set(VIEWS)
    if unknown:
        raise ValueError(f"views {sorted(unknown)} are not known; expected some of {', '.join(VIEWS)}")
    return selected


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

    image = to_rgb_uint8(np.asarray(image), source=name or "image")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = _checked_label(label, image.shape[:2])
    selected = _checked_views(views)
    info = predictor.info
    a = _analyse(predictor, image, out, label, max_side)
    manifest = _manifest(a, info, name, max_side)
    head = prototype_head(predictor.model)
    if head is None or a.maps.activations is None:
        manifest["notes"].append(f"{info.method} has no prototypes: only the prediction (and its errors) is explained")
        if label is not None:
            manifest["failure"] = _failure(a, iou_threshold, None)
        return _finish(out, manifest)
    run_dir = run_dir if run_dir is not None else getattr(predictor, "run_dir", None)
    galleries = load_galleries(run_dir, getattr(predictor, "stage", None))
    manifest["notes"] += [g.problem for g in galleries if g.problem]
    cells = parse_cells(patches)
    p = _prototype_maps(a, head, galleries, cells, top_prototypes, num_cells)
    _check_cells(cells, p.grid)
    manifest["grid"] = list(p.grid)
    manifest["output_stride"] = int(getattr(info, "output_stride", 8))
    wanted = resolve_classes(classes, a.names)
    a = dataclasses.replace(a, classes=tuple(a.predicted_classes if wanted is None else wanted))
    manifest["classes"] = [_explain_class(a, p, c, selected) for c in a.classes]
    if label is not None:
        manifest["failure"] = _failure(a, iou_threshold, p)
    return _finish(out, manifest)


def _failure(a: _ImageAnalysis, threshold: float, p: _PrototypeMaps | None) -> dict[str, Any]:
    """The failure view: IoU of every class on the image, and figures for each class below ``threshold``."""
    assert a.label is not None
    C = len(a.names)
    m = image_confusion(a.pred, a.label, C, a.ignore_index)
    tp, gt, pr = np.diag(m), m.sum(1), m.sum(0)
    union = gt + pr - tp
    iou = {a.names[c]: (float(tp[c] / union[c]) if union[c] else None) for c in range(C)}
    cases = failing_classes(m, threshold)
    label_disp = _resize_nearest(a.label, a.display.shape[:2])
    for case in cases:
        _failure_case(a, case, label_disp, p)
    return {"threshold": threshold, "iou": iou, "cases": cases}


def _failure_case(a: _ImageAnalysis, case: dict[str, Any], label_disp: np.ndarray, p: _PrototypeMaps | None) -> None:
    """Write the figures of one failing class and complete its ``case`` record (name, files, details)."""
    c, names, fdir = case["class"], a.names, a.out / "failure"
    stem = f"{c:03d}_{F.slug(names[c])}"
    files: dict[str, Any] = {}
    f = fdir / f"{stem}_overview.png"
    plot_failure_overview(
        case,
        image=a.display,
        label=label_disp,
        pred=a.pred_display,
        class_names=names,
        palette=a.palette,
        ignore_index=a.ignore_index,
        path=f,
    )
    files["overview"] = a.rel(f)
    roles = [("true", c)] + ([("confusing", case["confusing_class"])] if case["confusing_class"] is not None else [])
    details = {}
    if p is not None:  # without prototypes (DeepLabv2): the confusion only
        for role, k in roles:
            role_files, details[role] = _failure_role(a, p, role, k, region=label_disp == c, stem=stem)
            files.update(role_files)
    case.update(
        name=names[c],
        files=files,
        details=details,
        confusing_name=None if case["confusing_class"] is None else names[case["confusing_class"]],
    )


def _failure_role(
    a: _ImageAnalysis, p: _PrototypeMaps, role: str, k: int, *, region: np.ndarray, stem: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """Group maps and most activated prototypes of class ``k`` in its ``role`` (true or confusing class) of a
    failure: (files by key, details)."""
    names, fdir, groups_up = a.names, a.out / "failure", p.groups_up
    s = class_structure(p.head, k, names)
    files = {}
    if s.grouped and groups_up is not None:
        f = fdir / f"{stem}_groups_{role}_{F.slug(names[k])}.png"
        title = f"group activations of '{names[k]}' ({role} class)"
        plot_group_maps(a.display, {g: groups_up[g] for g in s.groups}, s, f, title=title)
        files[f"groups_{role}"] = a.rel(f)
    f = fdir / f"{stem}_prototypes_{role}_{F.slug(names[k])}.png"
    res = plot_failure_prototypes(
        s,
        display=a.display,
        activations_up={q: p.acts_up[q] for q in s.prototypes},
        groups_up=None if groups_up is None else {g: groups_up[g] for g in s.groups},
        region=region,
        gallery=p.gallery,
        multiscale=p.multiscale,
        path=f,
        title=f"'{names[k]}' ({role} class): most activated prototypes"
        + (" per group" if s.grouped else " (h_proto weights)"),
    )
    files[f"prototypes_{role}"] = a.rel(f)
    return files, {"class": k, "name": names[k], **res}


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
