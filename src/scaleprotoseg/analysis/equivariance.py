"""Quasi-equivariance of prototypes across scales (supplement 11, Figure 7; Figures 8-10 show pairs).

Scale s has atrous rate ``rate_s``; ``r_{1->s} = rate_s / rate_1`` (rates 6, 12, 18, 24 -> 1, 2, 3, 4). The
caller runs the model on the input downsampled by each ratio and passes the (P, h, w) activation maps per ratio.
For every pair of scales s < s' and every pair of class-c prototypes (p_{s,i}, p_{s',j}):

- ``A_{s,i}`` is taken from the input downsampled by ``r_{1->s'}`` and ``A_{s',j}`` from the input downsampled by
  ``r_{1->s}``, so both see the same image content through their receptive fields; ``A_{s,i}`` is
  nearest-upsampled to ``A_{s',j}``'s size (``ops.resize_activations`` convention);
- the full-size label is resized to that size (``ops.resize_labels``, centre-aligned); only positions with
  ``label == c`` are used: each map is binarised at the quantile p_th (0.6, 0.7) of its values there (on =
  strictly above);
- intersection and union of the two binarised sets are summed over the images where c is present (at that
  size); pair IoU = sum I / sum U (``reduction="mean"`` in :meth:`compute` averages per-image IoUs instead).

Pairs with IoU >= 0.5 are quasi-equivariant; pairs sharing a prototype are merged into groups (connected
components of the pair graph; prototypes of one class only, so groups never mix classes). Figure 7 ratios per
p_th: (a) #groups / ``num_groups`` (the number of groups of the sparse grouping, e.g. 3 * C), (b) #prototypes
in groups / #prototypes considered, (c) #classes with a group / #classes with candidate pairs (prototypes at two
scales or more).

The ``equivariance`` analysis (:class:`EquivarianceAnalysis`) runs it over a multi-scale run's training images and
draws Figure 7 and the best pairs (Figures 8-10).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from scaleprotoseg.analysis.components import as_numpy, nearest_indices
from scaleprotoseg.analysis.registry import Analysis, NotApplicable
from scaleprotoseg.analysis.results import MetricResult
from scaleprotoseg.ops import resize_image, resize_labels

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

EQUIVARIANCE_QUANTILES = (0.6, 0.7)
EQUIVARIANT_PAIRS_SHOWN = 4  # pairs drawn in equivariance-pairs.png (Figures 8-10), the highest IoU first


def atrous_scale_ratios(rates: Sequence[float]) -> tuple[float, ...]:
    """``r_{1->s} = rate_s / rate_1`` (supplement 11): (6, 12, 18, 24) -> (1, 2, 3, 4)."""
    if len(rates) == 0 or rates[0] <= 0:
        raise ValueError(f"atrous rates {tuple(rates)}: expected a non-empty sequence of positive rates")
    return tuple(float(r) / float(rates[0]) for r in rates)


class EquivarianceAccumulator:
    """Quasi-equivariant prototype pairs and groups across scales (supplement 11; see the module docstring).

    Args:
        prototype_class: (P,) class of each prototype.
        prototype_scale: (P,) scale index of each prototype (0 = smallest atrous rate).
        scale_ratios: ``r_{1->s}`` for each scale index s (e.g. ``atrous_scale_ratios((6, 12, 18, 24))``).
        quantiles: binarisation quantiles p_th (0.6, 0.7).
        iou_threshold: IoU_th (0.5).
        num_groups: groups of the sparse grouping, the denominator of ratio (a); None gives NaN.
        prototype_mask: optional (P,) bool, prototypes to consider (e.g. those used by the groups).
        ignore_index: void label value (never a class).
    """

    def __init__(
        self,
        prototype_class: Sequence[int] | np.ndarray | torch.Tensor,
        prototype_scale: Sequence[int] | np.ndarray | torch.Tensor,
        scale_ratios: Sequence[float],
        quantiles: Sequence[float] = (0.6, 0.7),
        iou_threshold: float = 0.5,
        num_groups: int | None = None,
        prototype_mask: np.ndarray | torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.prototype_class = as_numpy(prototype_class).astype(np.int64).reshape(-1)
        self.prototype_scale = as_numpy(prototype_scale).astype(np.int64).reshape(-1)
        P = len(self.prototype_class)
        if self.prototype_scale.shape != (P,):
            raise ValueError(f"prototype_scale has shape {self.prototype_scale.shape}; expected ({P},)")
        self.scale_ratios = tuple(float(r) for r in scale_ratios)
        if self.prototype_scale.max(initial=-1) >= len(self.scale_ratios) or self.prototype_scale.min(initial=0) < 0:
            raise ValueError(f"prototype scales go up to {self.prototype_scale.max()}; got ratios {self.scale_ratios}")
        self.quantiles = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles {self.quantiles}: expected values in [0, 1] (0.6, not 60)")
        self.iou_threshold = float(iou_threshold)
        self.num_groups = num_groups
        self.ignore_index = int(ignore_index)
        self.mask = np.ones(P, dtype=bool) if prototype_mask is None else as_numpy(prototype_mask).astype(bool)
        if self.mask.shape != (P,):
            raise ValueError(f"prototype_mask has shape {self.mask.shape}; expected ({P},)")
        # candidate blocks: (class, s, s') -> prototypes of (c, s) and of (c, s')
        self.blocks: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        scales = sorted(set(self.prototype_scale[self.mask].tolist()))
        for c in sorted(set(self.prototype_class[self.mask].tolist())):
            for a, s in enumerate(scales):
                I = np.flatnonzero(self.mask & (self.prototype_class == c) & (self.prototype_scale == s))
                for s2 in scales[a + 1 :]:
                    J = np.flatnonzero(self.mask & (self.prototype_class == c) & (self.prototype_scale == s2))
                    if len(I) and len(J):
                        self.blocks[(c, s, s2)] = (I, J)
        Q = len(self.quantiles)
        self.inter = {k: np.zeros((Q, len(I), len(J))) for k, (I, J) in self.blocks.items()}
        self.union = {k: np.zeros((Q, len(I), len(J))) for k, (I, J) in self.blocks.items()}
        self.iou_sum = {k: np.zeros((Q, len(I), len(J))) for k, (I, J) in self.blocks.items()}
        self.iou_count = {k: np.zeros((Q, len(I), len(J))) for k, (I, J) in self.blocks.items()}

    def _maps_for_ratio(self, activations_by_input: Mapping[float, Any], ratio: float) -> np.ndarray:
        for key, value in activations_by_input.items():
            if np.isclose(float(key), ratio):
                act = as_numpy(value)
                if act.ndim != 3 or act.shape[0] != len(self.prototype_class):
                    raise ValueError(
                        f"activations for ratio {key} have shape {act.shape}; expected ({len(self.mask)}, h, w)"
                    )
                return act
        raise ValueError(f"no activations for downsampling ratio {ratio}; got ratios {list(activations_by_input)}")

    def update(self, activations_by_input: Mapping[float, Any], label: np.ndarray | torch.Tensor) -> None:
        """Add one image: ``{downsampling ratio: (P, h, w) activations of the input downsampled by it}`` and the
        full-size (H, W) label."""
        lab = as_numpy(label)
        if lab.ndim != 2:
            raise ValueError(f"label has shape {lab.shape}; expected (H, W)")
        present = set(np.unique(lab).tolist()) - {self.ignore_index}
        blocks = [k for k in self.blocks if k[0] in present]
        maps: dict[int, np.ndarray] = {}
        labels: dict[int, np.ndarray] = {}  # label on the grid of the maps of scale s (centre-aligned)
        for c, s, s2 in blocks:
            I, J = self.blocks[(c, s, s2)]
            for scale in (s, s2):
                if scale not in maps:
                    maps[scale] = self._maps_for_ratio(activations_by_input, self.scale_ratios[scale])
            small = maps[s2]  # input downsampled by r_{1->s'}: read the scale-s prototypes there
            big = maps[s]  # input downsampled by r_{1->s}: read the scale-s' prototypes there
            h, w = big.shape[1:]
            if s not in labels:
                labels[s] = resize_labels(torch.as_tensor(lab), (h, w)).numpy()
            rr, cc = np.nonzero(labels[s] == c)
            if len(rr) == 0:
                continue
            ri, ci = nearest_indices(small.shape[1], h), nearest_indices(small.shape[2], w)
            a_vals = small[I][:, ri[rr], ci[cc]].astype(np.float64)  # (|I|, n)
            b_vals = big[J][:, rr, cc].astype(np.float64)  # (|J|, n)
            qs = np.asarray(self.quantiles)
            a_on = a_vals[None] > np.quantile(a_vals, qs, axis=1)[..., None]  # (Q, |I|, n)
            b_on = b_vals[None] > np.quantile(b_vals, qs, axis=1)[..., None]  # (Q, |J|, n)
            inter = np.matmul(a_on.astype(np.float64), b_on.astype(np.float64).transpose(0, 2, 1))
            union = a_on.sum(axis=2)[:, :, None] + b_on.sum(axis=2)[:, None, :] - inter
            key = (c, s, s2)
            self.inter[key] += inter
            self.union[key] += union
            ok = union > 0
            self.iou_sum[key] += np.divide(inter, union, out=np.zeros_like(inter), where=ok)
            self.iou_count[key] += ok

    def pair_ious(self, reduction: str = "pooled") -> list[tuple[int, int, int, int, int, np.ndarray]]:
        """All candidate pairs: ``(class, s, s', proto_s, proto_s', iou (Q,))``; NaN where never observed."""
        if reduction not in ("pooled", "mean"):
            raise ValueError(f"reduction {reduction!r}: expected 'pooled' or 'mean'")
        out = []
        for key, (I, J) in self.blocks.items():
            if reduction == "pooled":
                num, den = self.inter[key], self.union[key]
            else:
                num, den = self.iou_sum[key], self.iou_count[key]
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.where(den > 0, num / den, np.nan)
            for a, p in enumerate(I.tolist()):
                for b, q in enumerate(J.tolist()):
                    out.append((key[0], key[1], key[2], p, q, iou[:, a, b]))
        return out

    def compute(self, reduction: str = "pooled") -> dict[float, dict[str, Any]]:
        """Per p_th: ``pairs`` [(proto_s, proto_s', iou)] quasi-equivariant, ``groups`` [sorted prototype ids],
        ``group_class``, ``ratio_groups``, ``ratio_prototypes``, ``ratio_classes`` (Figure 7 a-c, fractions),
        plus ``num_candidate_pairs``, ``num_prototypes``, ``num_classes``."""
        pairs = self.pair_ious(reduction)
        P = len(self.prototype_class)
        candidate_classes = {k[0] for k in self.blocks}
        n_protos = int(self.mask.sum())
        result: dict[float, dict[str, Any]] = {}
        for qi, q in enumerate(self.quantiles):
            qe = [(p, p2, float(iou[qi])) for (_, _, _, p, p2, iou) in pairs if iou[qi] >= self.iou_threshold]
            groups: list[list[int]] = []
            if qe:
                rows = np.array([e[0] for e in qe])
                cols = np.array([e[1] for e in qe])
                graph = coo_matrix((np.ones(len(qe)), (rows, cols)), shape=(P, P))
                _, comp = connected_components(graph, directed=False)
                nodes = np.unique(np.concatenate([rows, cols]))
                for cid in np.unique(comp[nodes]):
                    groups.append(sorted(int(n) for n in nodes[comp[nodes] == cid]))
                groups.sort()
            group_class = [int(self.prototype_class[g[0]]) for g in groups]
            in_groups = sum(len(g) for g in groups)
            result[q] = {
                "pairs": qe,
                "groups": groups,
                "group_class": group_class,
                "ratio_groups": len(groups) / self.num_groups if self.num_groups else float("nan"),
                "ratio_prototypes": in_groups / n_protos if n_protos else float("nan"),
                "ratio_classes": (
                    len(set(group_class)) / len(candidate_classes) if candidate_classes else float("nan")
                ),
                "num_candidate_pairs": len(pairs),
                "num_prototypes": n_protos,
                "num_classes": len(candidate_classes),
            }
        return result


def downsampled(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The input (B, 3, H, W) resized to (round(H / ratio), round(W / ratio)) (itself at ratio 1)."""
    H, W = x.shape[-2:]
    size = (max(1, round(H / ratio)), max(1, round(W / ratio)))
    return x if size == (H, W) else resize_image(x, size)


class EquivarianceAnalysis(Analysis):
    """``equivariance``: quasi-equivariant prototype pairs/groups across scales on the downsampled training images
    (supplement 11, Figure 7), and the activation maps of the best pairs (Figures 8-10); multi-scale runs only."""

    name = "equivariance"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        ctx.need_prototypes()
        if ctx.num_scales < 2:
            raise NotApplicable("needs prototypes at several scales (ScaleProtoSeg)")
        head = ctx.head
        ratios = atrous_scale_ratios(head.aspp.rates)
        acc = EquivarianceAccumulator(
            head.prototype_class.cpu().numpy(),
            head.prototype_scale.cpu().numpy(),
            ratios,
            EQUIVARIANCE_QUANTILES,
            num_groups=head.grouping.num_groups if ctx.grouped else None,
            prototype_mask=ctx.used_prototype_mask(),
            ignore_index=ctx.info.ignore_index,
        )
        split = ctx.split(ctx.cfg.data.train_split)
        count = 0
        unique = sorted({float(r) for r in ratios})
        dataset = ctx.dataset(split)
        largest: dict[int, tuple[int, int]] = {}  # class -> (pixels, image index): the image a figure row shows
        for item in ctx.items(dataset, self.name):
            x = item["image"].unsqueeze(0).to(ctx.device)
            label = item["label"].numpy()
            acc.update({r: ctx.activations(downsampled(x, r)) for r in unique}, label)
            for c, n in zip(*np.unique(label, return_counts=True)):
                if int(c) != ctx.info.ignore_index and n > largest.get(int(c), (0, -1))[0]:
                    largest[int(c)] = (int(n), count)
            count += 1
        res = acc.compute()
        rows = [
            [
                q,
                len(r["pairs"]),
                len(r["groups"]),
                r["ratio_groups"],
                r["ratio_prototypes"],
                r["ratio_classes"],
                r["num_candidate_pairs"],
            ]
            for q, r in res.items()
        ]
        summary = {
            "scale_ratios": ratios,
            "quantiles": EQUIVARIANCE_QUANTILES,
            "iou_threshold": acc.iou_threshold,
            "num_groups": acc.num_groups,
            "results": res,
            "candidate_pairs": [
                {"class": c, "scales": [s1, s2], "prototypes": [p1, p2], "iou": dict(zip(acc.quantiles, iou))}
                for c, s1, s2, p1, p2, iou in acc.pair_ious()
            ],
        }
        return MetricResult(
            self.name,
            "Quasi-equivariant prototypes across scales (Figure 7)",
            summary,
            ["p_th", "pairs", "groups", "ratio_groups", "ratio_prototypes", "ratio_classes", "candidate_pairs"],
            rows,
            ctx.meta(split=split, num_images=count),
            plot_data={"run": ctx.name, "pairs": pair_panels(ctx, res, dataset, largest, ratios)},
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_equivariance, plot_equivariant_pairs

        run = result.plot_data["run"]
        return {
            "": plot_equivariance(result.summary["results"], title=f"Quasi-equivariance across scales: {run}"),
            "pairs": plot_equivariant_pairs(
                result.plot_data["pairs"], title=f"Quasi-equivariant prototype pairs (Figures 8-10): {run}"
            ),
        }


def pair_panels(
    ctx: AnalysisContext,
    res: dict[float, dict[str, Any]],
    dataset: Any,
    largest: dict[int, tuple[int, int]],
    ratios: Sequence[float],
) -> list[dict[str, Any]]:
    """Figures 8-10, the panels of :func:`~scaleprotoseg.analysis.plots.plot_equivariant_pairs`: the best
    quasi-equivariant pairs at the lowest p_th, each on the image with most pixels of its class: A_{s,i} on the
    input downsampled by r_{1->s'}, A_{s',j} on the one downsampled by r_{1->s}."""
    from PIL import Image

    q = min(res)
    pairs = sorted(res[q]["pairs"], key=lambda e: -e[2])[:EQUIVARIANT_PAIRS_SHOWN]
    cls, scale = ctx.head.prototype_class.cpu().numpy(), ctx.head.prototype_scale.cpu().numpy()
    panels = []
    for p, p2, iou in pairs:
        c = int(cls[p])
        index = largest[c][1]
        x = dataset[index]["image"].unsqueeze(0).to(ctx.device)
        raw = dataset.load_raw(index)[0]
        sides = {}
        for side, proto, other in (("left", p, p2), ("right", p2, p)):
            r = float(ratios[int(scale[other])])  # read each prototype on the input sized for the other's scale
            xr = downsampled(x, r)
            image = np.asarray(Image.fromarray(raw).resize((xr.shape[-1], xr.shape[-2]), Image.BILINEAR))
            sides[side] = {
                "image": image,
                "activation": ctx.activations(xr)[proto],
                "label": f"prototype {proto} (scale {int(scale[proto]) + 1}), input / {r:g}",
            }
        panels.append({**sides, "caption": f"{ctx.class_names[c]}: IoU {iou:.2f} at p_th {q:g}"})
    return panels
