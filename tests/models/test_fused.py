import pytest
import torch
from torch import nn

from scaleprotoseg.evaluation.inference import predict_logits
from scaleprotoseg.models import fused
from scaleprotoseg.models.heads import DeepLabV2Head, ProtoSegHead, PrototypeHead, ScaleProtoSegHead
from scaleprotoseg.models.layout import padded_layout
from scaleprotoseg.models.segmenter import Segmenter
from scaleprotoseg.ops import log_activation


class TinyBackbone(nn.Module):
    out_channels = 8
    output_stride = 4
    bn_frozen = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x):
        return self.conv(x)


def _sparse_groups(head: PrototypeHead, seed: int = 0) -> None:
    """Thresholded-like groups: random simplex rows, then small weights cut (some prototypes end up unused)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.grouping.weight.copy_(torch.rand(head.grouping.weight.shape, generator=g) ** 4)
        head.project_groups_()
        head.threshold_groups_(0.2)
        head.h_group.add_(0.1 * torch.randn(head.h_group.shape, generator=g))


def _heads() -> dict[str, PrototypeHead]:
    torch.manual_seed(0)
    heads = {
        "protoseg": ProtoSegHead(8, 3, rates=(1, 2), dim=4, prototypes_per_class=5),
        "scaleprotoseg": ScaleProtoSegHead(8, 3, rates=(1, 2, 3), dim=4, prototypes_per_class=2),
    }
    for mode in ("ratio", "geometric"):
        head = ScaleProtoSegHead(8, 3, rates=(1, 2, 3), dim=4, prototypes_per_class=2, group_activation=mode)
        head.enable_groups()
        _sparse_groups(head)
        heads[f"grouped-{mode}"] = head
    pruned = ScaleProtoSegHead(8, 3, rates=(1, 2, 3), dim=4, prototypes_per_class=2)
    pruned.remove_prototypes(torch.tensor([0, 2, 3, 7, 8, 12, 17]))  # uneven per class and scale
    pruned.enable_groups()
    _sparse_groups(pruned, seed=1)
    heads["grouped-after-removal"] = pruned
    return heads


@pytest.mark.parametrize(
    "name", ["protoseg", "scaleprotoseg", "grouped-ratio", "grouped-geometric", "grouped-after-removal"]
)
@pytest.mark.parametrize("block", [None, 7])
def test_blockwise_logits_equal_the_plain_forward(name, block, monkeypatch):
    head = _heads()[name].eval()
    if block is not None:  # blocks of 7 cells: several blocks and a remainder on a 5x6 grid
        real = fused.blockwise_logits
        monkeypatch.setattr(fused, "blockwise_logits", lambda *a, **k: real(*a, **{**k, "block": block}))
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        expected = head(x).logits
        got = head.logits(x)
    assert got.shape == expected.shape == (2, 3, 5, 6)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_grouped_head_skips_exactly_the_unused_prototypes():
    head = _heads()["grouped-ratio"].eval()
    g = head.grouping
    used = torch.zeros(head.num_prototypes, dtype=torch.bool)
    used[g.used_prototypes()] = True
    dense = g.dense_weight(head.num_prototypes)
    assert torch.equal(used, dense.abs().sum(0) > 0)
    assert 0 < int(used.sum()) < head.num_prototypes  # the thresholding above leaves some prototypes unused
    source = head._plan_source
    assert set(source.tolist()) <= set(torch.nonzero(used).flatten().tolist())  # no distance to an unused one
    # Moving an unused prototype anywhere cannot change the logits.
    unused = torch.nonzero(~used).flatten()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        before = head.logits(x)
        head.prototypes.prototypes[unused] = 100.0
        assert torch.equal(head.logits(x), before)


def test_padded_layout_by_hand():
    scale = torch.tensor([1, 0, 1, 1, 0])
    keep = torch.tensor([True, True, False, True, True])
    source, slot, m = padded_layout(scale, 2, keep)
    assert m == 2  # scale 0 keeps prototypes 1 and 4, scale 1 keeps 0 and 3
    assert slot.tolist() == [2, 0, -1, 3, 1]
    assert source.tolist() == [1, 4, 0, 3]
    source, slot, m = padded_layout(scale, 2)  # all kept: m = 3, scale 0 has one padding slot
    assert m == 3 and slot.tolist() == [3, 0, 4, 5, 1]
    assert source[[0, 1, 3, 4, 5]].tolist() == [1, 4, 0, 2, 3] and scale[source[2]] in (0, 1)


def test_eq1_in_place_form_matches_log_activation():
    """The block path's max(d+eps, eps), 1 + (1-eps)/., log chain is Eq. 1 (values by hand at d = 0 and d = 1)."""
    head = ProtoSegHead(8, 1, rates=(1,), dim=2, prototypes_per_class=1).eval()
    with torch.no_grad():
        head.prototypes.prototypes.copy_(torch.tensor([[0.0, 0.0]]))
        head.h_proto.fill_(1.0)
        features = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # cells at distance 0 and 1
        got = head.logits_from_features(features).flatten()
    eps = head.prototypes.eps
    expected = log_activation(torch.tensor([0.0, 1.0]), eps)
    assert torch.allclose(got, expected)
    assert abs(float(got[0]) - float(torch.log(torch.tensor(1 / eps)))) < 1e-4


