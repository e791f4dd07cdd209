import pytest
import torch

from scaleprotoseg.models.grouping import GroupingLayer
from scaleprotoseg.models.layout import padded_index


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
    index, mask = padded_index(pclass, 3)
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


def _kkt_projection_ok(v: torch.Tensor, w: torch.Tensor, atol: float = 1e-6) -> bool:
    """``w`` is the Euclidean projection of ``v`` on the simplex iff (KKT) w >= 0, sum w = 1, and one threshold
    theta gives w = v - theta where w > 0 and v <= theta where w = 0."""
    if (w < 0).any() or abs(float(w.sum()) - 1) > atol:
        return False
    pos = w > 0
    theta = v[pos] - w[pos]
    return bool(theta.max() - theta.min() < atol and (v[~pos] <= theta.mean() + atol).all())


def test_init_is_linear_default_uniform_per_class_then_projected():
    """Release: nn.Linear(|P_c|, N_c) per class, i.e. U(-1/sqrt(|P_c|), 1/sqrt(|P_c|)), projected on the simplex."""
    pclass = torch.tensor([0] * 3 + [1] * 12)  # |P_0| = 3, |P_1| = 12 = K
    layer = GroupingLayer(pclass, 2, groups_per_class=4000)
    torch.manual_seed(5)
    raw = layer._linear_init()
    assert raw.shape == (2, 4000, 12)
    for c, size in ((0, 3), (1, 12)):
        v = raw[c][:, layer.member_mask[c]]
        bound = 1 / size**0.5  # the class's own fan-in, not the padded width
        assert v.min() >= -bound and v.max() < bound
        assert v.min() < -0.99 * bound and v.max() > 0.99 * bound  # the whole range is used
        assert abs(float(v.mean())) < 0.01 * bound
        assert abs(float(v.std()) - bound / 3**0.5) < 0.02 * bound  # std of U(-b, b) = b / sqrt(3)
    # the parameter is the projection of that draw, row by row, with the same seed
    torch.manual_seed(5)
    layer = GroupingLayer(pclass, 2, groups_per_class=50)
    torch.manual_seed(5)
    raw = layer._linear_init()
    for c in range(2):
        m = layer.member_mask[c]
        for n in range(50):
            assert _kkt_projection_ok(raw[c, n, m], layer.weight.detach()[c, n, m])
        assert (layer.weight.detach()[c][:, ~m] == 0).all()
    # projected, a 12-wide row keeps about 7 of its entries (U[0,1), the former init, kept about 5)
    nonzero = (layer.weight.detach()[1] > 0).sum(-1).float().mean()
    assert 5 <= nonzero <= 9


