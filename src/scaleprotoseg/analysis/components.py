"""Connected components of binarised prototype activation maps per scale (paper section 4.2, Figure 3), and the
small array helpers shared by the interpretability metrics of this package (percentile binarisation, 8-connected
labelling, the nearest-neighbour index convention).

Connected components use ``scipy.ndimage.label`` with a 3x3 all-ones structure, i.e. 8-connectivity between
non-zero pixels: the same components as opencv's ``connectedComponents(..., connectivity=8)`` used by the paper.
The ``components`` analysis (:class:`ComponentsAnalysis`) runs it over a run's validation images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from scaleprotoseg.analysis.registry import Analysis
from scaleprotoseg.analysis.results import MetricResult
from scaleprotoseg.ops import resize_activations

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)
COMPONENT_QUANTILES = (0.8, 0.9, 0.99)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view of an array or a (possibly CUDA, possibly grad-tracking) tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output position of a nearest resize from ``in_size`` to ``out_size`` along one axis.

    Nearest resizing is separable, so ``x[..., nearest_indices(h, H)[:, None], nearest_indices(w, W)]`` equals
    ``scaleprotoseg.ops.resize_activations(x, (H, W))`` exactly (the index rule is taken from that function, so
    the conventions cannot drift apart).
    """
    src = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
    return resize_activations(src, (out_size, 1)).view(-1).round().long().numpy()


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: (labels int32 (H, W) with 0 = background, count).

    Same components as opencv's ``connectedComponents`` with connectivity 8.
    """
    return ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTIVITY)


def quantile_thresholds(values: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Per-row thresholds: ``np.quantile`` (linear interpolation) of ``values`` (M, n) -> (Q, M)."""
    return np.quantile(np.asarray(values), np.asarray(quantiles, dtype=np.float64), axis=-1)


def binarize_at_quantile(maps: np.ndarray, quantile: float) -> np.ndarray:
    """Binarise each map of ``maps`` (..., h, w) at the ``quantile`` (in [0, 1]) of its own values.

    A pixel is on when its value is strictly above the map's quantile (the authors' release compares with ``>``),
    so a constant map has no pixel on.
    """
    maps = np.asarray(maps)
    flat = maps.reshape(*maps.shape[:-2], -1)
    thr = np.quantile(flat, quantile, axis=-1)
    return maps > np.asarray(thr)[..., None, None]


def count_components_per_map(masks: np.ndarray) -> np.ndarray:
    """Number of 8-connected components in each 2-D boolean mask of ``masks`` (N, h, w) -> (N,) int64.

    One ``ndimage.label`` call over the stack, with a structure that connects pixels only within a map.
    """
    masks = np.asarray(masks, dtype=bool)
    n_maps = masks.shape[0]
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n = ndimage.label(masks, structure=structure)
    if n == 0:
        return np.zeros(n_maps, dtype=np.int64)
    map_of_component = np.zeros(n + 1, dtype=np.int64)
    slice_idx = np.broadcast_to(np.arange(n_maps)[:, None, None], masks.shape)
    map_of_component[labels[masks]] = slice_idx[masks]
    return np.bincount(map_of_component[1:], minlength=n_maps).astype(np.int64)


