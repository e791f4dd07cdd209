"""Otsu thresholds: hand-computed values, a brute-force search, and scikit-image."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scaleprotoseg.thresholds import multi_otsu_thresholds, otsu_threshold


def _trimodal(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(50, 10, 500), rng.normal(120, 15, 300), rng.normal(200, 8, 400)])


def test_otsu_hand_made() -> None:
    # Values 0, 1, 2, 3 with counts 3, 1, 1, 3; 4 bins over [0, 3]: centres 0.375, 1.125, 1.875, 2.625.
    # Between-class variance w1 * w2 * (m1 - m2)^2 in value units for a split after bin k:
    #   k=0: 3 * 5 * (0 - 12/5)^2 = 86.4;  k=1: 4 * 4 * (1/4 - 11/4)^2 = 100;  k=2: 86.4 (symmetric).
    values = np.array([0, 0, 0, 1, 2, 3, 3, 3], dtype=float)
    assert otsu_threshold(values, bins=4) == pytest.approx(1.125)
    assert otsu_threshold(np.full(5, 7.0)) == 7.0  # constant: the value itself
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(np.array([]))


def test_otsu_bimodal_splits_the_modes() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(40, 5, 1000), rng.normal(160, 5, 1000)])
    # every split between the modes has the same between-class variance: the first one wins (as in skimage)
    t = otsu_threshold(values)
    edges = np.histogram_bin_edges(values, 256, range=(values.min(), values.max()))
    assert values[:1000].max() < t + (edges[1] - edges[0]) / 2 < values[1000:].min()


def test_multi_otsu_equals_brute_force() -> None:
    values = _trimodal(2)
    bins = 16
    counts, edges = np.histogram(values, bins=bins, range=(values.min(), values.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_score = None, -1.0
    for i, j in itertools.combinations(range(bins - 1), 2):  # last bins of levels 0 and 1
        score = 0.0
        for lo, hi in ((0, i + 1), (i + 1, j + 1), (j + 1, bins)):
            w = counts[lo:hi].sum()
            score += (counts[lo:hi] * centers[lo:hi]).sum() ** 2 / w if w else 0.0
        if score > best_score:
            best, best_score = (centers[i], centers[j]), score
    np.testing.assert_allclose(multi_otsu_thresholds(values, 3, bins=bins), best)
    np.testing.assert_allclose(multi_otsu_thresholds(values, 2, bins=bins), [otsu_threshold(values, bins=bins)])


def test_multi_otsu_rejects_more_than_three_classes() -> None:
    with pytest.raises(ValueError, match="only 2 or 3 classes"):
        multi_otsu_thresholds(_trimodal(0), 4)
    with pytest.raises(ValueError, match="expected 2 or 3"):
        multi_otsu_thresholds(_trimodal(0), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_agrees_with_skimage(seed: int) -> None:
    filters = pytest.importorskip("skimage.filters")
    values = _trimodal(seed)
    assert otsu_threshold(values) == pytest.approx(float(filters.threshold_otsu(values)))
    assert otsu_threshold(values, bins=32) == pytest.approx(float(filters.threshold_otsu(values, nbins=32)))
    np.testing.assert_allclose(multi_otsu_thresholds(values, 3), filters.threshold_multiotsu(values, classes=3))
    image = np.random.default_rng(seed).random((20, 30)) * 255
    assert otsu_threshold(image) == pytest.approx(float(filters.threshold_otsu(image)))
