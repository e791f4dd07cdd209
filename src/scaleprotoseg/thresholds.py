"""Otsu's threshold and its multi-level form on grey levels (histogram search for the largest between-class variance).

Used by the sample-set builder (to tell out-of-focus slices, :mod:`scaleprotoseg.data.samples`) and by the classical
baselines (:mod:`scaleprotoseg.evaluation.baselines`). Results equal ``skimage.filters.threshold_otsu`` and
``threshold_multiotsu`` on float input; written here to keep scikit-image out of the dependencies.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_THRESHOLD_CLASSES", "multi_otsu_thresholds", "otsu_split", "otsu_threshold"]

MAX_THRESHOLD_CLASSES = 3


def _check(values: np.ndarray, classes: int, bins: int) -> np.ndarray:
    if isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < 2:
        raise ValueError(f"classes: got {classes!r}; expected 2 or 3")
    if classes > MAX_THRESHOLD_CLASSES:
        raise ValueError(f"classes: got {classes}; the exhaustive multi-level Otsu search supports only 2 or 3 classes")
    if int(bins) < 2:
        raise ValueError(f"bins: got {bins}; expected at least 2")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("values: empty array; expected at least one grey level")
    if not np.isfinite(v).all():
        raise ValueError("values: contains NaN or infinite values; expected finite grey levels")
    return v


def otsu_split(values: np.ndarray, classes: int, bins: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Histogram split maximising the between-class variance: the indices (classes - 1,) of the last bin of each
    level but the brightest, and the bin edges; ``None`` when all values are equal. Ties: the first split."""
    v = _check(values, classes, bins)
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return None
    counts, edges = np.histogram(v, bins=int(bins), range=(lo, hi))
    counts = counts.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w = np.cumsum(counts)  # weight and first moment of bins 0..k
    s = np.cumsum(counts * centers)
    n = len(counts)
    if classes == 2:  # w1 * w2 * (m1 - m2)^2, as in skimage.filters.threshold_otsu
        w2 = np.cumsum(counts[::-1])[::-1]
        m1 = s / w
        m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
        between = w[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
        return np.array([int(np.argmax(between))]), edges

    def term(weight: np.ndarray, total: np.ndarray) -> np.ndarray:  # w_k * mu_k^2 of one level (0 when empty)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(weight > 0, total**2 / np.where(weight > 0, weight, 1.0), 0.0)

    i = np.arange(n)[:, None]  # last bin of level 0
    j = np.arange(n)[None, :]  # last bin of level 1
    score = term(w[i], s[i]) + term(w[j] - w[i], s[j] - s[i]) + term(w[-1] - w[j], s[-1] - s[j])
    score = np.where((i < j) & (j <= n - 2), score, -np.inf)
    a, b = np.unravel_index(int(np.argmax(score)), score.shape)
    return np.array([a, b]), edges


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the centre of the histogram bin that maximises the between-class variance.

    The histogram has ``bins`` equal bins over [min, max]. Constant values return that value. Same result as
    ``skimage.filters.threshold_otsu`` on float input.
    """
    return float(multi_otsu_thresholds(values, 2, bins)[0])


def multi_otsu_thresholds(values: np.ndarray, classes: int, bins: int = 256) -> np.ndarray:
    """Increasing thresholds (``classes - 1`` of them, bin centres) splitting ``values`` into ``classes`` levels.

    Exhaustive search over the histogram bins (``bins`` equal bins over [min, max]) for the split maximising the
    between-class variance; 2 or 3 classes (more raise a ValueError). Constant values return that value repeated.
    Same thresholds as ``skimage.filters.threshold_multiotsu`` (and ``threshold_otsu``) on float input.
    """
    split = otsu_split(values, classes, bins)
    if split is None:
        return np.full(classes - 1, float(np.asarray(values).reshape(-1)[0]))
    idx, edges = split
    return (edges[idx] + edges[idx + 1]) / 2