class ComponentsAccumulator:
    """Per-scale statistics of the connected components of binarised prototype activations (section 4.2, Fig. 3).

    For every image and prototype, the activation map is binarised at each quantile ``p`` of that map's own values
    (strictly above, see :func:`binarize_at_quantile`), and its 8-connected components are counted. Per map:
    ``count`` = number of components, ``area`` = on-pixels / count (mean component area, in pixels of the maps
    as given: pass maps upsampled to the image size for areas in image pixels). Per (scale, p):
    ``mean_count`` averages ``count`` over all (image, prototype of that scale) maps; ``mean_area`` averages
    ``area`` over the maps that have at least one component; ``pooled_area`` = all on-pixels / all components.

    Args:
        prototype_scale: (P,) scale index of each prototype (``head.prototype_scale``).
        quantiles: binarisation quantiles p_th, in [0, 1] (paper: 0.8, 0.9, 0.99).
        prototype_mask: optional (P,) bool, prototypes to include (e.g. those used by the groups).
    """

    def __init__(
        self,
        prototype_scale: Sequence[int] | np.ndarray | torch.Tensor,
        quantiles: Sequence[float] = (0.8, 0.9, 0.99),
        prototype_mask: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        self.prototype_scale = as_numpy(prototype_scale).astype(np.int64).reshape(-1)
        self.quantiles = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles {self.quantiles}: expected values in [0, 1] (e.g. 0.9, not 90)")
        P = len(self.prototype_scale)
        self.prototype_mask = (
            np.ones(P, dtype=bool) if prototype_mask is None else as_numpy(prototype_mask).astype(bool).reshape(-1)
        )
        if self.prototype_mask.shape != (P,):
            raise ValueError(f"prototype_mask has shape {self.prototype_mask.shape}; expected ({P},)")
        self.scales = np.unique(self.prototype_scale[self.prototype_mask])
        S, Q = len(self.scales), len(self.quantiles)
        self._scale_pos = np.searchsorted(self.scales, self.prototype_scale)
        self.num_maps = np.zeros(S, dtype=np.int64)
        self.sum_count = np.zeros((S, Q), dtype=np.float64)
        self.sum_area = np.zeros((S, Q), dtype=np.float64)
        self.num_area = np.zeros((S, Q), dtype=np.int64)
        self.sum_pixels = np.zeros((S, Q), dtype=np.float64)

    def update(self, activations: np.ndarray | torch.Tensor) -> None:
        """Add one image: ``activations`` (P, h, w) prototype activation maps."""
        act = as_numpy(activations)
        P = len(self.prototype_scale)
        if act.ndim != 3 or act.shape[0] != P:
            raise ValueError(f"activations have shape {act.shape}; expected ({P}, h, w)")
        keep = np.nonzero(self.prototype_mask)[0]
        act = act[keep]
        pos = self._scale_pos[keep]
        S = len(self.scales)
        self.num_maps += np.bincount(pos, minlength=S)
        for qi, q in enumerate(self.quantiles):
            bins = binarize_at_quantile(act, q)
            counts = count_components_per_map(bins)
            pixels = bins.sum(axis=(1, 2)).astype(np.float64)
            has = counts > 0
            area = np.divide(pixels, counts, out=np.zeros_like(pixels), where=has)
            self.sum_count[:, qi] += np.bincount(pos, weights=counts, minlength=S)
            self.sum_area[:, qi] += np.bincount(pos, weights=area, minlength=S)
            self.num_area[:, qi] += np.bincount(pos, weights=has, minlength=S).astype(np.int64)
            self.sum_pixels[:, qi] += np.bincount(pos, weights=pixels, minlength=S)

    def compute(self) -> dict[str, Any]:
        """``scales`` (S,), ``quantiles`` (Q,), ``mean_count``, ``mean_area``, ``pooled_area`` (S, Q) float arrays
        (NaN where nothing was seen) and ``num_maps`` (S,)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_count = self.sum_count / self.num_maps[:, None]
            mean_area = self.sum_area / self.num_area
            pooled_area = self.sum_pixels / self.sum_count
        return {
            "scales": self.scales.copy(),
            "quantiles": np.asarray(self.quantiles),
            "mean_count": mean_count,
            "mean_area": mean_area,
            "pooled_area": pooled_area,
            "num_maps": self.num_maps.copy(),
        }


class ComponentsAnalysis(Analysis):
    """``components``: connected components of every prototype's binarised activation map per scale, on the
    validation images at native size (section 4.2, Figure 3); areas in feature cells."""

    name = "components"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        ctx.need_prototypes()
        acc = ComponentsAccumulator(ctx.head.prototype_scale.cpu().numpy(), COMPONENT_QUANTILES)
        split = ctx.split()
        count = 0
        for item in ctx.items(ctx.dataset(split), self.name):
            acc.update(ctx.activations(item["image"]))
            count += 1
        res = acc.compute()
        rows = [
            [int(s) + 1, q, res["mean_count"][i, j], res["mean_area"][i, j], res["pooled_area"][i, j], int(n)]
            for i, (s, n) in enumerate(zip(res["scales"], res["num_maps"]))
            for j, q in enumerate(res["quantiles"])
        ]
        summary = {**res, "area_unit": "feature cells", "cell_pixels": ctx.model.output_stride**2}
        return MetricResult(
            self.name,
            "Connected components per scale (Figure 3)",
            summary,
            ["scale", "p_th", "mean_count", "mean_area", "pooled_area", "maps"],
            rows,
            ctx.meta(split=split, num_images=count),
            plot_data={"title": f"Binarised prototype activations per scale: {ctx.name}"},
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_components

        if not result.meta["num_images"]:
            return {}
        return {"": plot_components(result.summary, title=result.plot_data["title"])}
