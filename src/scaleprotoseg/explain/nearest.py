"""Nearest training patches of prototypes (supplement 14, Figures 14-19) and nearest prototypes of image patches
(supplement 15, Figures 20-25).

Training data are usually gone when a model is explained, so the nearest training patches are computed once, in the
step after training (:func:`export_final_nearest`, called by ``scaleprotoseg train``), into ``final/nearest/``:
for each prototype its k nearest labelled training cells (one per image, ProtoPNet's rule, through
:func:`scaleprotoseg.prototypes.nearest.nearest_patches`), the crop of each cell's receptive field and the
prototype's activation on that whole training image with the patch boxed. The explanations then only read those
files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.resources import NearestGallery, PrototypeGallery
from scaleprotoseg.explain.structure import prototype_head
from scaleprotoseg.models.segmenter import unwrap
from scaleprotoseg.rundir import RunDir, fresh_dir, replace_dir

__all__ = [
    "export_final_nearest",
    "export_nearest_patches",
    "pick_cells",
    "plot_nearest_patches",
    "plot_nearest_prototypes",
    "top_prototypes_at",
]


# ---------------------------------------------------------------------------------------------------------------
# Export after training
# ---------------------------------------------------------------------------------------------------------------
def export_final_nearest(run: str | Path | RunDir, *, device: torch.device | str = "cpu", k: int = 3) -> Path | None:
    """The step after training: the ``k`` nearest training patches of the prototypes of ``final/`` into
    ``final/nearest/`` (written aside, then swapped in), from the run's config and training split. Runs without
    projected prototypes get none (``None``). A failure leaves a note, ``final/nearest_error.txt``: the patches are a
    convenience and must not fail a finished run."""
    from scaleprotoseg.checkpoint import load_model
    from scaleprotoseg.data.registry import build_dataset

    run = run if isinstance(run, RunDir) else RunDir(run)
    final = run.checkpoint()
    if not final.projection.is_file():
        return None
    tmp = fresh_dir(final.path, ".nearest.tmp")
    try:
        loaded = load_model(run, None, device)
        data = loaded.config.data
        train = build_dataset(data, data.train_split, train=False)  # whole images, no augmentation
        export_nearest_patches(loaded.model, train, tmp, k=k, device=device, ignore_index=loaded.meta.ignore_index)
        replace_dir(tmp, final.nearest)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        final.error_note("nearest").write_text(f"could not save nearest training patches: {err}\n")
        return None
    return final.nearest


@torch.no_grad()
def export_nearest_patches(
    model: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    k: int = 3,
    *,
    prototype_indices: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    ignore_index: int | None = None,
    max_side: int = 320,
    progress: bool = False,
) -> dict[str, Any]:
    """Save the ``k`` nearest training patches of prototypes into ``out_dir`` (Figures 14-19) and return the
    manifest (also written as ``out_dir/manifest.json``).

    ``dataset`` yields whole, normalised training images (the projection dataset) and has ``load_raw(i)``.
    ``prototype_indices`` defaults to the prototypes that reach a decision: those with a non-zero group weight for
    grouped heads, all prototypes otherwise. For each patch: ``proto_PPPP_topJ_patch.png`` (receptive-field crop of
    the raw image) and ``proto_PPPP_topJ_activation.png`` (the prototype's activation on the whole image, nearest
    upsampled, patch boxed in red, long side at most ``max_side``). Runs on one process (``distributed=False``).
    """
    from scaleprotoseg.prototypes.boxes import scale_box
    from scaleprotoseg.prototypes.nearest import nearest_patches

    head = prototype_head(model)
    if head is None:
        raise ValueError("export_nearest_patches needs a prototype model (ProtoSeg or ScaleProtoSeg), not DeepLabv2")
    net = unwrap(model)
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if ignore_index is None:
        ignore_index = int(getattr(getattr(dataset, "info", None), "ignore_index", 255))
    P = int(head.prototype_class.numel())
    if prototype_indices is None:
        grouping = head.grouping
        prototype_indices = grouping.used_prototypes().cpu().tolist() if grouping is not None else list(range(P))
    q_idx = sorted({int(p) for p in prototype_indices})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pcls = head.prototype_class.detach().cpu().tolist()
    pscale = head.prototype_scale.detach().cpu().tolist()
    manifest: dict[str, Any] = {
        "version": 1,
        "k": int(k),
        "num_prototypes": P,
        "prototype_class": pcls,
        "prototype_scale": pscale,
        "prototypes": [],
    }
    if q_idx:
        near = nearest_patches(
            net, dataset, q_idx, k, True, device=device, ignore_index=ignore_index, progress=progress, distributed=False
        )
        slots: dict[int, list[tuple[int, int]]] = {}
        for q in range(len(q_idx)):
            for j in range(near.k):
                di = int(near.dataset_indices[q, j])
                if di >= 0 and bool(torch.isfinite(near.distances[q, j])):
                    slots.setdefault(di, []).append((q, j))
        patches: dict[int, list[dict[str, Any]]] = {q: [] for q in range(len(q_idx))}
        was_training = net.training
        net.eval()
        try:
            for di in sorted(slots):
                item = dataset[di]
                x = torch.as_tensor(item["image"]).float()
                x = (x if x.dim() == 4 else x.unsqueeze(0)).to(device)
                acts = net(x).activations[0].float().cpu()
                raw, _, _ = dataset.load_raw(di)
                raw = np.asarray(raw)
                raw_size = (int(raw.shape[0]), int(raw.shape[1]))
                disp = F.fit_image(raw, max_side)
                for q, j in slots[di]:
                    p = q_idx[q]
                    seen = tuple(int(v) for v in near.image_sizes[q, j].tolist())
                    box = tuple(int(v) for v in near.boxes[q, j].tolist())
                    raw_box = box if raw_size == seen else scale_box(box, seen, raw_size)  # type: ignore[arg-type]
                    y0, x0, y1, x1 = raw_box
                    cell = tuple(int(v) for v in near.cells[q, j].tolist())
                    stem = f"proto_{p:04d}_top{j + 1}"
                    F.write_png(out / f"{stem}_patch.png", raw[y0:y1, x0:x1])
                    amap = acts[p]
                    overlay = F.blend_activation(disp, F.upsample(amap, disp.shape[:2]))
                    F.draw_box_on_array(overlay, F.scale_box_to(raw_box, raw_size, disp.shape[:2]))
                    F.write_png(out / f"{stem}_activation.png", overlay)
                    patches[q].append(
                        {
                            "rank": j + 1,
                            "name": near.names[q][j],
                            "dataset_index": di,
                            "distance": float(near.distances[q, j]),
                            "activation": float(amap[cell[0], cell[1]]),
                            "label": int(near.labels[q, j]),
                            "cell": list(cell),
                            "box": list(box),
                            "raw_box": list(raw_box),
                            "raw_size": list(raw_size),
                            "activation_range": [float(amap.min()), float(amap.max())],
                            "patch": f"{stem}_patch.png",
                            "overlay": f"{stem}_activation.png",
                        }
                    )
        finally:
            net.train(was_training)
        for q, p in enumerate(q_idx):
            manifest["prototypes"].append(
                {
                    "prototype": p,
                    "class": pcls[p],
                    "scale": pscale[p],
                    "patches": sorted(patches[q], key=lambda e: e["rank"]),
                }
            )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------------------
def _proto_label(p: int, pcls: list[int], pscale: list[int], class_names: list[str], multiscale: bool) -> str:
    c = pcls[p]
    name = class_names[c] if 0 <= c < len(class_names) else str(c)
    return f"prototype {p} ({name}, scale {pscale[p] + 1})" if multiscale else f"prototype {p} ({name})"


def plot_nearest_patches(
    prototype: int,
    *,
    display: np.ndarray,
    activation: np.ndarray,
    gallery: PrototypeGallery,
    nearest: NearestGallery,
    class_names: list[str],
    prototype_class: list[int],
    prototype_scale: list[int],
    multiscale: bool,
    path: str | Path,
) -> dict[str, Any]:
    """Figure 14-19: first row the prototype (its projected patch) and its activation on the explained image; then
    one row per nearest training patch: the patch and the prototype's activation on that training image (boxed)."""
    entries = nearest.patches(prototype)
    rows = 1 + len(entries)
    fig = F.new_figure(6.4, 2.6 * rows + 0.4)
    axes = F.grid(fig, rows, 2, title_lines=2)
    label = _proto_label(prototype, prototype_class, prototype_scale, class_names, multiscale)
    patch = gallery.patch(prototype)
    F.show_image(
        axes[0, 0],
        patch if patch is not None else F.placeholder(),
        "prototype patch" if patch is not None else "prototype patch (missing)",
    )
    F.show_activation(axes[0, 1], display, activation, "activation on this image")
    for j, e in enumerate(entries, start=1):
        crop = nearest.image(str(e["patch"]))
        lab = int(e.get("label", -1))
        lab_name = class_names[lab] if 0 <= lab < len(class_names) else "?"
        F.show_image(
            axes[j, 0],
            crop if crop is not None else F.placeholder(),
            f"top {e['rank']}: {e.get('name')} ({lab_name})\nd = {e['distance']:.3g}",
        )
        over = nearest.image(str(e["overlay"]))
        F.show_image(axes[j, 1], over if over is not None else F.placeholder(), f"activation on {e.get('name')}")
        lo, hi = e.get("activation_range", [0.0, 1.0])
        F.add_colorbar(axes[j, 1], float(lo), float(hi))
    fig.suptitle(f"Nearest training patches of {label}", fontsize=11)
    F.save_figure(fig, path)
    return {
        "prototype": int(prototype),
        "patches": [{k: e.get(k) for k in ("rank", "name", "distance", "label", "patch", "overlay")} for e in entries],
    }


