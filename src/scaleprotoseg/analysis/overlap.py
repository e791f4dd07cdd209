"""Overlap between the activations of the groups of one class (supplement 10, Table 9).

For each image and each class c present in its label (ignore pixels excluded), every group of class c is
binarised at the 95th percentile of its own activation map (over the whole map, strictly above, as the authors'
release); for every pair of groups of c, the intersection and union of the two binarised maps are summed over
the dataset. Pair IoU = sum I / sum U; class IoU = mean over the class's pairs; ``miou`` (Table 9's "mIoU
Groups", in %) = mean over the classes seen. The release's own reduction pools the sums over a class's pairs
(``class_pooled_iou``) and over everything (``pooled_iou``); both are returned too.

Resolution: the release upsamples the group maps bicubically to the image size before binarising; ``mode``
picks that ("bicubic"), the package's activation convention ("nearest"), or no resizing (None: the maps are
binarised at the resolution they come in; the label only says which classes are present).

The ``group-overlap`` analysis (:class:`GroupOverlapAnalysis`) runs it over a grouped run's validation images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from scaleprotoseg.analysis.components import as_numpy
from scaleprotoseg.analysis.registry import Analysis, NotApplicable
from scaleprotoseg.analysis.results import MetricResult
from scaleprotoseg.ops import resize_activations

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

OVERLAP_QUANTILE = 0.95


class GroupOverlapAccumulator:
    """Mean IoU between the binarised activation maps of groups of the same class (supplement 10, Table 9).

    Args:
        group_class: (G,) class of each group (``head.group_class``).
        quantile: binarisation quantile of each map (0.95).
        ignore_index: label value that marks void pixels.
        mode: "bicubic" (release), "nearest" or None; see the module docstring.
    """

    def __init__(
        self,
        group_class: Sequence[int] | np.ndarray | torch.Tensor,
        quantile: float = OVERLAP_QUANTILE,
        ignore_index: int = 255,
        mode: str | None = "bicubic",
    ) -> None:
        if mode not in ("bicubic", "nearest", None):
            raise ValueError(f"mode {mode!r}: expected 'bicubic', 'nearest' or None")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile {quantile}: expected a value in [0, 1] (0.95, not 95)")
        self.group_class = as_numpy(group_class).astype(np.int64).reshape(-1)
        self.quantile = float(quantile)
        self.ignore_index = int(ignore_index)
        self.mode = mode
        self.classes = np.unique(self.group_class)
        # pairs (i < j) of groups of the same class, in group order
        self.pairs: dict[int, np.ndarray] = {}
        for c in self.classes.tolist():
            g = np.flatnonzero(self.group_class == c)
            i, j = np.triu_indices(len(g), k=1)
            self.pairs[c] = np.stack([g[i], g[j]], axis=1)
        self.intersection = {c: np.zeros(len(p), dtype=np.float64) for c, p in self.pairs.items()}
        self.union = {c: np.zeros(len(p), dtype=np.float64) for c, p in self.pairs.items()}
        self.num_images = {c: 0 for c in self.pairs}

    def _resize(self, act: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.mode is None or tuple(act.shape[-2:]) == size:
            return act
        if self.mode == "nearest":
            return resize_activations(act[None], size)[0]
        return F.interpolate(act[None].float(), size=size, mode="bicubic", align_corners=False)[0]

    def update(self, group_activations: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one image: ``group_activations`` (G, h, w), ``label`` (H, W)."""
        act = torch.as_tensor(as_numpy(group_activations))
        G = len(self.group_class)
        if act.ndim != 3 or act.shape[0] != G:
            raise ValueError(f"group activations have shape {tuple(act.shape)}; expected ({G}, h, w)")
        lab = as_numpy(label)
        present = set(np.unique(lab).tolist()) - {self.ignore_index}
        todo = [c for c in self.pairs if c in present and len(self.pairs[c])]
        if not todo:
            return
        size = tuple(lab.shape) if self.mode is not None else tuple(act.shape[-2:])
        for c in todo:
            groups = np.flatnonzero(self.group_class == c)
            maps = self._resize(act[groups], size).numpy().reshape(len(groups), -1)
            thr = np.quantile(maps, self.quantile, axis=1)
            on = (maps > thr[:, None]).astype(np.float64)
            inter = on @ on.T  # (n, n)
            area = on.sum(axis=1)
            pos = {g: k for k, g in enumerate(groups.tolist())}
            a = np.array([pos[g] for g in self.pairs[c][:, 0]])
            b = np.array([pos[g] for g in self.pairs[c][:, 1]])
            self.intersection[c] += inter[a, b]
            self.union[c] += area[a] + area[b] - inter[a, b]
            self.num_images[c] += 1

    def compute(self) -> dict[str, Any]:
        """IoUs in %: ``miou``, ``class_iou`` ``{class: mean pair IoU}``, ``pair_iou`` ``{class: (n_pairs,)}``,
        ``pairs`` ``{class: (n_pairs, 2) group ids}``, ``class_pooled_iou``, ``pooled_iou``, ``num_images``.
        Classes never seen (or with fewer than 2 groups) are left out."""
        pair_iou, class_iou, class_pooled = {}, {}, {}
        tot_i = tot_u = 0.0
        for c in self.pairs:
            if self.num_images[c] == 0:
                continue
            i, u = self.intersection[c], self.union[c]
            with np.errstate(invalid="ignore", divide="ignore"):
                pair_iou[c] = 100.0 * np.where(u > 0, i / u, np.nan)
            class_iou[c] = float(np.nanmean(pair_iou[c])) if np.isfinite(pair_iou[c]).any() else float("nan")
            class_pooled[c] = 100.0 * float(i.sum() / u.sum()) if u.sum() > 0 else float("nan")
            tot_i += float(i.sum())
            tot_u += float(u.sum())
        finite = [v for v in class_iou.values() if np.isfinite(v)]
        return {
            "miou": float(np.mean(finite)) if finite else float("nan"),
            "class_iou": class_iou,
            "pair_iou": pair_iou,
            "pairs": {c: self.pairs[c].copy() for c in pair_iou},
            "class_pooled_iou": class_pooled,
            "pooled_iou": 100.0 * tot_i / tot_u if tot_u > 0 else float("nan"),
            "num_images": {c: n for c, n in self.num_images.items() if n},
        }


