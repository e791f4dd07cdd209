import numpy as np
import pytest
import torch
from scipy import ndimage

from scaleprotoseg.analysis.components import (
    ComponentsAccumulator,
    binarize_at_quantile,
    count_components_per_map,
    label_components,
    nearest_indices,
)
from scaleprotoseg.ops import resize_activations


def _two_blobs():
    m = np.zeros((20, 20), dtype=np.float32)
    m[2:4, 2:4] = 1.0  # 4 pixels
    m[10:13, 10:13] = 2.0  # 9 pixels
    return m


def _one_blob():
    m = np.zeros((20, 20), dtype=np.float32)
    m[5:9, 5:9] = 1.0
    return m


def test_two_blobs_give_two_components_of_the_right_area():
    acc = ComponentsAccumulator([0, 1], quantiles=(0.8, 0.9))
    for _ in range(3):
        acc.update(np.stack([_two_blobs(), _one_blob()]))
    res = acc.compute()
    assert res["scales"].tolist() == [0, 1]
    np.testing.assert_allclose(res["mean_count"], [[2, 2], [1, 1]])
    np.testing.assert_allclose(res["mean_area"], [[6.5, 6.5], [16, 16]])
    np.testing.assert_allclose(res["pooled_area"], [[6.5, 6.5], [16, 16]])
    assert res["num_maps"].tolist() == [3, 3]


def test_diagonal_neighbours_are_one_component_and_constant_maps_have_none():
    m = np.zeros((5, 5), dtype=np.float32)
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0
    assert label_components(m > 0)[1] == 1
    acc = ComponentsAccumulator([0, 0], quantiles=(0.5,))
    acc.update(torch.from_numpy(np.stack([m, np.ones_like(m)])))
    res = acc.compute()
    assert res["mean_count"][0, 0] == pytest.approx(0.5)  # (1 + 0) / 2 maps
    assert res["mean_area"][0, 0] == pytest.approx(3.0)  # only maps with a component


def test_stacked_component_count_matches_per_map_labelling():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 15, 17)) > 0.6
    masks[2] = False
    expected = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks]
    assert count_components_per_map(masks).tolist() == expected


def test_binarize_is_strictly_above_the_quantile():
    m = np.arange(10, dtype=np.float32).reshape(1, 2, 5)
    assert binarize_at_quantile(m, 0.8).sum() == 2  # threshold 7.2: values 8 and 9


@pytest.mark.parametrize("n_in, n_out", [(5, 17), (65, 513), (8, 3), (7, 7)])
def test_nearest_indices_follow_resize_activations(n_in, n_out):
    x = torch.rand(1, 1, n_in, n_in + 2)
    ref = resize_activations(x, (n_out, n_out + 1))[0, 0].numpy()
    got = x[0, 0].numpy()[nearest_indices(n_in, n_out)[:, None], nearest_indices(n_in + 2, n_out + 1)[None, :]]
    np.testing.assert_array_equal(got, ref)