def pick_cells(
    pred_grid: np.ndarray, class_index: int, n: int = 3, score: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """``n`` cells of the class region on the feature grid, spread over it deterministically: the cells predicted as
    the class in row-major order, taken at the quantiles (i + 0.5) / n. With no such cell, the cell where ``score``
    (the class's logit map) is highest."""
    cells = np.argwhere(np.asarray(pred_grid) == int(class_index))
    if len(cells) == 0:
        if score is None:
            return []
        r, c = np.unravel_index(int(np.argmax(score)), np.asarray(score).shape)
        return [(int(r), int(c))]
    picks = sorted({min(int((i + 0.5) * len(cells) / n), len(cells) - 1) for i in range(n)})
    return [(int(cells[i][0]), int(cells[i][1])) for i in picks]


def top_prototypes_at(
    activations: torch.Tensor | np.ndarray, cell: tuple[int, int], k: int = 3
) -> list[tuple[int, float]]:
    """The ``k`` prototypes (any class) most activated at ``cell`` of ``activations (P, h, w)`` -- the nearest
    prototypes of that image patch, as Eq. 1 decreases with the distance. Ties go to the lower index."""
    a = np.asarray(activations[:, int(cell[0]), int(cell[1])], dtype=np.float64)
    order = np.argsort(-a, kind="stable")[:k]
    return [(int(p), float(a[p])) for p in order]


def plot_nearest_prototypes(
    cell_index: int,
    cells: list[tuple[int, int]],
    top: list[tuple[int, float]],
    *,
    display: np.ndarray,
    grid: tuple[int, int],
    activations_up: dict[int, np.ndarray],
    gallery: PrototypeGallery,
    class_names: list[str],
    prototype_class: list[int],
    prototype_scale: list[int],
    multiscale: bool,
    path: str | Path,
) -> None:
    """Figures 20-25: the image with the chosen cells boxed (red, green, blue), the chosen cell's neighbourhood, then
    for each of its nearest prototypes the prototype's training patch and its activation on the image (cell boxed)."""
    size = display.shape[:2]
    colour = F.BOX_COLORS[cell_index % len(F.BOX_COLORS)]
    rows = 1 + len(top)
    fig = F.new_figure(6.4, 2.6 * rows + 0.4)
    axes = F.grid(fig, rows, 2, title_lines=2)
    F.show_image(axes[0, 0], display, "image patches")
    for i, cell in enumerate(cells):
        F.draw_box(
            axes[0, 0],
            F.cell_box(cell, grid, size),
            F.BOX_COLORS[i % len(F.BOX_COLORS)],
            lw=3.0 if i == cell_index else 1.5,
        )
    r, c = cells[cell_index]
    y0, x0, y1, x1 = F.cell_box((r - 1, c - 1), grid, size)
    y1, x1 = F.cell_box((r + 1, c + 1), grid, size)[2:]
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, size[0]), min(x1, size[1])
    F.show_image(axes[0, 1], display[y0:y1, x0:x1], f"cell ({r}, {c}) and its neighbours")
    by, bx, ey, ex = F.cell_box((r, c), grid, size)
    F.draw_box(axes[0, 1], (by - y0, bx - x0, ey - y0, ex - x0), colour, lw=2.5)
    for j, (p, a) in enumerate(top, start=1):
        patch = gallery.patch(p)
        F.show_image(
            axes[j, 0],
            patch if patch is not None else F.placeholder(),
            f"top {j}: "
            + _proto_label(p, prototype_class, prototype_scale, class_names, multiscale).replace(" (", "\n(", 1),
        )
        F.show_activation(axes[j, 1], display, activations_up[p], f"activation (at cell: {a:.3g})")
        F.draw_box(axes[j, 1], F.cell_box((r, c), grid, size), colour, lw=2.0)
    fig.suptitle(f"Nearest prototypes of cell ({r}, {c})", fontsize=11)
    F.save_figure(fig, path)
