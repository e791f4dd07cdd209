import numpy as np
import pytest
import torch

from scaleprotoseg.analysis.consistency import (
    ConsistencyAccumulator,
    image_class_parts,
    part_hits,
    part_keypoints,
    replicated_quantiles,
)
from scaleprotoseg.analysis.stability import StabilityAccumulator, add_gaussian_noise
from scaleprotoseg.ops import resize_activations


def test_keypoints_are_centroids_of_8_connected_components():
    pm = np.zeros((10, 12), dtype=np.int64)
    pm[1:3, 1:3] = 1  # 2x2 block, centroid (1.5, 1.5)
    pm[6:8, 6:9] = 1  # 2x3 block, centroid (6.5, 7)
    pm[4, 10] = 1
    pm[5, 11] = 1  # touches (4, 10) diagonally: one component with 8-connectivity
    pm[0, 8:11] = 2
    kps = part_keypoints(pm, [1, 2, 3])
    got = sorted(map(tuple, kps[1].tolist()))
    assert got == sorted([(1.5, 1.5), (6.5, 7.0), (4.5, 10.5)])
    assert kps[2].tolist() == [[0.0, 9.0]]
    assert kps[3].shape == (0, 2)
    assert set(part_keypoints(pm)) == {1, 2}  # default: every id > 0


def test_keypoints_with_background_flag_add_the_release_background_centroid_first():
    pm = np.zeros((6, 8), dtype=np.int64)
    pm[1:3, 1:4] = 1
    pm[4, 6] = 1
    mask = np.ones_like(pm, dtype=bool)
    mask[:, 7] = False
    plain = part_keypoints(pm, [1], mask=mask)[1]
    with_bg = part_keypoints(pm, [1], mask=mask, count_background=True)[1]
    assert len(with_bg) == len(plain) + 1
    rr, cc = np.nonzero(~((pm == 1) & mask))  # opencv's label 0: all other pixels of the image
    np.testing.assert_allclose(with_bg[0], [rr.mean(), cc.mean()])
    np.testing.assert_allclose(with_bg[1:], plain)


def test_keypoints_respect_the_class_mask():
    pm = np.zeros((4, 4), dtype=np.int64)
    pm[:, :] = 1
    mask = np.zeros_like(pm, dtype=bool)
    mask[0, 0] = mask[3, 3] = True
    assert sorted(map(tuple, part_keypoints(pm, [1], mask=mask)[1].tolist())) == [(0.0, 0.0), (3.0, 3.0)]


def test_replicated_quantiles_equal_numpy_on_the_repeated_values():
    rng = np.random.default_rng(0)
    vals = rng.random((5, 30)).astype(np.float32)
    vals[:, :4] = 0.5  # ties
    counts = rng.integers(0, 6, size=30)
    qs = [0.0, 0.3, 0.7, 0.8, 0.9, 1.0]
    ref = np.quantile(np.repeat(vals, counts, axis=1), qs, axis=1)
    np.testing.assert_allclose(replicated_quantiles(vals, counts, qs), ref, rtol=0, atol=1e-7)


def _naive_hits(act, label, parts, c, part_ids, quantiles):
    """Brute force: full nearest upsampling, percentile inside the class mask, keypoints looked up one by one."""
    H, W = label.shape
    up = resize_activations(torch.from_numpy(act)[None], (H, W))[0].numpy()
    cls = label == c
    out = np.zeros((len(quantiles), act.shape[0], len(part_ids)), dtype=bool)
    kps = part_keypoints(parts, part_ids, mask=cls)
    for qi, q in enumerate(quantiles):
        for m in range(act.shape[0]):
            thr = np.quantile(up[m][cls], q)
            on = (up[m] > thr) & cls
            for k, pid in enumerate(part_ids):
                out[qi, m, k] = any(on[int(np.rint(r)), int(np.rint(cc))] for r, cc in kps[pid])
    return out


def test_part_hits_match_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        label = np.zeros((37, 45), dtype=np.int64)
        label[5:30, 3:40] = 1
        label[rng.random(label.shape) < 0.05] = 255
        parts = rng.integers(0, 4, size=label.shape)
        parts[rng.random(label.shape) < 0.9] = 0
        act = rng.random((4, 10, 12)).astype(np.float32)
        act[:, :3] = 0.25  # ties
        (cp,) = image_class_parts(label, parts, {1: [1, 2, 3]})
        qs = [0.7, 0.8, 0.9]
        np.testing.assert_array_equal(part_hits(act, label, cp, qs), _naive_hits(act, label, parts, 1, [1, 2, 3], qs))