class GroupOverlapAnalysis(Analysis):
    """``group-overlap``: mean IoU between the 95th-percentile binarised activations of a class's groups on the
    validation images (supplement 10, Table 9); grouped runs only."""

    name = "group-overlap"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        if not ctx.grouped:
            raise NotApplicable("needs groups (ScaleProtoSeg after the group stages)")
        names = ctx.class_names
        acc = GroupOverlapAccumulator(ctx.head.group_class.cpu().numpy(), ignore_index=ctx.info.ignore_index)
        split = ctx.split()
        count = 0
        for item in ctx.items(ctx.dataset(split), self.name):
            acc.update(ctx.group_activations(item["image"]), item["label"].numpy())
            count += 1
        res = acc.compute()
        rows: list[list[Any]] = [
            [c, names[c], res["class_iou"][c], res["class_pooled_iou"][c], res["num_images"][c]]
            for c in sorted(res["class_iou"])
        ]
        rows.append([None, "mean", res["miou"], res["pooled_iou"], count])
        summary = {
            **res,
            "quantile": acc.quantile,
            "mode": acc.mode,
            "class_names": {c: names[c] for c in res["class_iou"]},
        }
        return MetricResult(
            self.name,
            "Overlap of group activations (Table 9)",
            summary,
            ["class_index", "class", "iou_%", "pooled_iou_%", "images"],
            rows,
            ctx.meta(split=split, num_images=count),
            plot_data={"class_names": names},
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_group_overlap

        if not result.summary["class_iou"]:
            return {}
        return {"": plot_group_overlap(result.summary, result.plot_data["class_names"])}
