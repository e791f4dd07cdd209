"""Stability of prototypes under input noise (paper section 4.2, Tables 3-4; after Huang et al. [37]).

For every evaluated (image, prototype) pair (same selection as the consistency score: the prototype's class is
part-annotated, present in the image with at least one of its parts, and the prototype is used), the part-hit
vector (:func:`scaleprotoseg.analysis.consistency.part_hits`, same keypoints, same percentile binarisation) is
computed once from the activations of the clean image and once from those of the image plus Gaussian noise of
std 0.2 in the normalised input space. The pair is stable when the two vectors are identical. Stability at
percentile q = 100 * #stable pairs / #pairs (pooled over the dataset, as the authors' release does); the
reported score is the mean over the percentiles. [37] instead averages a per-prototype stability over
prototypes; that variant is returned as ``prototype_mean_score``.

The ``stability`` analysis (:class:`StabilityAnalysis`) runs this over a part-annotated dataset in the pass it
shares with consistency (:mod:`scaleprotoseg.analysis.parts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaleprotoseg.analysis.components import as_numpy
from scaleprotoseg.analysis.consistency import DEFAULT_PERCENTILES, _PartMetricBase, part_hits
from scaleprotoseg.analysis.registry import Analysis
from scaleprotoseg.analysis.results import MetricResult

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

NOISE_STD = 0.2


def add_gaussian_noise(
    image: torch.Tensor, std: float = NOISE_STD, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image + std * N(0, 1)``, elementwise, in the normalised input space (section 4.2: std 0.2).

    ``generator`` (on the image's device) makes the noise reproducible.
    """
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return image + std * noise


class StabilityAccumulator(_PartMetricBase):
    """Stability score over a part-annotated dataset (section 4.2; see the module docstring).

    Args: as :class:`~scaleprotoseg.analysis.consistency.ConsistencyAccumulator`, without ``threshold``.
    """

    def __init__(
        self,
        num_prototypes: int,
        prototype_class: Sequence[int] | np.ndarray | torch.Tensor,
        part_ids_per_class: Mapping[int, Sequence[int]],
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        count_background: bool = False,
        prototypes_used: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            num_prototypes, prototype_class, part_ids_per_class, percentiles, count_background, prototypes_used
        )
        self.stable = np.zeros((len(self.percentiles), self.num_prototypes), dtype=np.int64)
        self.total = np.zeros(self.num_prototypes, dtype=np.int64)

    def update(
        self,
        act_clean: np.ndarray | torch.Tensor,
        act_noisy: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        parts: np.ndarray | torch.Tensor,
        prototypes_used: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add one image: activations (P, h, w) of the clean and of the noisy image, label and parts (H, W)."""
        clean, noisy = as_numpy(act_clean), as_numpy(act_noisy)
        self._check_activations(clean, "clean activations")
        self._check_activations(noisy, "noisy activations")
        for cp, protos in self._selection(label, parts, prototypes_used):
            h_clean = part_hits(clean[protos], label, cp, self.quantiles)  # (Q, M, K)
            h_noisy = part_hits(noisy[protos], label, cp, self.quantiles)
            self.stable[:, protos] += (h_clean == h_noisy).all(axis=2)
            self.total[protos] += 1

    def compute(self) -> dict[str, Any]:
        """Scores in %: ``score`` (mean over percentiles), ``scores`` ``{percentile: score}``, ``percentiles``,
        ``prototype_stability`` (Q, P) fractions (NaN if never evaluated), ``prototype_mean_score`` ([37]'s
        mean over prototypes, averaged over percentiles), ``num_pairs``, ``evaluated`` (P,) bool."""
        evaluated = self.total > 0
        n = int(self.total.sum())
        per_q = 100.0 * self.stable.sum(axis=1) / n if n else np.full(len(self.percentiles), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_proto = np.where(evaluated[None], self.stable / self.total[None].astype(np.float64), np.nan)
        proto_mean = 100.0 * float(np.mean(per_proto[:, evaluated])) if evaluated.any() else float("nan")
        return {
            "score": float(np.mean(per_q)),
            "scores": {q: float(s) for q, s in zip(self.percentiles, per_q)},
            "percentiles": self.percentiles,
            "prototype_stability": per_proto,
            "prototype_mean_score": proto_mean,
            "num_pairs": n,
            "evaluated": evaluated,
        }


class StabilityAnalysis(Analysis):
    """``stability``: Tables 3-4 under input noise of std ``--noise-std`` (one row per percentile and a mean row)."""

    name = "stability"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        from scaleprotoseg.analysis.parts import shared_part_pass

        found = shared_part_pass(ctx, self.name)
        res = found.stability
        assert res is not None  # asked for
        n = res["num_pairs"]
        rows = [
            [p, res["scores"][p], None if not n else round(res["scores"][p] * n / 100.0), n] for p in res["percentiles"]
        ]
        rows.append(["mean", res["score"], None, n])
        noise = ctx.options.noise_std
        return MetricResult(
            self.name,
            "Stability of prototypes under input noise (Tables 3-4)",
            {**res, "noise_std": noise, "part_names": found.part_names},
            ["percentile", "stability_%", "stable_pairs", "pairs"],
            rows,
            {**found.meta, "noise_std": noise},
            plot_data={"title": f"Stability: {found.title}"},
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_consistency_stability

        if not np.isfinite(result.summary["score"]):
            return {}
        return {"": plot_consistency_stability(None, result.summary, title=result.plot_data["title"])}
