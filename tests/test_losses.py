import math

import pytest
import torch

from scaleprotoseg import losses


def _naive_diversity(distances, labels, pclass, pscale, C, S, half=True):
    """Per-image, per-class, per-scale, per-pair loop, as the authors' release computes it."""
    terms = []
    B = distances.shape[0]
    for b in range(B):
        for c in range(C):
            cells = labels[b].flatten() == c
            if cells.sum() < 2:
                continue
            for s in range(S):
                idx = [i for i in range(len(pclass)) if pclass[i] == c and pscale[i] == s]
                dists = [torch.softmax(distances[b, i].flatten()[cells], 0) for i in idx]
                for i in range(len(idx)):
                    for j in range(i + 1, len(idx)):
                        p, q = dists[i], dists[j]
                        jd = (p * (p / q).log()).sum() + (q * (q / p).log()).sum()
                        terms.append(torch.exp(-(0.5 * jd if half else jd)))
    return torch.stack(terms).mean()


def test_diversity_is_one_for_identical_maps():
    d = torch.rand(1, 1, 4, 4).repeat(2, 3, 1, 1)  # 3 prototypes with identical distance maps
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    val = losses.diversity_loss(d, labels, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1, 1)
    assert torch.allclose(val, torch.tensor(1.0))


@pytest.mark.parametrize("convention,expected", [("half", 3**-0.125), ("full", 3**-0.25)])
def test_diversity_two_prototype_hand_computed(convention, expected):
    # Two cells of class 0. Prototype 0: distances (0, 0) -> softmax (1/2, 1/2).
    # Prototype 1: distances (0, ln 3) -> softmax (1/4, 3/4). Jeffrey's: sum (p - q)(ln p - ln q) = ln(3) / 4.
    d = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    val = losses.diversity_loss(d, labels, torch.tensor([0, 0]), torch.tensor([0, 0]), 1, 1, jeffreys=convention)
    assert val.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("half", [True, False])
def test_diversity_matches_naive_loop_on_random_input(half):
    g = torch.Generator().manual_seed(0)
    C, S, M, B = 4, 3, 3, 2
    pclass = torch.arange(C).repeat_interleave(M).repeat(S)
    pscale = torch.arange(S).repeat_interleave(C * M)
    d = torch.rand(B, len(pclass), 6, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, C, (B, 6, 5), generator=g)
    labels[0][labels[0] == 2] = 255  # class 2 absent in image 0
    labels[1, 0, 0] = 255
    labels[1][labels[1] == 3] = 1
    labels[1, 2, 2] = 3  # a single cell of class 3 in image 1: skipped
    ours = losses.diversity_loss(d, labels, pclass, pscale, C, S, jeffreys="half" if half else "full")
    ref = _naive_diversity(d, labels, pclass, pscale, C, S, half=half)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_diversity_handles_uneven_prototype_counts_and_has_gradients():
    pclass = torch.tensor([0, 0, 0, 1, 1, 0, 1])
    pscale = torch.tensor([0, 0, 1, 0, 0, 1, 1])  # (1, 1) has a single prototype: no pair
    d = (torch.rand(2, 7, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, 2, (2, 4, 4))
    ours = losses.diversity_loss(d, labels, pclass, pscale, 2, 2)
    ref = _naive_diversity(d, labels, pclass, pscale, 2, 2)
    assert torch.allclose(ours, ref, atol=1e-12)
    ours.backward()
    assert torch.isfinite(d.grad).all()
    assert d.grad[:, 6].abs().sum() == 0  # the lone prototype of (class 1, scale 1) has no pair


def test_diversity_without_labelled_cells_is_zero():
    d = torch.rand(1, 2, 3, 3, requires_grad=True)
    labels = torch.full((1, 3, 3), 255)
    val = losses.diversity_loss(d, labels, torch.tensor([0, 0]), torch.tensor([0, 0]), 1, 1)
    assert val.item() == 0.0
    val.backward()


def test_group_entropy_uniform_rows_is_one_and_onehot_is_zero():
    K = 12
    mask = torch.ones(5, K, dtype=torch.bool)
    uniform = torch.full((5, 3, K), 1.0 / K)
    assert losses.group_entropy_loss(uniform, mask).item() == pytest.approx(1.0, abs=1e-4)
    onehot = torch.zeros(5, 3, K)
    onehot[..., 0] = 1
    assert losses.group_entropy_loss(onehot, mask).item() == pytest.approx(0.0, abs=1e-4)


def test_group_entropy_normalises_by_each_class_size():
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    w = torch.zeros(2, 1, 4)
    w[0, 0, :2] = 0.5
    w[1, 0, :] = 0.25
    w[0, 0, 2] = 0.7  # outside the mask: ignored
    assert losses.group_entropy_loss(w, mask).item() == pytest.approx(1.0, abs=1e-4)


def test_off_class_l1_touches_only_off_class_weights():
    column_class = torch.tensor([0, 0, 1, 2])
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, 6.0, -7.0, 8.0], [9.0, -10.0, 11.0, 12.0]], requires_grad=True)
    val = losses.off_class_l1(w, column_class)
    assert val.item() == pytest.approx(3 + 4 + 5 + 6 + 8 + 9 + 10 + 11)
    val.backward()
    own = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert (w.grad[own] == 0).all()
    assert torch.equal(w.grad[~own], torch.sign(w.detach()[~own]))