def test_with_autograd_on_logits_is_the_differentiable_forward():
    head = _heads()["grouped-ratio"]
    x = torch.randn(1, 8, 3, 3)
    out = head.logits(x)
    assert out.requires_grad
    out.sum().backward()
    assert head.grouping.weight.grad is not None


def test_blockwise_logits_rejects_wrong_shapes():
    combine = fused.linear_combine(torch.rand(1, 4))
    with pytest.raises(ValueError, match="expected num_scales"):
        fused.blockwise_logits(torch.rand(1, 6, 2, 2), torch.rand(2, 2, 2), 1e-4, combine, 1)


def test_head_with_prototypes_out_of_scale_order():
    head = _heads()["grouped-ratio"].eval()
    order = torch.randperm(head.num_prototypes, generator=torch.Generator().manual_seed(3))
    head.remove_prototypes(order)  # same prototypes, scales interleaved
    assert head.prototypes.scale_counts() is None
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        expected = head(x).logits
        assert torch.allclose(head.logits(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_layout_is_rebuilt_by_refresh_layout_only():
    head = _heads()["grouped-ratio"].eval()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        source = head._plan_source
        head.logits(x)
        assert head._plan_source is source  # inference reads the layout, never rebuilds it
        head.grouping.weight.zero_()
        head.grouping.weight[:, :, 0] = 1.0  # one member per group: fewer prototypes used
        head.refresh_layout()
        assert len(head._plan_source) < len(source)
        expected = head(x).logits
        assert torch.allclose(head.logits(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_layout_tables_follow_the_device_and_stay_out_of_the_state_dict():
    head = _heads()["grouped-after-removal"]
    tables = {"_member_index", "_member_mask", "_plan_source", "_plan_slot", "_plan_member_slot"}
    assert tables <= {name for name, _ in head.named_buffers()}
    assert not tables & set(head.state_dict())
    fresh = ScaleProtoSegHead(8, 3, rates=(1, 2, 3), dim=4, prototypes_per_class=2)
    fresh.apply_structure(head.structure())
    fresh.load_state_dict(head.state_dict())
    fresh.refresh_layout()
    for name in tables:
        assert torch.equal(getattr(fresh, name), getattr(head, name)), name


def test_segmenter_logits_is_what_prediction_uses():
    torch.manual_seed(0)
    heads = {"deeplabv2": DeepLabV2Head(8, 3, rates=(1, 2)), **_heads()}
    x = torch.randn(1, 3, 16, 20)
    for name, head in heads.items():
        model = Segmenter(TinyBackbone(), head).eval()
        with torch.no_grad():
            expected = model(x).logits
            tol = 1e-5 * float(expected.abs().max())
            assert torch.allclose(model.logits(x), expected, rtol=1e-5, atol=tol), name
        calls = []
        real = model.logits
        model.logits = lambda t: calls.append(1) or real(t)  # noqa: B023
        predict_logits(model, x, mode="whole")
        assert calls, f"{name}: predict_logits did not go through Segmenter.logits"
