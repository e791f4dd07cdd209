import pytest
import torch

from scaleprotoseg.models.grouping import GroupingLayer, membership_table


def _naive_groups(layer: GroupingLayer, act: torch.Tensor, pclass: torch.Tensor) -> torch.Tensor:
    """For each class: select its prototypes' activations, apply its group weights, exponentiate (release loop)."""
    out = []
    for c in range(layer.num_classes):
        members = layer.member_index[c][layer.member_mask[c]]
        assert set(members.tolist()) == set(torch.nonzero(pclass == c).flatten().tolist())
        w = layer.weight[c][:, layer.member_mask[c]]  # (N, |P_c|)
        a = act[:, members]  # (B, |P_c|, h, w)
        if layer.mode == "geometric":
            out.append(torch.einsum("nm,bmhw->bnhw", w, torch.log(a.clamp_min(1e-6))).exp())
        else:
            out.append(torch.einsum("nm,bmhw->bnhw", w, a).exp())
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("mode", ["ratio", "geometric"])
def test_group_activations_equal_naive_per_class_loop(mode):
    pclass = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2, 2, 1, 0])  # uneven class sizes
    layer = GroupingLayer(pclass, num_classes=3, groups_per_class=2, mode=mode).double()
    act = torch.rand(2, len(pclass), 3, 4, dtype=torch.float64) * 9
    out = layer(act)
    assert out.shape == (2, 6, 3, 4)
    assert torch.allclose(out, _naive_groups(layer, act, pclass), rtol=1e-12)


def test_geometric_form_is_weighted_geometric_mean_of_activations():
    pclass = torch.tensor([0, 0])
    layer = GroupingLayer(pclass, 1, 1, mode="geometric").double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[0.25, 0.75]]]))
    act = torch.tensor([2.0, 8.0], dtype=torch.float64).view(1, 2, 1, 1)
    assert layer(act).item() == pytest.approx(2**0.25 * 8**0.75)


def test_rows_on_simplex_after_init_and_projection():
    pclass = torch.tensor([0, 0, 0, 1, 1, 2])
    layer = GroupingLayer(pclass, 3, 3)
    w = layer.weight.detach()
    mask = layer.member_mask.unsqueeze(1).expand_as(w)
    assert torch.allclose(w.sum(-1), torch.ones(3, 3))
    assert (w >= 0).all() and (w[~mask] == 0).all()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    layer.project_()
    w = layer.weight.detach()
    assert torch.allclose(w.sum(-1), torch.ones(3, 3), atol=1e-6)
    assert (w >= 0).all() and (w[~mask] == 0).all()


def test_threshold_zeroes_small_weights_without_renormalising():
    layer = GroupingLayer(torch.tensor([0, 0, 0]), 1, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[0.03, 0.47, 0.5]]]))
    assert layer.threshold_(0.05) == 1
    assert torch.allclose(layer.weight, torch.tensor([[[0.0, 0.47, 0.5]]]))
    assert layer.used_prototypes().tolist() == [1, 2]


def test_membership_table_and_remap_after_removal():
    pclass = torch.tensor([1, 0, 1, 0, 1])
    index, mask = membership_table(pclass, 3)
    assert index[0][mask[0]].tolist() == [1, 3]
    assert index[1][mask[1]].tolist() == [0, 2, 4]
    assert not mask[2].any()
    layer = GroupingLayer(pclass, 3, 2)
    dense_before = layer.dense_weight(5)
    keep = torch.tensor([0, 1, 3, 4])  # remove prototype 2 (class 1)
    layer.remap_prototypes(keep, pclass[keep])
    dense_after = layer.dense_weight(4)
    assert torch.equal(dense_after, dense_before[:, keep])
    act = torch.rand(1, 4, 2, 2)
    assert layer(act).shape == (1, 6, 2, 2)