def test_init_is_deterministic_under_manual_seed():
    pclass = torch.tensor([0, 1, 0, 1, 1, 2])
    torch.manual_seed(11)
    a = GroupingLayer(pclass, 3, 3).weight.detach()
    torch.manual_seed(11)
    b = GroupingLayer(pclass, 3, 3).weight.detach()
    torch.manual_seed(12)
    c = GroupingLayer(pclass, 3, 3).weight.detach()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_init_with_an_empty_class_and_a_single_member_class():
    layer = GroupingLayer(torch.tensor([0, 0, 2]), 3, 2)  # class 1 has no prototype, class 2 one
    w = layer.weight.detach()
    assert (w[1] == 0).all()
    assert torch.equal(w[2], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(w[0].sum(-1), torch.ones(2))


# -- learning: groups find the prototypes that jointly explain a class -----------------------------------------------
_C, _S, _M, _D = 2, 4, 3, 8  # classes, scales, prototypes per class and scale, prototype dimension


def _proto(scale: int, cls: int, m: int) -> int:
    """Index of a prototype in the release's scale-major layout."""
    return scale * _C * _M + cls * _M + m


_A, _B = _proto(0, 1, 0), _proto(1, 1, 0)  # class 1's evidence: A (scale 0) and B (scale 1) together


def _and_batch(prototypes: torch.Tensor, gen: torch.Generator, n: int = 8, size: int = 12):
    """Features (n, S*D, size, size) and labels: at every cell, each scale's feature sits (noise 0.03) on one of its
    scale's 2M prototypes or on a random point. Scale 0 shows A with probability 1/2, scale 1 shows B with
    probability 1/2, else another prototype: class 1's other prototypes (such as C = its first at scale 2) are decoys,
    active at random on every kind of cell. Label 1 exactly where A and B are both active."""
    per_scale = _C * _M
    feats = torch.empty(n, _S, _D, size, size)
    hit = []
    for s in range(_S):
        choice = torch.randint(0, per_scale + 1, (n, size, size), generator=gen)  # per_scale: a random point
        if s < 2:
            target = (_A, _B)[s] - s * per_scale
            on = torch.rand(n, size, size, generator=gen) < 0.5
            choice = torch.where(on, target, torch.where(choice == target, per_scale, choice))
            hit.append(on)
        points = torch.cat([prototypes[s * per_scale : (s + 1) * per_scale], torch.zeros(1, _D)])[choice]
        points = torch.where((choice == per_scale).unsqueeze(-1), torch.rand(n, size, size, _D, generator=gen), points)
        noise = 0.03 * torch.randn(n, size, size, _D, generator=gen)
        feats[:, s] = (points + noise).clamp(0, 1).permute(0, 3, 1, 2)
    return feats.reshape(n, _S * _D, size, size), (hit[0] & hit[1]).long()


def _train_groups(seed: int, lr: float, lr_h: float | None = None, warmup: int = 50, joint: int = 100):
    """Two group stages as in the sample recipes (Adam at constant learning rates: the groups alone, then the groups
    and h_group; the simplex projection after every step) on a frozen prototype head fed with :func:`_and_batch`
    features. Returns class 1's best (A, B) weight pair and :func:`~scaleprotoseg.engine.group_stats.group_change`."""
    from scaleprotoseg.config import StageConfig
    from scaleprotoseg.engine.group_stats import group_change, group_snapshot
    from scaleprotoseg.models.heads import ScaleProtoSegHead

    torch.manual_seed(seed)
    head = ScaleProtoSegHead(4, _C, rates=(1, 2, 3, 4), dim=_D, prototypes_per_class=_M)
    head.enable_groups()
    head.requires_grad_(False)  # ASPP and prototypes frozen (the forward starts after the ASPP)
    start = group_snapshot(head)
    gen = torch.Generator().manual_seed(seed)
    lrs = {"groups": lr, "last_layer": lr if lr_h is None else lr_h}
    stages = [
        StageConfig(steps=warmup, trainable=["groups"], lr={"groups": lr}),
        StageConfig(steps=joint, trainable=["groups", "last_layer"], lr=lrs),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~8 ms a step on one thread; tiny tensors only lose time to a second one
    try:
        _run_stages(head, stages, gen)
    finally:
        torch.set_num_threads(threads)
    columns = head.grouping.member_index[1].tolist()
    w = head.grouping.weight.detach()[1]  # class 1's groups, (N, K)
    pair = w[:, [columns.index(_A), columns.index(_B)]]
    best = int(pair.sum(-1).argmax())
    return pair[best], group_change(start, head)


def _run_stages(head, stages, gen: torch.Generator) -> None:
    from scaleprotoseg.config import LossConfig
    from scaleprotoseg.engine.optim import build_optimizer, build_scheduler
    from scaleprotoseg.losses import compute_losses

    for stage in stages:
        groups = head.param_groups()
        for name in stage.trainable:
            for p in groups[name]:
                p.requires_grad_(True)
        optimizer = build_optimizer(head, stage)
        scheduler = build_scheduler(optimizer, stage)
        for _ in range(stage.steps):
            x, y = _and_batch(head.prototypes.prototypes, gen)
            losses = compute_losses(head.forward_features(x), y, head, LossConfig(), ["ce", "entropy", "l1_group"])
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
            scheduler.step()
            head.grouping.project_()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_learn_the_two_prototypes_that_jointly_explain_a_class(seed):
    """At lr 5e-2 (groups and h_group), 50 + 100 steps find the group A AND B (20 of 20 seeds tried; at 1e-2, 0 of
    10; at 0.1, 19 of 20: one group collapsed on A alone)."""
    pair, change = _train_groups(seed, lr=5e-2)
    assert float(pair.sum()) > 0.8  # one group holds > 80 % of its mass on A and B ...
    assert float(pair.min()) > 0.2  # ... on both of them: the conjunction, not one prototype
    assert change["weight_change_max"] > 0.3  # far from the initialisation (entries start around 1/12)
    assert change["entropy_after"] < change["entropy_before"]


@pytest.mark.parametrize(("lr", "lr_h"), [(1e-3, 1e-3), (1e-2, 1e-4)])
def test_groups_do_not_learn_in_the_same_steps_at_small_learning_rates(lr, lr_h):
    """Controls: at 1e-3 the weights hardly move; with h_group nearly frozen (1e-4) even lr 1e-2 for the groups finds
    no A-and-B group: the CE then asks each group to go up or down as a whole, the gradients of a row share their
    sign, Adam turns them into nearly equal steps and the simplex projection removes that uniform shift."""
    pair, change = _train_groups(0, lr=lr, lr_h=lr_h)
    assert float(pair.sum()) < 0.8
    if lr_h == lr:
        assert change["weight_change_max"] < 0.2