def test_cross_entropy_on_the_label_grid_upsamples_the_logits():
    logits = torch.randn(2, 3, 2, 2)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    full = torch.nn.functional.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    ref = torch.nn.functional.cross_entropy(full, labels, ignore_index=255)  # mean over labelled pixels
    assert torch.allclose(losses.cross_entropy(logits, labels, resolution="labels"), ref)
    assert torch.allclose(
        losses.cross_entropy(logits, labels, resolution="features"), losses.cross_entropy_on_grid(logits, labels)
    )
    assert losses.cross_entropy(logits, torch.full((2, 4, 4), 255), resolution="labels").item() == 0.0
    with pytest.raises(ValueError, match="expected one of features, labels"):
        losses.cross_entropy(logits, labels, resolution="pixels")


def test_cross_entropy_on_grid_downsamples_labels_and_ignores_void():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]])
    val = losses.cross_entropy_on_grid(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([[[0, 1], [2, 255]]]), ignore_index=255)
    assert torch.allclose(val, ref)
    assert losses.cross_entropy_on_grid(logits, torch.full((1, 4, 4), 255)).item() == 0.0


def _proto_head():
    from scaleprotoseg.models.heads import ScaleProtoSegHead

    torch.manual_seed(0)
    return ScaleProtoSegHead(4, 3, rates=(1, 2), dim=3, prototypes_per_class=2)


def test_compute_losses_runs_in_float32_on_bfloat16_outputs():
    from scaleprotoseg.config import LossConfig

    head = _proto_head()
    out = head(torch.randn(2, 4, 6, 6))
    labels = torch.randint(0, 3, (2, 12, 12))
    terms = ["ce", "diversity", "l1_proto"]
    ref = losses.compute_losses(out.map(lambda t: t.bfloat16().float()), labels, head, LossConfig(), terms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = losses.compute_losses(out.map(lambda t: t.bfloat16()), labels, head, LossConfig(), terms)
    for k, v in ref.items():
        assert amp[k].dtype == torch.float32, k
        torch.testing.assert_close(amp[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_msc_losses_average_every_output_on_its_own_grid():
    """The release averages CE and diversity over its four multi-scale outputs (scales 1, 0.5, 0.75 and the fused
    one), each against the labels resized to its own grid."""
    from scaleprotoseg.config import LossConfig
    from scaleprotoseg.models.heads import ModelOutput

    head = _proto_head()
    big, small, fused = head(torch.randn(1, 4, 6, 6)), head(torch.randn(1, 4, 3, 3)), head(torch.randn(1, 4, 6, 6))
    chosen = losses.msc_loss_outputs([small, big], fused, [0.5, 1.0])
    assert chosen[0] is big and chosen[1] is fused and chosen[2] is small
    assert losses.msc_loss_outputs([small, big], fused, [0.5, 1.0], all_scales=False) == [big, fused]
    labels = torch.randint(0, 3, (1, 12, 12))
    cfg, terms = LossConfig(), ["ce", "diversity"]
    got = losses.compute_losses(big, labels, head, cfg, terms, extra_outputs=[fused, small])
    each = [losses.compute_losses(o, labels, head, cfg, terms) for o in (big, fused, small)]
    for k in terms:
        torch.testing.assert_close(got[k], torch.stack([e[k] for e in each]).mean(), msg=k)
    # an output with logits only (logit fusion) enters the CE but not the diversity
    logits_only = ModelOutput(logits=fused.logits)
    got = losses.compute_losses(big, labels, head, cfg, terms, extra_outputs=[logits_only])
    torch.testing.assert_close(got["diversity"], each[0]["diversity"])
    torch.testing.assert_close(got["ce"], (each[0]["ce"] + each[1]["ce"]) / 2)
