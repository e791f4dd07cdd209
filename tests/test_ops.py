import math

import numpy as np
import pytest
import torch

from scaleprotoseg import ops


def test_activation_at_zero_distance_is_log_inverse_eps():
    d = torch.zeros(3)
    assert torch.allclose(ops.log_activation(d, eps=1e-4), torch.full((3,), math.log(1e4)))
    # and it decreases with distance towards 0
    a = ops.log_activation(torch.tensor([0.0, 0.1, 1.0, 100.0]))
    assert (a[:-1] > a[1:]).all() and a[-1] > 0 and a[-1] < 0.02


def test_simplex_projection_known_value():
    out = ops.project_simplex(torch.tensor([0.5, 0.3, -0.2]))
    assert torch.allclose(out, torch.tensor([0.6, 0.4, 0.0]), atol=1e-7)


def _reference_simplex(v: torch.Tensor) -> torch.Tensor:
    """Bisection on theta so that sum(max(v - theta, 0)) = 1 (independent of the sort-based algorithm)."""
    lo, hi = v.min().item() - 1.0, v.max().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        if (v - mid).clamp_min(0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return (v - (lo + hi) / 2).clamp_min(0)


def test_simplex_projection_random_rows():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(50, 12, generator=g, dtype=torch.float64) * 2
    w = ops.project_simplex(v)
    assert torch.allclose(w.sum(-1), torch.ones(50, dtype=torch.float64))
    assert (w >= 0).all()
    assert torch.allclose(ops.project_simplex(w), w)  # idempotent
    ref = torch.stack([_reference_simplex(r) for r in v])
    assert torch.allclose(w, ref, atol=1e-9)


def test_simplex_projection_with_mask_equals_projecting_the_subvector():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.4
    mask[:, 0] = True
    w = ops.project_simplex(v, mask)
    assert (w[~mask] == 0).all()
    for i in range(4):
        assert torch.allclose(w[i][mask[i]], _reference_simplex(v[i][mask[i]]), atol=1e-9)
    with pytest.raises(ValueError, match="empty mask"):
        ops.project_simplex(v, torch.zeros_like(mask))


def test_squared_distances_match_cdist():
    z = torch.rand(2, 5, 3, 4, dtype=torch.float64)
    p = torch.rand(6, 5, dtype=torch.float64)
    d = ops.squared_distances(z, p)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    ref = torch.cdist(flat, p) ** 2
    assert torch.allclose(d.permute(0, 2, 3, 1).reshape(-1, 6), ref, atol=1e-10)


def test_multiscale_distances_compare_each_prototype_with_its_scale_only():
    S, D = 3, 4
    z = torch.rand(2, S * D, 5, 5, dtype=torch.float64)
    p = torch.rand(7, D, dtype=torch.float64)
    scale = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    d = ops.multiscale_squared_distances(z, p, scale, S)
    for i in range(7):
        zs = z[:, scale[i] * D : (scale[i] + 1) * D]
        ref = ((zs - p[i].view(1, D, 1, 1)) ** 2).sum(1)
        assert torch.allclose(d[:, i], ref, atol=1e-10)
    with pytest.raises(ValueError, match="channels"):
        ops.multiscale_squared_distances(z, torch.rand(7, 5), scale, S)
    # the scale-major fast path (one product per scale, a scale may be empty) equals the general one
    order = torch.argsort(scale, stable=True)
    sorted_scale = scale[order]
    fast = ops.multiscale_squared_distances(z, p[order], sorted_scale, S)
    assert torch.allclose(fast, d[:, order], atol=1e-10)
    no_middle = sorted_scale != 1
    fast = ops.multiscale_squared_distances(z, p[order][no_middle], sorted_scale[no_middle], S)
    assert torch.allclose(fast, d[:, order][:, no_middle], atol=1e-10)
    # equal counts per scale (one batched product over scales), against the brute-force definition
    equal = torch.tensor([0, 0, 1, 1, 2, 2])
    p6 = torch.rand(6, D, dtype=torch.float64)
    d6 = ops.multiscale_squared_distances(z, p6, equal, S, counts=[2, 2, 2])
    for i in range(6):
        zs = z[:, equal[i] * D : (equal[i] + 1) * D]
        assert torch.allclose(d6[:, i], ((zs - p6[i].view(1, D, 1, 1)) ** 2).sum(1), atol=1e-10)


def test_resize_labels_is_centre_aligned():
    # 16 pixels to 2 cells: each cell takes the pixel under its centre, 4 and 12 (PIL NEAREST), not 0 and 8
    labels = torch.arange(16).view(1, 16).expand(16, 16)
    assert ops.resize_labels(labels, (2, 2)).tolist() == [[4, 12], [4, 12]]
    # 9 -> 3 cells: pixels 1, 4, 7 (cell centres at 1.5, 4.5, 7.5); up-sampling repeats each value
    assert ops.resize_labels(torch.arange(9).view(1, 9), (1, 3)).tolist() == [[1, 4, 7]]
    assert ops.resize_labels(torch.arange(3).view(1, 3), (1, 6)).tolist() == [[0, 0, 1, 1, 2, 2]]


def test_resize_conventions():
    labels = torch.randint(0, 3, (2, 9, 9))
    labels[0, 0, 0] = 255
    small = ops.resize_labels(labels, (3, 3))
    assert set(small.unique().tolist()) <= set(labels.unique().tolist())
    assert small.dtype == labels.dtype
    assert ops.resize_labels(labels[0], (4, 5)).shape == (4, 5)
    act = torch.rand(1, 2, 3, 3)
    up = ops.resize_activations(act, (6, 6))
    assert torch.equal(up[..., ::2, ::2], act)  # nearest keeps each cell's value
    img = torch.rand(1, 3, 4, 4)
    assert ops.resize_image(img, (8, 8)).shape == (1, 3, 8, 8)
    assert ops.upsample_logits(img, (4, 4)) is img


@pytest.mark.parametrize(
    "src,dst", [((513, 513), (65, 65)), ((321, 321), (41, 41)), ((37, 53), (5, 7)), ((5, 7), (16, 9))]
)
def test_resize_labels_equals_pil_nearest(src, dst):
    """Labels meet the feature grid as the release resizes them: PIL's NEAREST."""
    from PIL import Image

    labels = torch.randint(0, 255, src, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    pil = np.asarray(Image.fromarray(labels.numpy()).resize((dst[1], dst[0]), Image.NEAREST))
    assert np.array_equal(ops.resize_labels(labels.long(), dst).numpy(), pil)
