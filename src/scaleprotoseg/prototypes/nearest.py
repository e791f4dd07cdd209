"""The k nearest labelled training patches of prototypes (ProtoPNet ``find_nearest.py``).

:func:`nearest_patches` / :func:`find_nearest_patches`: the k nearest labelled training cells of each prototype,
one per image by default, as ProtoPNet's ``find_k_nearest_patches_to_prototypes`` keeps for every image only
``np.amin`` of the prototype's distance map, i.e. the closest patch of that image, in a size-k heap. ProtoSeg's
segmentation version (gmum/proto-segmentation, reused by the ScaleProtoSeg release) does the same per image after
excluding void cells. The search is :func:`scaleprotoseg.prototypes.streaming.best_k`. Used by pruning
(:mod:`scaleprotoseg.prototypes.pruning`) and the explanations (nearest training patches, Figures 14-19).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from scaleprotoseg.prototypes.streaming import ImageMaps, best_k, prototype_head, smallest_cells, unwrap


@dataclass
class NearestPatches:
    """The k nearest labelled training cells of some prototypes, nearest first; empty slots hold -1 (``inf``).

    prototype_indices: (Q,) which prototypes (model numbering at search time).
    distances: (Q, k) squared distances. labels: (Q, k) class of each patch. dataset_indices: (Q, k).
    cells: (Q, k, 2) (row, col) on the feature grid. boxes: (Q, k, 4) receptive-field (y0, x0, y1, x1) in pixels.
    image_sizes: (Q, k, 2) (H, W) of the image as the model saw it. names: (Q, k) sample names (``None`` if empty).
    """

    prototype_indices: torch.Tensor
    distances: torch.Tensor
    labels: torch.Tensor
    dataset_indices: torch.Tensor
    cells: torch.Tensor
    boxes: torch.Tensor
    image_sizes: torch.Tensor
    names: list[list[str | None]]

    @property
    def k(self) -> int:
        return self.distances.shape[1]


def _footprint_label(label: torch.Tensor, cell: tuple[int, int], grid: tuple[int, int], own: int, ignore: int) -> int:
    """ProtoSeg release's patch label: the prototype's class if any pixel of the cell's footprint
    ``[int(row * H / h), int((row + 1) * H / h))`` has it, else the footprint's most common labelled class."""
    H, W = label.shape
    ph, pw = H / grid[0], W / grid[1]
    r, c = cell
    y0, x0 = int(r * ph), int(c * pw)
    patch = label[y0 : max(int((r + 1) * ph), y0 + 1), x0 : max(int((c + 1) * pw), x0 + 1)]
    if bool((patch == own).any()):
        return own
    vals = patch[patch != ignore]
    if vals.numel() == 0:
        return -1
    v, counts = torch.unique(vals, return_counts=True)
    return int(v[counts.argmax()])


@torch.no_grad()
def nearest_patches(
    model: nn.Module,
    dataset: Any,
    prototype_indices: Sequence[int] | torch.Tensor | None = None,
    k: int = 6,
    one_per_image: bool = True,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    patch_label: Literal["cell", "footprint"] = "cell",
    distributed: bool | None = None,
) -> NearestPatches:
    """The ``k`` nearest labelled training cells (any class, ignore cells excluded) of each selected prototype.

    With ``one_per_image`` (default, ProtoPNet's ``find_k_nearest_patches_to_prototypes``) each image contributes at
    most its closest cell; otherwise any cells. Streaming top-k per prototype with the (distance, dataset index,
    cell index) order, sharded and merged under ``torch.distributed`` like the projection.
    ``patch_label="cell"`` labels a patch with its cell's (nearest-downsampled) class; ``"footprint"`` follows the
    ProtoSeg release: the prototype's class if any pixel under the cell has it, else the most common pixel class.
    Used for pruning and for the explanations' nearest training patches (paper Figures 14-19).
    """
    if k < 1:
        raise ValueError(f"k is {k}; expected k >= 1")
    if patch_label not in ("cell", "footprint"):
        raise ValueError(f"patch_label {patch_label!r}; expected 'cell' or 'footprint'")
    device = torch.device(device)
    head = prototype_head(unwrap(model))
    P = head.prototype_class.numel()
    q_idx = (
        torch.arange(P) if prototype_indices is None else torch.as_tensor(prototype_indices, dtype=torch.long).flatten()
    )
    if q_idx.numel() and (int(q_idx.min()) < 0 or int(q_idx.max()) >= P):
        raise ValueError(f"prototype_indices {q_idx.tolist()} out of range; the model has {P} prototypes")
    num_classes = head.num_classes
    own_cls = head.prototype_class.to(device).index_select(0, q_idx.to(device)).tolist()

    def labelled_cells(maps: ImageMaps) -> tuple[torch.Tensor, torch.Tensor]:
        lab = maps.grid_label
        labelled = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
        masked = torch.where(labelled.unsqueeze(0), maps.distances, math.inf)
        return smallest_cells(masked, 1 if one_per_image else k)

    def patch_labels(maps: ImageMaps, cells: torch.Tensor, enters: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = maps.grid_label[cells]
        if patch_label == "footprint":
            w = maps.grid[1]
            for q, j in enters.nonzero().tolist():
                c = int(cells[q, j])
                labels[q, j] = _footprint_label(maps.label, (c // w, c % w), maps.grid, own_cls[q], ignore_index)
        return {"label": labels}

    best = best_k(
        model,
        dataset,
        k=k,
        propose=labelled_cells,
        fill=patch_labels,
        initial={"label": torch.full((q_idx.numel(), k), -1, dtype=torch.long, device=device)},
        prototypes=None if prototype_indices is None else q_idx,
        device=device,
        num_workers=num_workers,
        progress=progress,
        desc="nearest patches",
        distributed=distributed,
    )
    return NearestPatches(
        prototype_indices=best.prototypes,
        distances=best.distances,
        labels=torch.where(best.empty, -1, best.payload["label"]),
        dataset_indices=best.dataset_indices,
        cells=best.cells,
        boxes=best.boxes,
        image_sizes=best.image_sizes,
        names=best.names,
    )


def find_nearest_patches(model: nn.Module, dataset: Any, *, k: int = 6, **search: Any) -> NearestPatches:
    """ProtoPNet's k-nearest-patches search for every prototype, one patch (the closest cell) per image;
    ``search``: the keyword options of :func:`nearest_patches` (``device``, ``ignore_index``, ``num_workers``,
    ``progress``, ``patch_label``, ``distributed``)."""
    return nearest_patches(model, dataset, None, k, True, **search)
