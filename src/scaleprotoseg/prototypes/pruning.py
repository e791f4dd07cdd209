"""ProtoSeg's pruning (ProtoPNet ``prune.py``): a prototype is removed when fewer than ``threshold`` (3) of its ``k``
(6) nearest training patches (:mod:`scaleprotoseg.prototypes.nearest`) belong to its class. Unlike ProtoPNet, we
never remove every prototype of a class: when that would happen, the class's best prototype is kept with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scaleprotoseg.prototypes.nearest import NearestPatches, find_nearest_patches
from scaleprotoseg.prototypes.streaming import prototype_head, unwrap


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


@torch.no_grad()
def prune_prototypes(
    model: nn.Module,
    dataset: Any,
    *,
    k: int = 6,
    threshold: int = 3,
    nearest: NearestPatches | None = None,
    **search: Any,
) -> PruneReport:
    """ProtoPNet pruning for the ProtoSeg baseline (``prune.py``; k = 6, threshold = 3): prune a prototype when
    fewer than ``threshold`` of its ``k`` nearest training patches (one per image) belong to its class.

    Safeguard (not in ProtoPNet): a class never loses all its prototypes; if every prototype of a class fails,
    the best one (most own-class patches, then smallest summed patch distance, then lowest index) is kept and a
    warning names it. Calls ``head.remove_prototypes(keep)``; pass ``nearest`` to reuse an earlier search, else
    ``search`` holds the keyword options of :func:`~scaleprotoseg.prototypes.nearest.nearest_patches` (``device``,
    ``ignore_index``, ``num_workers``, ``progress``, ``patch_label``, ``distributed``).
    """
    head = prototype_head(unwrap(model))
    P = head.prototype_class.numel()
    if nearest is None:
        nearest = find_nearest_patches(model, dataset, k=k, **search)
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
