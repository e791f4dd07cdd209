"""Part keypoints and the consistency score of prototypes (paper section 4.2, Tables 3-4; supplement section 6),
the segmentation extension of Huang et al. [37], "Evaluation and improvement of interpretability for
self-explainable part-prototype networks".

Definitions (one image at a time, so a dataset never has to fit in memory):

- Part keypoints: for each part of class c present in the image, the centroids (row, col) of the 8-connected
  components of ``(label == c) & (parts == part_id)`` (supplement 6). The authors' release also counts opencv's
  background component (label 0: every pixel outside that part mask, over the whole image) as one more keypoint;
  ``count_background=True`` reproduces that, the default does not.
- Binarised activation: prototype p of class c, activation map (h, w) nearest-upsampled to the label size (H, W)
  (``ops.resize_activations`` convention), restricted to the class pixels ``label == c``; on where the value is
  strictly above the q-th percentile (linear interpolation, as ``np.percentile``) of the map's values inside the
  class mask, q in {70, 80, 90}. (The release instead multiplies the map by the class mask and takes the
  percentile over the whole image, zeros included.)
- Hit: part k is hit in an image when one of its keypoints, rounded to the nearest pixel (half to even, as the
  release's ``np.round``), lies in the binarised region.
- Consistency: an (image, class c) pair is evaluated when c is in ``part_ids_per_class`` and at least one of its
  parts is present. For prototype p of class c and part k, the hit frequency is
  ``#images where k is hit / #images where c and k are present`` (following [37], which divides by part
  visibility). p is consistent when some part's frequency is strictly above ``threshold`` (0.8: "more than 80 %").
  Score at percentile q = 100 * (#consistent prototypes / #prototypes evaluated on at least one image); the
  reported score is the mean over the percentiles.

The ``consistency`` analysis (:class:`ConsistencyAnalysis`) runs this over a part-annotated dataset in the pass it
shares with stability (:mod:`scaleprotoseg.analysis.parts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaleprotoseg.analysis.components import as_numpy, label_components, nearest_indices
from scaleprotoseg.analysis.registry import Analysis
from scaleprotoseg.analysis.results import MetricResult

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

DEFAULT_PERCENTILES = (70.0, 80.0, 90.0)


def part_keypoints(
    part_map: np.ndarray | torch.Tensor,
    part_ids: Sequence[int] | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    count_background: bool = False,
) -> dict[int, np.ndarray]:
    """Centroids of the 8-connected components of each part's mask (supplement 6).

    Components come from ``scipy.ndimage.label`` with a 3x3 all-ones structure, the same as opencv's
    ``connectedComponentsWithStats(..., connectivity=8)`` used by the paper.

    Args:
        part_map: (H, W) int part ids.
        part_ids: parts to look at; default: every id > 0 found (inside ``mask``).
        mask: optional (H, W) bool, e.g. ``label == c``; the part's mask is ``(part_map == id) & mask``.
        count_background: also return, first, the centroid of every pixel outside the part's mask (opencv's
            background component 0, which the authors' release wrongly counts as a keypoint).
    Returns:
        ``{part_id: (K, 2) float64 array of (row, col) centroids}``; an absent part maps to a (0, 2) array.
    """
    pm = as_numpy(part_map)
    if pm.ndim != 2:
        raise ValueError(f"part_map has shape {pm.shape}; expected (H, W)")
    valid = np.ones(pm.shape, dtype=bool) if mask is None else as_numpy(mask).astype(bool)
    if valid.shape != pm.shape:
        raise ValueError(f"mask has shape {valid.shape}; expected the part map's {pm.shape}")
    if part_ids is None:
        ids = np.unique(pm[valid])
        part_ids = [int(i) for i in ids if i > 0]
    H, W = pm.shape
    out: dict[int, np.ndarray] = {}
    for pid in part_ids:
        m = (pm == pid) & valid
        row_any, col_any = m.any(axis=1), m.any(axis=0)
        if not row_any.any():
            out[int(pid)] = np.zeros((0, 2), dtype=np.float64)
            continue
        r0, r1 = np.flatnonzero(row_any)[[0, -1]]
        c0, c1 = np.flatnonzero(col_any)[[0, -1]]
        sub = m[r0 : r1 + 1, c0 : c1 + 1]  # a component never leaves its mask's bounding box
        lab, n = label_components(sub)
        rr, cc = np.nonzero(sub)
        comp = lab[rr, cc]
        count = np.bincount(comp, minlength=n + 1)[1:]
        sum_r = np.bincount(comp, weights=rr, minlength=n + 1)[1:] + r0 * count
        sum_c = np.bincount(comp, weights=cc, minlength=n + 1)[1:] + c0 * count
        cent = np.stack([sum_r / count, sum_c / count], axis=1)
        if count_background:
            n_bg = H * W - len(rr)
            if n_bg > 0:
                all_r, all_c = W * H * (H - 1) / 2.0, H * W * (W - 1) / 2.0
                bg = [(all_r - sum_r.sum()) / n_bg, (all_c - sum_c.sum()) / n_bg]
                cent = np.concatenate([np.asarray([bg]), cent], axis=0)
        out[int(pid)] = cent
    return out


@dataclass(frozen=True)
class ClassParts:
    """The parts of one class in one image: which are present and their keypoints (rounded to pixels)."""

    class_id: int
    part_ids: tuple[int, ...]
    present: np.ndarray  # (K,) bool: some pixel has label == class_id and parts == part_ids[k]
    keypoints: np.ndarray  # (N, 2) int64 (row, col)
    keypoint_part: np.ndarray  # (N,) int64 index into part_ids


def image_class_parts(
    label: np.ndarray | torch.Tensor,
    parts: np.ndarray | torch.Tensor,
    part_ids_per_class: Mapping[int, Sequence[int]],
    count_background: bool = False,
) -> list[ClassParts]:
    """:class:`ClassParts` of every class of ``part_ids_per_class`` present in ``label`` with at least one part."""
    lab, pm = as_numpy(label), as_numpy(parts)
    if lab.shape != pm.shape or lab.ndim != 2:
        raise ValueError(f"label {lab.shape} and parts {pm.shape} must be (H, W) maps of the same size")
    H, W = lab.shape
    present_classes = set(np.unique(lab).tolist())
    result = []
    for c, ids in part_ids_per_class.items():
        if int(c) not in present_classes or len(ids) == 0:
            continue
        cls = lab == int(c)
        kps = part_keypoints(pm, ids, mask=cls, count_background=count_background)
        ids = tuple(int(i) for i in ids)
        present = np.isin(np.asarray(ids, dtype=np.int64), np.unique(pm[cls]))
        if not present.any():
            continue
        pts, owner = [], []
        for k, i in enumerate(ids):
            if present[k] and len(kps[i]):
                pts.append(kps[i])
                owner.append(np.full(len(kps[i]), k, dtype=np.int64))
        keypoints = np.rint(np.concatenate(pts)).astype(np.int64)
        keypoints[:, 0] = keypoints[:, 0].clip(0, H - 1)
        keypoints[:, 1] = keypoints[:, 1].clip(0, W - 1)
        result.append(ClassParts(int(c), ids, present, keypoints, np.concatenate(owner)))
    return result


def replicated_quantiles(values: np.ndarray, counts: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """``np.quantile`` (linear) of each row of ``values`` (M, n) with entry j repeated ``counts[j]`` times -> (Q, M).

    Exactly the quantile of a nearest-upsampled map's values inside a mask (``counts`` = mask pixels per cell),
    computed on the (h*w) cells instead of the (H*W) pixels.
    """
    values = np.asarray(values)
    counts = np.asarray(counts).astype(np.int64)
    keep = counts > 0
    v, c = values[:, keep], counts[keep]
    M, N = v.shape[0], int(c.sum())
    if N == 0:
        raise ValueError("replicated_quantiles: all counts are zero (empty mask)")
    order = np.argsort(v, axis=1, kind="stable")
    sv = np.take_along_axis(v, order, axis=1).astype(np.float64).ravel()
    cum = np.cumsum(c[order], axis=1)  # (M, n'), rows end at N
    flat = (cum + (np.arange(M, dtype=np.int64) * N)[:, None]).ravel()  # increasing over the whole array
    pos = np.asarray(quantiles, dtype=np.float64) * (N - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, N - 1)
    t = (pos - lo)[:, None]
    offs = (np.arange(M, dtype=np.int64) * N)[None, :]
    a = sv[np.searchsorted(flat, lo[:, None] + offs, side="right")]
    b = sv[np.searchsorted(flat, hi[:, None] + offs, side="right")]
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # numpy's _lerp


def part_hits(
    activations: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    class_parts: ClassParts,
    quantiles: Sequence[float],
) -> np.ndarray:
    """Part-hit vectors of prototypes of one class in one image (section 4.2; see the module docstring).

    Args:
        activations: (M, h, w) activation maps of M prototypes of class ``class_parts.class_id``.
        label: (H, W) labels; maps are nearest-upsampled to this size.
        class_parts: from :func:`image_class_parts`.
        quantiles: binarisation quantiles in [0, 1] (percentile / 100).
    Returns:
        (Q, M, K) bool: part k hit by prototype m at quantile q (always False for absent parts).
    """
    act, lab = as_numpy(activations), as_numpy(label)
    M, h, w = act.shape
    H, W = lab.shape
    ri, ci = nearest_indices(h, H), nearest_indices(w, W)
    cls = lab == class_parts.class_id
    rr, cc = np.nonzero(cls)
    counts = np.bincount(ri[rr] * w + ci[cc], minlength=h * w)
    thr = replicated_quantiles(act.reshape(M, h * w), counts, quantiles)  # (Q, M)
    kr, kc = class_parts.keypoints[:, 0], class_parts.keypoints[:, 1]
    values = act[:, ri[kr], ci[kc]].astype(np.float64)  # (M, N)
    hit_kp = (values[None] > thr[:, :, None]) & cls[kr, kc][None, None]  # (Q, M, N)
    K = len(class_parts.part_ids)
    owner = np.zeros((len(kr), K), dtype=np.int64)
    owner[np.arange(len(kr)), class_parts.keypoint_part] = 1
    return (hit_kp.astype(np.int64) @ owner) > 0


class _PartMetricBase:
    """Shared bookkeeping of the consistency and stability accumulators."""

    def __init__(
        self,
        num_prototypes: int,
        prototype_class: Sequence[int] | np.ndarray | torch.Tensor,
        part_ids_per_class: Mapping[int, Sequence[int]],
        percentiles: Sequence[float],
        count_background: bool,
        prototypes_used: np.ndarray | torch.Tensor | None,
    ) -> None:
        self.prototype_class = as_numpy(prototype_class).astype(np.int64).reshape(-1)
        if len(self.prototype_class) != num_prototypes:
            raise ValueError(f"prototype_class has {len(self.prototype_class)} entries; expected {num_prototypes}")
        self.num_prototypes = int(num_prototypes)
        self.part_ids_per_class = {int(c): tuple(int(i) for i in ids) for c, ids in part_ids_per_class.items()}
        self.percentiles = tuple(float(q) for q in percentiles)
        if any(not 0.0 <= q <= 100.0 for q in self.percentiles) or max(self.percentiles, default=2.0) <= 1.0:
            raise ValueError(f"percentiles {self.percentiles}: expected values in [0, 100] (e.g. 70, not 0.7)")
        self.quantiles = tuple(q / 100.0 for q in self.percentiles)
        self.count_background = bool(count_background)
        self.prototypes_used = self._mask(prototypes_used)
        self.max_parts = max((len(v) for v in self.part_ids_per_class.values()), default=0)

    def _mask(self, used: np.ndarray | torch.Tensor | None) -> np.ndarray:
        if used is None:
            return np.ones(self.num_prototypes, dtype=bool)
        m = as_numpy(used).astype(bool).reshape(-1)
        if m.shape != (self.num_prototypes,):
            raise ValueError(f"prototypes_used has shape {m.shape}; expected ({self.num_prototypes},)")
        return m

    def _check_activations(self, act: np.ndarray, name: str) -> None:
        if act.ndim != 3 or act.shape[0] != self.num_prototypes:
            raise ValueError(f"{name} have shape {act.shape}; expected ({self.num_prototypes}, h, w)")

    def _selection(self, label: Any, parts: Any, prototypes_used: Any) -> list[tuple[ClassParts, np.ndarray]]:
        used = self.prototypes_used & self._mask(prototypes_used)
        out = []
        for cp in image_class_parts(label, parts, self.part_ids_per_class, self.count_background):
            protos = np.flatnonzero((self.prototype_class == cp.class_id) & used)
            if len(protos):
                out.append((cp, protos))
        return out


class ConsistencyAccumulator(_PartMetricBase):
    """Consistency score of prototypes over a part-annotated dataset (section 4.2, supplement 6, after [37]).

    Feed one image at a time with :meth:`update`; :meth:`compute` gives the score. See the module docstring for
    the exact definition. For grouped (ScaleProtoSeg) runs pass ``prototypes_used`` (the prototypes some group
    uses after thresholding, e.g. ``GroupingLayer.used_prototypes()``) so that only those are scored.

    Args:
        num_prototypes: P.
        prototype_class: (P,) class of each prototype.
        part_ids_per_class: ``{class: part ids}`` for the part-annotated classes; other classes are skipped.
        percentiles: binarisation percentiles (paper: 70, 80, 90).
        threshold: a prototype is consistent when some part's hit frequency is strictly above this.
        count_background: reproduce the release's extra background keypoint (see :func:`part_keypoints`).
        prototypes_used: optional (P,) bool mask of prototypes to score.
    """

    def __init__(
        self,
        num_prototypes: int,
        prototype_class: Sequence[int] | np.ndarray | torch.Tensor,
        part_ids_per_class: Mapping[int, Sequence[int]],
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        threshold: float = 0.8,
        count_background: bool = False,
        prototypes_used: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            num_prototypes, prototype_class, part_ids_per_class, percentiles, count_background, prototypes_used
        )
        self.threshold = float(threshold)
        Q, P, K = len(self.percentiles), self.num_prototypes, self.max_parts
        self.hits = np.zeros((Q, P, K), dtype=np.int64)
        self.part_presence = np.zeros((P, K), dtype=np.int64)
        self.num_images = np.zeros(P, dtype=np.int64)

    def update(
        self,
        activations: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        parts: np.ndarray | torch.Tensor,
        prototypes_used: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add one image: activations (P, h, w), label (H, W), parts (H, W); optional (P,) mask for this call."""
        act = as_numpy(activations)
        self._check_activations(act, "activations")
        for cp, protos in self._selection(label, parts, prototypes_used):
            K = len(cp.part_ids)
            self.hits[:, protos, :K] += part_hits(act[protos], label, cp, self.quantiles)
            self.part_presence[protos, :K] += cp.present
            self.num_images[protos] += 1

    def compute(self) -> dict[str, Any]:
        """Scores in %.

        Returns a dict: ``score`` (mean over percentiles), ``scores`` ``{percentile: score}``, ``percentiles``,
        ``consistent`` (Q, P) bool, ``hit_frequency`` (Q, P, K) (NaN where the part was never present; part k of
        prototype p is ``part_ids[prototype_class[p]][k]``), ``part_presence`` (P, K), ``num_images`` (P,),
        ``evaluated`` (P,) bool (prototypes seen on at least one image: the denominator), ``num_evaluated``,
        ``part_ids``.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            freq = self.hits / self.part_presence[None].astype(np.float64)
        freq = np.where(self.part_presence[None] > 0, freq, np.nan)
        best = np.where(np.isnan(freq), -np.inf, freq).max(axis=2, initial=-np.inf)
        consistent = best > self.threshold
        evaluated = self.num_images > 0
        if evaluated.any():
            per_q = 100.0 * consistent[:, evaluated].mean(axis=1)
        else:
            per_q = np.full(len(self.percentiles), np.nan)
        return {
            "score": float(np.mean(per_q)),
            "scores": {q: float(s) for q, s in zip(self.percentiles, per_q)},
            "percentiles": self.percentiles,
            "consistent": consistent,
            "hit_frequency": freq,
            "part_presence": self.part_presence.copy(),
            "num_images": self.num_images.copy(),
            "evaluated": evaluated,
            "num_evaluated": int(evaluated.sum()),
            "part_ids": dict(self.part_ids_per_class),
        }


class ConsistencyAnalysis(Analysis):
    """``consistency``: Tables 3-4 on the part-annotated images (one row per percentile and a mean row)."""

    name = "consistency"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        from scaleprotoseg.analysis.parts import shared_part_pass

        found = shared_part_pass(ctx, self.name)
        res = found.consistency
        assert res is not None  # asked for
        rows = [
            [p, res["scores"][p], int(res["consistent"][i][res["evaluated"]].sum()), res["num_evaluated"]]
            for i, p in enumerate(res["percentiles"])
        ]
        rows.append(["mean", res["score"], None, res["num_evaluated"]])
        summary = {
            **res,
            "part_names": found.part_names,
            "threshold": found.threshold,
            "prototype_class": found.prototype_class,
            "prototype_scale": found.prototype_scale,
        }
        return MetricResult(
            self.name,
            "Consistency of prototypes (Tables 3-4)",
            summary,
            ["percentile", "consistency_%", "consistent_prototypes", "evaluated_prototypes"],
            rows,
            found.meta,
            plot_data={"title": f"Consistency: {found.title}"},
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_consistency_stability

        if not np.isfinite(result.summary["score"]):
            return {}
        return {"": plot_consistency_stability(result.summary, None, title=result.plot_data["title"])}
