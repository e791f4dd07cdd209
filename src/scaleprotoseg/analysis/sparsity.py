"""Sparsity and size of the interpretable heads (paper section 4.2 Tables 2-4; supplement 9 Table 7 and 12
Table 10): pure functions of weight matrices, and the ``sparsity`` analysis (:class:`SparsityAnalysis`) that reads
them off a run's head.

Shapes: the last layer ``W`` is (C, K): ``h_proto`` over K = P prototypes (ProtoSeg, or ScaleProtoSeg before
grouping), ``h_group`` over K = G groups (ScaleProtoSeg). The group matrix is either dense (G, P), as
``GroupingLayer.dense_weight(P)``, or per class (C, N, M) with a (C, M) member mask, as ``GroupingLayer.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaleprotoseg.analysis.components import as_numpy
from scaleprotoseg.analysis.registry import Analysis
from scaleprotoseg.analysis.results import MetricResult

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

SPARSITY_THRESHOLD = 0.005
ALPHAS = (0.0, 0.05, 0.1)


def _zero_below(weights: np.ndarray, alpha: float) -> np.ndarray:
    """The post-processing of section 3.3: group weights below ``alpha`` set to 0 (no renormalisation)."""
    return np.where(weights >= alpha, weights, 0.0)


def used_prototypes(group_prototype_weights: np.ndarray | torch.Tensor, alpha: float = 0.0) -> np.ndarray:
    """(P,) bool: prototypes with a weight > 0 in some group after zeroing the weights below ``alpha``.

    ``group_prototype_weights`` is the dense (G, P) group matrix. Use it as ``prototypes_used`` of the
    consistency and stability accumulators for grouped runs.
    """
    w = _zero_below(as_numpy(group_prototype_weights).astype(np.float64), alpha)
    return (w > 0).any(axis=0)


def active_prototype_counts(
    last_layer_weight: np.ndarray | torch.Tensor,
    threshold: float = SPARSITY_THRESHOLD,
    group_prototype_weights: np.ndarray | torch.Tensor | None = None,
    alpha: float = 0.0,
) -> np.ndarray:
    """Number of prototypes active for each class (section 4.2, "sparsity") -> (C,) int64.

    Last-layer weights with ``|w| < threshold`` are zeroed (tau_th = 0.005).
    - ProtoSeg (``group_prototype_weights`` None, ``W`` is (C, P)): prototypes p with ``|W[c, p]| >= threshold``.
    - ScaleProtoSeg (``W`` is (C, G), ``group_prototype_weights`` the dense (G, P) matrix): the distinct
      prototypes p with ``M[g, p] > 0`` (after zeroing group weights below ``alpha``; pass the already
      thresholded matrix and keep ``alpha`` 0) for some group g with ``|W[c, g]| >= threshold``, i.e. every
      prototype that can still move class c's score. Groups of other classes count when their weight survives.
    """
    W = np.abs(as_numpy(last_layer_weight).astype(np.float64))
    if W.ndim != 2:
        raise ValueError(f"last_layer_weight has shape {W.shape}; expected (C, K)")
    active = W >= threshold  # (C, K)
    if group_prototype_weights is None:
        return active.sum(axis=1).astype(np.int64)
    M = _zero_below(as_numpy(group_prototype_weights).astype(np.float64), alpha) > 0  # (G, P)
    if M.shape[0] != W.shape[1]:
        raise ValueError(f"group matrix has {M.shape[0]} groups but the last layer has {W.shape[1]} inputs")
    reach = (active.astype(np.int64) @ M.astype(np.int64)) > 0  # (C, P)
    return reach.sum(axis=1).astype(np.int64)


def active_prototypes_per_class(
    last_layer_weight: np.ndarray | torch.Tensor,
    threshold: float = SPARSITY_THRESHOLD,
    group_prototype_weights: np.ndarray | torch.Tensor | None = None,
    alpha: float = 0.0,
) -> float:
    """Sparsity score of Tables 3-4: :func:`active_prototype_counts` averaged over classes (lower is sparser)."""
    return float(active_prototype_counts(last_layer_weight, threshold, group_prototype_weights, alpha).mean())


def average_abs_weight(weight: np.ndarray | torch.Tensor) -> float:
    """Mean absolute value over all entries of the last layer (Table 10, "Avg Weight": h_proto or h_group)."""
    return float(np.abs(as_numpy(weight).astype(np.float64)).mean())


def prototype_counts(
    group_weights: np.ndarray | torch.Tensor,
    member_mask: np.ndarray | torch.Tensor | None = None,
    alphas: Sequence[float] = ALPHAS,
) -> dict[float, dict[str, Any]]:
    """Prototypes used by the groups at each threshold alpha (Table 2 "grouped", Tables 7-8).

    ``group_weights`` (C, N, M): row n of class c holds the weights of group (c, n) over the class's M prototype
    slots; ``member_mask`` (C, M) marks the real slots (classes may own fewer than M prototypes). At each alpha the
    weights below alpha are zeroed (section 3.3); a slot is used when some group of its class keeps a weight
    > 0. Returns ``{alpha: {"prototypes": total used slots, "group_avg": mean over all C*N groups of the number
    of weights > 0, "per_class": (C,) used slots}}``. Prototypes belong to one class, so slots are distinct.
    """
    w = as_numpy(group_weights).astype(np.float64)
    if w.ndim != 3:
        raise ValueError(f"group_weights has shape {w.shape}; expected (C, N, M)")
    mask = np.ones((w.shape[0], w.shape[2]), dtype=bool) if member_mask is None else as_numpy(member_mask)
    mask = mask.astype(bool)
    if mask.shape != (w.shape[0], w.shape[2]):
        raise ValueError(f"member_mask has shape {mask.shape}; expected {(w.shape[0], w.shape[2])}")
    out: dict[float, dict[str, Any]] = {}
    for alpha in alphas:
        kept = (_zero_below(w, alpha) > 0) & mask[:, None, :]  # (C, N, M)
        used = kept.any(axis=1)  # (C, M)
        out[float(alpha)] = {
            "prototypes": int(used.sum()),
            "group_avg": float(kept.sum(axis=2).mean()),
            "per_class": used.sum(axis=1).astype(np.int64),
        }
    return out


def extra_parameters(
    num_prototypes: int,
    feature_dim: int,
    num_classes: int,
    last_layer_inputs: int,
    num_group_weights: int = 0,
) -> int:
    """Parameters the interpretable head adds at inference over DeepLabv2 (supplement 12, Table 10).

    ``P * D  +  num_group_weights  +  C * K  -  D * C``: the (used) prototypes, the group matrices, the last
    layer over K inputs, minus a D -> C linear classifier that the prototype head replaces (both models share the
    backbone and a D-channel ASPP, which cancel). For ProtoSeg ``K = P`` (after pruning) and no group weights;
    for ScaleProtoSeg ``P`` = prototypes used by the groups, ``K = G`` and ``num_group_weights`` = entries of
    the per-class group matrices, sum over classes of ``N_c * |P_c|`` (the release stores them dense, zeros
    included). The paper states no formula; this one is our reading, reverse-engineered from Table 10, which it
    reproduces with the prototype counts of Tables 2-4: ProtoSeg Pascal (P = 158) 12.1K (table 12.1K),
    Cityscapes (P = 134) 9.9K (9.9K), ADE20K (P = 1161) 238.9K (238.2K +- 2.2); ScaleProtoSeg (3 groups and
    12 prototype slots per class) Pascal (P = 131) 9.1K (9.1K), Cityscapes (P = 111) 7.7K (7.6K +- 0.1),
    ADE20K (P = 1132) 135.7K (135.4K +- 0.3). Counting the ASPP convolutions instead (DeepLabv2's 2048 -> C
    classifier vs the 2048 -> 64 feature branches) would give millions, not thousands.
    """
    P, D, C, K = int(num_prototypes), int(feature_dim), int(num_classes), int(last_layer_inputs)
    return P * D + int(num_group_weights) + C * K - D * C


class SparsityAnalysis(Analysis):
    """``sparsity``: active prototypes per class (last layer |w| >= 0.005), average |w| and extra parameters
    (Tables 3-4, 10)."""

    name = "sparsity"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        ctx.need_prototypes()
        head = ctx.head
        W = head.last_layer_weight().detach().cpu()
        P = head.num_prototypes
        D = int(head.prototypes.dim)
        C = len(ctx.class_names)
        if ctx.grouped:
            dense = head.grouping.dense_weight(P).detach().cpu()
            counts = active_prototype_counts(W, SPARSITY_THRESHOLD, dense)
            used = int(ctx.used_prototype_mask().sum())
            n_group_weights = int(head.groups_per_class * head.grouping.member_mask.sum().item())
            extra = extra_parameters(used, D, C, W.shape[1], n_group_weights)
            layer = "h_group"
        else:
            counts = active_prototype_counts(W, SPARSITY_THRESHOLD)
            used, n_group_weights = P, 0
            extra = extra_parameters(P, D, C, P)
            layer = "h_proto"
        summary = {
            "sparsity": float(counts.mean()),
            "threshold": SPARSITY_THRESHOLD,
            "active_prototypes": {name: int(n) for name, n in zip(ctx.class_names, counts)},
            "avg_abs_weight": average_abs_weight(W),
            "extra_parameters": int(extra),
            "last_layer": layer,
            "last_layer_shape": list(W.shape),
            "num_prototypes": P,
            "prototypes_used": used,
            "group_weights": n_group_weights,
            "feature_dim": D,
        }
        rows: list[list[Any]] = [[i, n, int(k)] for i, (n, k) in enumerate(zip(ctx.class_names, counts))]
        rows.append([None, "mean", float(counts.mean())])
        return MetricResult(
            self.name,
            "Sparsity of the last layer (Tables 3-4, 10)",
            summary,
            ["class_index", "class", "active_prototypes"],
            rows,
            ctx.meta(),
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_sparsity

        return {"": plot_sparsity(result.summary)}
