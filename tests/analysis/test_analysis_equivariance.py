import numpy as np
import pytest

from scaleprotoseg.analysis.equivariance import EquivarianceAccumulator, atrous_scale_ratios


def test_scale_ratios_from_atrous_rates():
    assert atrous_scale_ratios((6, 12, 18, 24)) == (1.0, 2.0, 3.0, 4.0)


def _images(rng, n, twins):
    """Per image: ratio-1 input -> (P, 16, 16) maps, ratio-2 input -> (P, 8, 8) maps, label (32, 32).

    Prototype 0 (scale 0) read on the ratio-2 input sees G (8x8); the scale-1 prototypes in ``twins`` read on the
    ratio-1 input see G upsampled x2 (its quasi-equivariant copy); the other scale-1 prototypes see unrelated maps.
    """
    for _ in range(n):
        G = rng.random((8, 8))
        r1, r2 = rng.random((4, 16, 16)), rng.random((4, 8, 8))
        r2[0] = G
        for p in twins:
            r1[p] = np.kron(G, np.ones((2, 2)))
        label = np.zeros((32, 32), dtype=np.int64)
        label[:, 24:] = 7  # a class without prototypes
        label[0, :] = 255
        yield {1: r1, 2.0: r2}, label


def test_downsampled_copy_is_quasi_equivariant_and_unrelated_map_is_not():
    rng = np.random.default_rng(0)
    acc = EquivarianceAccumulator(
        prototype_class=[0, 0, 0, 1], prototype_scale=[0, 1, 1, 0], scale_ratios=(1, 2), num_groups=6
    )
    for acts, label in _images(rng, 5, twins=[1]):
        acc.update(acts, label)
    res = acc.compute()
    pairs = {(a, b): iou for (_, _, _, a, b, iou) in acc.pair_ious()}
    assert set(pairs) == {(0, 1), (0, 2)}
    np.testing.assert_allclose(pairs[(0, 1)], [1.0, 1.0])
    assert (pairs[(0, 2)] < 0.5).all()
    for q in (0.6, 0.7):
        r = res[q]
        assert [(a, b) for a, b, _ in r["pairs"]] == [(0, 1)]
        assert r["groups"] == [[0, 1]] and r["group_class"] == [0]
        assert r["ratio_groups"] == pytest.approx(1 / 6)
        assert r["ratio_prototypes"] == pytest.approx(2 / 4)
        assert r["ratio_classes"] == pytest.approx(1.0)  # class 1 has prototypes at one scale only
    mean = acc.compute(reduction="mean")[0.6]
    assert mean["groups"] == [[0, 1]]


def test_pairs_sharing_a_prototype_merge_into_one_group():
    rng = np.random.default_rng(1)
    acc = EquivarianceAccumulator([0, 0, 0, 0], [0, 1, 1, 1], (1, 2))
    for acts, label in _images(rng, 4, twins=[1, 2]):
        acc.update(acts, label)
    r = acc.compute()[0.6]
    assert sorted((a, b) for a, b, _ in r["pairs"]) == [(0, 1), (0, 2)]
    assert r["groups"] == [[0, 1, 2]]
    assert np.isnan(r["ratio_groups"])  # no num_groups given
    assert r["ratio_prototypes"] == pytest.approx(3 / 4)


def test_missing_ratio_is_reported():
    acc = EquivarianceAccumulator([0, 0], [0, 1], (1, 2))
    with pytest.raises(ValueError, match="no activations for downsampling ratio 2"):
        acc.update({1: np.zeros((2, 4, 4))}, np.zeros((8, 8), dtype=np.int64))


def test_labels_meet_the_map_grid_centre_aligned():
    """The label is sampled under each cell's centre (``ops.resize_labels``, PIL NEAREST): 16 pixels to 2 cells read
    pixels 4 and 12. The class sits only there, so a top-left sampling (pixels 0 and 8) would find no position."""
    rng = np.random.default_rng(0)
    label = np.full((16, 16), 255, dtype=np.int64)
    label[4::8, 4::8] = 0
    acc = EquivarianceAccumulator([0, 0], [0, 1], (1.0, 2.0), quantiles=(0.5,))
    acc.update({1.0: rng.random((2, 2, 2)), 2.0: rng.random((2, 1, 1))}, label)
    assert acc.union[(0, 0, 1)].sum() > 0
