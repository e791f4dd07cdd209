import numpy as np
import pytest
import torch

from scaleprotoseg.analysis.overlap import GroupOverlapAccumulator
from scaleprotoseg.ops import resize_activations


def _map(rng, hot):
    """10x10 map whose 5 largest values are the pixels ``hot``: exactly those survive the 95th percentile."""
    m = rng.random(100) * 0.1
    m[list(hot)] = 1.0 + np.arange(len(hot))
    return m.reshape(10, 10)


def test_hand_built_overlap():
    rng = np.random.default_rng(0)
    group_class = [0, 0, 0, 1, 1]
    acc = GroupOverlapAccumulator(group_class, mode=None)
    label = np.zeros((10, 10), dtype=np.int64)
    label[5:] = 1
    label[0, 0] = 255
    for _ in range(2):
        maps = np.stack(
            [
                _map(rng, range(0, 5)),
                _map(rng, range(2, 7)),  # I = 3, U = 7 with group 0
                _map(rng, range(50, 55)),  # disjoint from both
                _map(rng, range(20, 25)),
                _map(rng, range(20, 25)),  # class 1: identical groups
            ]
        )
        acc.update(maps, label)
    acc.update(np.stack([_map(rng, range(90, 95))] * 5), np.zeros((10, 10), dtype=np.int64))  # class 1 absent
    res = acc.compute()
    # class 0: the third image (identical maps for the 3 groups) adds I = U = 5 to every pair
    np.testing.assert_allclose(res["pair_iou"][0], 100 * np.array([(3 + 3 + 5) / (7 + 7 + 5), 5 / 25, 5 / 25]))
    assert res["pairs"][0].tolist() == [[0, 1], [0, 2], [1, 2]]
    np.testing.assert_allclose(res["pair_iou"][1], [100.0])
    assert res["num_images"] == {0: 3, 1: 2}
    assert res["class_iou"][0] == pytest.approx(np.mean(res["pair_iou"][0]))
    assert res["miou"] == pytest.approx((res["class_iou"][0] + 100.0) / 2)
    assert res["class_pooled_iou"][0] == pytest.approx(100 * (11 + 5 + 5) / (19 + 25 + 25))


def test_nearest_mode_equals_binarising_upsampled_maps():
    act = torch.rand(4, 6, 7)
    label = np.zeros((24, 28), dtype=np.int64)
    a = GroupOverlapAccumulator([0, 0, 0, 0], mode="nearest")
    b = GroupOverlapAccumulator([0, 0, 0, 0], mode=None)
    a.update(act, label)
    b.update(resize_activations(act[None], (24, 28))[0], label)
    np.testing.assert_allclose(a.compute()["pair_iou"][0], b.compute()["pair_iou"][0])
    c = GroupOverlapAccumulator([0, 0, 0, 0])  # bicubic, as the release
    c.update(act.numpy(), label)
    assert np.isfinite(c.compute()["miou"])