def _person_image(rng, H=32, W=32, os=4, part2=True):
    """Class 1 (a 'person') in a random place: part 1 (head) on top, part 2 (body) below; class 2 elsewhere."""
    label = np.full((H, W), 2, dtype=np.int64)
    parts = np.zeros((H, W), dtype=np.int64)
    r0, c0 = rng.integers(0, 12), rng.integers(0, 20)
    label[r0 : r0 + 20, c0 : c0 + 12] = 1
    parts[r0 : r0 + 4, c0 + 4 : c0 + 8] = 1
    if part2:
        parts[r0 + 6 : r0 + 20, c0 : c0 + 12] = 2
    head = (r0 + 1.5, c0 + 5.5)  # centroid of part 1
    h, w = H // os, W // os
    hot = (int(round(head[0])) // os, int(round(head[1])) // os)
    return label, parts, hot, (h, w)


def test_prototype_always_on_part_1_is_consistent_and_random_one_is_not():
    rng = np.random.default_rng(0)
    prototype_class = [1, 1, 2]  # prototype 2's class has no part annotations: never scored
    acc = ConsistencyAccumulator(3, prototype_class, {1: [1, 2]})
    for _ in range(40):
        label, parts, hot, (h, w) = _person_image(rng)
        act = rng.random((3, h, w)).astype(np.float32)
        act[0, hot[0], hot[1]] = 5.0  # prototype 0 fires on the head
        acc.update(act, label, parts)
    res = acc.compute()
    assert res["evaluated"].tolist() == [True, True, False]
    assert res["consistent"][:, 0].all() and not res["consistent"][:, 1].any()
    assert res["score"] == pytest.approx(50.0)
    assert res["scores"] == {70.0: 50.0, 80.0: 50.0, 90.0: 50.0}
    np.testing.assert_allclose(res["hit_frequency"][:, 0, 0], 1.0)
    assert (res["hit_frequency"][:, 1] < 0.5).all()
    assert res["part_presence"][0].tolist() == [40, 40]


def test_single_prototype_always_hitting_part_1_scores_100():
    rng = np.random.default_rng(3)
    acc = ConsistencyAccumulator(1, [1], {1: [1, 2]})
    for _ in range(10):
        label, parts, hot, (h, w) = _person_image(rng)
        act = np.zeros((1, h, w), dtype=np.float32)
        act[0, hot[0], hot[1]] = 1.0
        acc.update(torch.from_numpy(act), torch.from_numpy(label), torch.from_numpy(parts))
    assert acc.compute()["score"] == pytest.approx(100.0)


def test_frequency_is_over_images_where_the_part_is_present_and_threshold_is_strict():
    rng = np.random.default_rng(4)
    acc = ConsistencyAccumulator(1, [1], {1: [1, 2]})
    acc_loose = ConsistencyAccumulator(1, [1], {1: [1, 2]}, threshold=0.79)
    for i in range(10):
        # part 2 only in the even images; the prototype fires on part 2's area in 4 of those 5 images
        label, parts, hot, (h, w) = _person_image(rng, part2=(i % 2 == 0))
        act = np.zeros((1, h, w), dtype=np.float32)
        if i % 2 == 0 and i != 0:
            body = np.argwhere(parts == 2).mean(axis=0).round().astype(int) // 4
            act[0, body[0], body[1]] = 1.0
        for a in (acc, acc_loose):
            a.update(act, label, parts)
    res = acc.compute()
    assert res["part_presence"][0].tolist() == [10, 5]
    np.testing.assert_allclose(res["hit_frequency"][:, 0, 1], 0.8)
    assert res["score"] == 0.0  # 0.8 is not "more than 80 %"
    assert acc_loose.compute()["score"] == 100.0


def test_prototypes_used_mask_restricts_the_score():
    rng = np.random.default_rng(0)
    acc = ConsistencyAccumulator(2, [1, 1], {1: [1, 2]}, prototypes_used=np.array([True, False]))
    for _ in range(5):
        label, parts, hot, (h, w) = _person_image(rng)
        act = rng.random((2, h, w)).astype(np.float32)
        act[0, hot[0], hot[1]] = 5.0
        acc.update(act, label, parts)
    res = acc.compute()
    assert res["num_evaluated"] == 1 and res["score"] == 100.0


def test_wrong_shapes_are_reported():
    acc = ConsistencyAccumulator(2, [1, 1], {1: [1]})
    with pytest.raises(ValueError, match="expected \\(2, h, w\\)"):
        acc.update(np.zeros((3, 4, 4)), np.zeros((8, 8), dtype=int), np.zeros((8, 8), dtype=int))
    with pytest.raises(ValueError, match="percentiles"):
        ConsistencyAccumulator(2, [1, 1], {1: [1]}, percentiles=(0.7,))


def test_noise_invariant_model_has_stability_100_and_a_noisy_one_less():
    rng = np.random.default_rng(0)
    same = StabilityAccumulator(2, [1, 1], {1: [1, 2]})
    diff = StabilityAccumulator(2, [1, 1], {1: [1, 2]})
    for _ in range(20):
        label, parts, _, (h, w) = _person_image(rng)
        clean = rng.random((2, h, w)).astype(np.float32)
        same.update(clean, clean.copy(), label, parts)
        diff.update(clean, rng.random((2, h, w)).astype(np.float32), label, parts)
    res = same.compute()
    assert res["score"] == 100.0 and res["num_pairs"] == 40
    assert res["prototype_mean_score"] == 100.0
    assert diff.compute()["score"] < 90.0


def test_gaussian_noise_has_the_requested_std_and_is_reproducible():
    x = torch.zeros(3, 200, 200)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = add_gaussian_noise(x, generator=g1), add_gaussian_noise(x, generator=g2)
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.2, rel=0.02)
    assert add_gaussian_noise(x, std=0.0).abs().max().item() == 0.0
