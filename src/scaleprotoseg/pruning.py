"""Nearest training patches of prototypes and ProtoSeg's pruning (ProtoPNet ``find_nearest.py`` / ``prune.py``).

- :func:`nearest_patches` / :func:`find_nearest_patches`: the k nearest labelled training cells of each prototype,
  one per image by default, as ProtoPNet's ``find_k_nearest_patches_to_prototypes`` keeps for every image only
  ``np.amin`` of the prototype's distance map, i.e. the closest patch of that image, in a size-k heap. ProtoSeg's
  segmentation version (gmum/proto-segmentation, reused by the ScaleProtoSeg release) does the same per image after
  excluding void cells. Reused by the explanations (nearest training patches, Figures 14-19).
- :func:`prune_prototypes`: ProtoPNet's pruning for the ProtoSeg baseline: a prototype is removed when fewer than
  ``threshold`` (3) of its ``k`` (6) nearest patches belong to its class. Unlike ProtoPNet, we never remove every
  prototype of a class: when that would happen, the class's best prototype is kept with a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from scaleprotoseg.ops import resize_labels
from scaleprotoseg.projection import prototype_rates, receptive_field_box
from scaleprotoseg.streaming import (
    SENTINEL,
    all_gather,
    all_gather_object,
    comm_device,
    forward_maps,
    iter_shard,
    key_less,
    lex_order,
    progress_bar,
    prototype_head,
    shard_info,
    unpack_item,
    unwrap,
)


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


@dataclass
class PruneReport:
    """ProtoPNet pruning outcome, old numbering. ``own_class_counts[p]``: how many of p's k nearest patches are of
    p's class; ``rescued``: prototypes that failed the test but were kept as their class's last prototype."""

    kept: list[int]
    pruned: list[int]
    rescued: list[int]
    own_class_counts: list[int]
    k: int
    threshold: int
    nearest: NearestPatches | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "threshold": self.threshold,
            "num_before": len(self.own_class_counts),
            "num_after": len(self.kept),
            "kept": self.kept,
            "pruned": self.pruned,
            "rescued": self.rescued,
            "own_class_counts": self.own_class_counts,
        }


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
    cell index) order, sharded and merged under ``torch.distributed`` like :func:`project_prototypes`.
    ``patch_label="cell"`` labels a patch with its cell's (nearest-downsampled) class; ``"footprint"`` follows the
    ProtoSeg release: the prototype's class if any pixel under the cell has it, else the most common pixel class.
    Used for pruning and for the explanations' nearest training patches (paper Figures 14-19).
    """
    if k < 1:
        raise ValueError(f"k is {k}; expected k >= 1")
    if patch_label not in ("cell", "footprint"):
        raise ValueError(f"patch_label {patch_label!r}; expected 'cell' or 'footprint'")
    device = torch.device(device)
    net = unwrap(model)
    head = prototype_head(net)
    rank, world = shard_info(distributed)
    P = head.prototype_class.numel()
    q_idx = (
        torch.arange(P) if prototype_indices is None else torch.as_tensor(prototype_indices, dtype=torch.long).flatten()
    )
    if q_idx.numel() and (int(q_idx.min()) < 0 or int(q_idx.max()) >= P):
        raise ValueError(f"prototype_indices {q_idx.tolist()} out of range; the model has {P} prototypes")
    q_dev = q_idx.to(device)
    Q = q_idx.numel()
    num_classes = int(getattr(head, "num_classes", int(head.prototype_class.max()) + 1))
    own_cls = head.prototype_class.to(device).index_select(0, q_dev)

    run_d = torch.full((Q, k), math.inf, device=device)
    run_i = torch.full((Q, k), SENTINEL, dtype=torch.long, device=device)
    run_c = torch.full((Q, k), SENTINEL, dtype=torch.long, device=device)
    run_l = torch.full((Q, k), -1, dtype=torch.long, device=device)
    meta: dict[int, tuple[str, int, int, int]] = {}  # dataset index -> (name, H, W, grid width)

    was_training = net.training
    net.eval()
    try:
        items, total = iter_shard(dataset, rank, world, num_workers)
        for pos, item in progress_bar(items, total, "nearest patches", progress and rank == 0):
            x, label, index, name = unpack_item(item, pos, device)
            _, dists = forward_maps(net, x)
            h, w = dists.shape[-2:]
            lab = resize_labels(label, (h, w)).reshape(-1)
            labelled = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
            masked = torch.where(labelled.unsqueeze(0), dists.reshape(P, -1).index_select(0, q_dev).float(), math.inf)
            if one_per_image:
                cand_c = masked.argmin(dim=1, keepdim=True)
                cand_d = masked.gather(1, cand_c)
            else:
                m = min(k, h * w)
                sd, sc = torch.sort(masked, dim=1, stable=True)
                cand_d, cand_c = sd[:, :m], sc[:, :m]
            valid = torch.isfinite(cand_d)
            cand_i = torch.where(valid, torch.full_like(cand_c, index), SENTINEL)
            cand_l = torch.where(valid, lab[cand_c], -1)
            if patch_label == "footprint":
                worst_d, worst_i, worst_c = run_d[:, -1:], run_i[:, -1:], run_c[:, -1:]
                enters = valid & key_less(cand_d, cand_i, cand_c, worst_d, worst_i, worst_c)
                for q, j in enters.nonzero().tolist():
                    c = int(cand_c[q, j])
                    cand_l[q, j] = _footprint_label(label, (c // w, c % w), (h, w), int(own_cls[q]), ignore_index)
            cand_c = torch.where(valid, cand_c, SENTINEL)
            all_d, all_i = torch.cat([run_d, cand_d], 1), torch.cat([run_i, cand_i], 1)
            all_c, all_l = torch.cat([run_c, cand_c], 1), torch.cat([run_l, cand_l], 1)
            perm = lex_order(all_d, all_i, all_c)[:, :k]
            run_d, run_i, run_c, run_l = (t.gather(1, perm) for t in (all_d, all_i, all_c, all_l))
            meta[index] = (name, int(x.shape[-2]), int(x.shape[-1]), int(w))
            if len(meta) > 4 * Q * k:
                live = set(run_i.flatten().tolist())
                meta = {kk: v for kk, v in meta.items() if kk in live}
    finally:
        net.train(was_training)

    live = set(run_i.flatten().tolist())
    meta = {kk: v for kk, v in meta.items() if kk in live}
    if world > 1:
        comm = comm_device(device)
        gathered = [all_gather(t, comm) for t in (run_d, run_i, run_c, run_l)]
        all_d, all_i, all_c, all_l = (torch.cat(g, dim=1) for g in gathered)
        perm = lex_order(all_d, all_i, all_c)[:, :k]
        run_d, run_i, run_c, run_l = (t.gather(1, perm) for t in (all_d, all_i, all_c, all_l))
        meta = {kk: v for m in all_gather_object(meta) for kk, v in m.items()}

    run_d, run_i, run_c, run_l = run_d.cpu(), run_i.cpu(), run_c.cpu(), run_l.cpu()
    rates = prototype_rates(head)
    os_ = int(getattr(net, "output_stride", 8))
    cells = torch.full((Q, k, 2), -1, dtype=torch.long)
    boxes = torch.full((Q, k, 4), -1, dtype=torch.long)
    sizes = torch.full((Q, k, 2), -1, dtype=torch.long)
    names: list[list[str | None]] = [[None] * k for _ in range(Q)]
    empty = ~torch.isfinite(run_d)
    for q in range(Q):
        for j in range(k):
            if bool(empty[q, j]):
                continue
            name, H, W, w = meta[int(run_i[q, j])]
            c = int(run_c[q, j])
            rc = (c // w, c % w)
            cells[q, j] = torch.tensor(rc)
            sizes[q, j] = torch.tensor((H, W))
            boxes[q, j] = torch.tensor(
                receptive_field_box(rc, rate=rates[int(q_idx[q])], output_stride=os_, image_size=(H, W))
            )
            names[q][j] = name
    return NearestPatches(
        prototype_indices=q_idx.clone(),
        distances=run_d,
        labels=torch.where(empty, -1, run_l),
        dataset_indices=torch.where(empty, -1, run_i),
        cells=cells,
        boxes=boxes,
        image_sizes=sizes,
        names=names,
    )


def find_nearest_patches(
    model: nn.Module,
    dataset: Any,
    *,
    k: int = 6,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    patch_label: Literal["cell", "footprint"] = "cell",
    distributed: bool | None = None,
) -> NearestPatches:
    """ProtoPNet's k-nearest-patches search for every prototype, one patch (the closest cell) per image."""
    return nearest_patches(
        model,
        dataset,
        None,
        k,
        True,
        device=device,
        ignore_index=ignore_index,
        num_workers=num_workers,
        progress=progress,
        patch_label=patch_label,
        distributed=distributed,
    )


@torch.no_grad()
def prune_prototypes(
    model: nn.Module,
    dataset: Any,
    *,
    k: int = 6,
    threshold: int = 3,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    patch_label: Literal["cell", "footprint"] = "cell",
    nearest: NearestPatches | None = None,
    distributed: bool | None = None,
) -> PruneReport:
    """ProtoPNet pruning for the ProtoSeg baseline (``prune.py``; k = 6, threshold = 3): prune a prototype when
    fewer than ``threshold`` of its ``k`` nearest training patches (one per image) belong to its class.

    Safeguard (not in ProtoPNet): a class never loses all its prototypes; if every prototype of a class fails,
    the best one (most own-class patches, then smallest summed patch distance, then lowest index) is kept and a
    warning names it. Calls ``head.remove_prototypes(keep)``; pass ``nearest`` to reuse an earlier search.
    """
    head = prototype_head(unwrap(model))
    P = head.prototype_class.numel()
    if nearest is None:
        nearest = find_nearest_patches(
            model,
            dataset,
            k=k,
            device=device,
            ignore_index=ignore_index,
            num_workers=num_workers,
            progress=progress,
            patch_label=patch_label,
            distributed=distributed,
        )
    if nearest.prototype_indices.tolist() != list(range(P)):
        raise ValueError("nearest patches must cover every prototype in order; expected find_nearest_patches output")
    cls = head.prototype_class.cpu()
    own = (nearest.labels == cls.unsqueeze(1)).sum(dim=1)
    fail = own < threshold
    dsum = torch.where(torch.isfinite(nearest.distances), nearest.distances, torch.finfo(torch.float32).max).sum(1)
    rescued: list[int] = []
    for c in sorted(set(cls.tolist())):
        members = (cls == c).nonzero().flatten().tolist()
        if members and all(bool(fail[p]) for p in members):
            best = min(members, key=lambda p: (-int(own[p]), float(dsum[p]), p))
            fail[best] = False
            rescued.append(best)
    if rescued:
        warnings.warn(
            f"pruning would remove every prototype of some classes; kept prototypes {rescued} "
            f"(classes {[int(cls[p]) for p in rescued]}) as their class's best",
            stacklevel=2,
        )
    kept = (~fail).nonzero().flatten().tolist()
    pruned = fail.nonzero().flatten().tolist()
    if pruned:
        head.remove_prototypes(torch.tensor(kept, dtype=torch.long))
    return PruneReport(
        kept=kept,
        pruned=pruned,
        rescued=sorted(rescued),
        own_class_counts=own.tolist(),
        k=nearest.k,
        threshold=threshold,
        nearest=nearest,
    )
