import pytest
import torch
from torch import nn

from scaleprotoseg.explore.decision import Ablation, DecisionTables, ExploreError
from scaleprotoseg.explore.edits import apply_ablation
from scaleprotoseg.models.heads import make_head
from scaleprotoseg.models.segmenter import Segmenter


class TinyBackbone(nn.Module):
    out_channels = 8
    output_stride = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x):
        return self.conv(x)


def _model(method="scaleprotoseg", mode="ratio", grouped=True):
    """A random model whose groups look trained: sparse rows (some weights exactly 0), last layer not 1 / -0.5."""
    torch.manual_seed(1)
    head = make_head(
        method, 8, 3, rates=(1, 2), dim=4, prototypes_per_class=2, groups_per_class=2, group_activation=mode
    )
    with torch.no_grad():
        head.prototypes.prototypes.uniform_(0, 1)
        head.h_proto.normal_()
        if grouped:
            head.enable_groups()
            head.grouping.weight.uniform_(-0.3, 1)
            head.grouping.project_()
            head.grouping.threshold_(0.1)
            head.h_group.normal_()
    head.refresh_layout()  # the tables were edited in place
    return Segmenter(TinyBackbone(), head).eval()


@pytest.mark.parametrize(
    "method,mode,grouped",
    [("scaleprotoseg", "ratio", True), ("scaleprotoseg", "geometric", True), ("protoseg", "ratio", False)],
)
def test_decomposition_adds_up_to_the_model_logits(method, mode, grouped):
    model = _model(method, mode, grouped)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 24, 20))
    tables = DecisionTables.of_head(model.head)
    acts = out.activations[0]
    torch.testing.assert_close(tables.logits(acts), out.logits[0], rtol=1e-5, atol=1e-5)
    for r, c in [(0, 0), (3, 2), (5, 4)]:
        d = tables.decompose(acts[:, r, c], range(3))
        for entry in d["classes"]:
            model_logit = float(out.logits[0, entry["class"], r, c])
            assert entry["logit"] == pytest.approx(model_logit, rel=1e-5, abs=1e-5)
            assert sum(t["contribution"] for t in entry["terms"]) == pytest.approx(model_logit, rel=1e-5, abs=1e-5)
            for t in entry["terms"]:
                assert t["contribution"] == pytest.approx(t["weight"] * t["activation"])
                if grouped:  # each group: its prototypes' shares add up to log a_g, and a_g is the model's
                    assert sum(p["log_contribution"] for p in t["prototypes"]) == pytest.approx(t["log_activation"])
                    model_group = float(out.group_activations[0, t["group"], r, c])
                    assert t["activation"] == pytest.approx(model_group, rel=1e-5)
                    assert all(p["weight"] > 0 for p in t["prototypes"])


@pytest.mark.parametrize("grouped", [True, False])
def test_ablated_tables_match_the_exported_model(grouped):
    model = _model("scaleprotoseg" if grouped else "protoseg", grouped=grouped)
    tables = DecisionTables.of_head(model.head)
    used = torch.nonzero(tables.group_weight.sum(0) > 0).flatten().tolist() if grouped else [0, 1, 2, 3]
    ablation = Ablation.of(used[:3], [1] if grouped else [])
    edited, keep = apply_ablation(model, ablation)
    assert not set(ablation.prototypes) & set(keep)
    assert edited.head.num_prototypes == len(keep) < model.head.num_prototypes
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        acts = model(x).activations[0]
        got = edited(x).logits[0]
    expected = tables.ablate(ablation).logits(acts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, tables.logits(acts), atol=1e-3)  # the edit did change something
    if grouped:  # rows that lost a member are back on the simplex; the removed group contributes nothing
        w = edited.head.grouping.weight
        sums = w.sum(-1).flatten()
        touched = tables.ablate(ablation).group_weight.sum(1) != tables.group_weight.sum(1)
        assert torch.allclose(sums[touched & (sums > 0)], torch.ones(()), atol=1e-5)
        assert float(edited.head.h_group.detach()[:, 1].abs().sum()) == 0
        assert float(w.detach().view(-1, w.shape[-1])[1].abs().sum()) == 0
    assert model.head.num_prototypes == len(tables.prototype_class)  # the original model is untouched


def test_untouched_groups_keep_their_weights():
    tables = DecisionTables.of_head(_model().head)
    w = tables.group_weight
    g_with_p = torch.nonzero(w[:, 0] > 0).flatten().tolist()
    ablated = tables.ablate(Ablation.of([0]))
    others = [g for g in range(tables.num_groups) if g not in g_with_p]
    assert torch.equal(ablated.group_weight[others], w[others])
    assert float(ablated.group_weight[:, 0].abs().sum()) == 0


def test_ablation_parse_and_errors():
    assert Ablation.parse("p3, 7,g1,G2") == Ablation.of([3, 7], [1, 2])
    assert Ablation.parse("p3,g1").label() == "p3,g1"
    assert Ablation.parse("").empty
    with pytest.raises(ExploreError, match="'px' is not a prototype or group"):
        Ablation.parse("px")
    tables = DecisionTables.of_head(_model().head)
    with pytest.raises(ExploreError, match=r"prototype\(s\) \[99\] do not exist"):
        tables.ablate(Ablation.of([99]))
    with pytest.raises(ExploreError, match=r"group\(s\) \[6\] do not exist"):
        tables.ablate(Ablation.of([], [6]))
    with pytest.raises(ExploreError, match="has no groups"):
        DecisionTables.of_head(_model("protoseg", grouped=False).head).ablate(Ablation.of([], [0]))
