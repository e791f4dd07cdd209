"""explain_image: every view for every predicted class, graph edges, nearest prototypes, failure view, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scaleprotoseg.explain.explainer import VIEWS, explain_image, parse_cells, resolve_classes
from scaleprotoseg.explain.nearest import pick_cells, top_prototypes_at


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _check_views(res, expected_views):
    man, out = res["manifest"], res["out"]
    assert json.loads((out / "manifest.json").read_text()) == man
    for key in ("input", "prediction", "overlay", "legend", "summary", "label"):
        assert _nonempty(out / man["files"][key]), key
    assert man["predicted_classes"]
    assert [c["index"] for c in man["classes"]] == man["predicted_classes"]
    for c in man["classes"]:
        for view in VIEWS:
            v = c["views"][view]
            if view in expected_views:
                assert v["available"], (c["name"], view, v.get("reason"))
                assert v["files"], (c["name"], view)
                for f in v["files"]:
                    assert _nonempty(out / f), f
            else:
                assert not v["available"] and v["reason"]


def test_scaleprotoseg_writes_every_view(explained):
    res = explained["scaleprotoseg"]
    _check_views(res, set(VIEWS))
    man = res["manifest"]
    head = res["predictor"].model.head
    for c in man["classes"]:
        maps = c["views"]["prototype_maps"]["prototypes"]
        assert sorted(m["prototype"] for m in maps) == sorted(
            torch.nonzero(head.prototype_class == c["index"]).flatten().tolist()
        )
        assert {m["scale"] for m in maps} == {0, 1}  # two scales in the tiny config
        groups = c["views"]["group_maps"]["groups"]
        assert [g["group"] for g in groups] == torch.nonzero(head.group_class == c["index"]).flatten().tolist()
        assert c["views"]["nearest_patches"]["prototypes"]
        for p in c["views"]["nearest_patches"]["prototypes"]:
            assert len(p["patches"]) == 3 and [e["rank"] for e in p["patches"]] == [1, 2, 3]
    assert not man["notes"], man["notes"]  # prototype patches and nearest patches were found


def test_protoseg_writes_its_views(explained):
    res = explained["protoseg"]
    _check_views(res, set(VIEWS) - {"group_maps"})
    head = res["predictor"].model.head
    for c in res["manifest"]["classes"]:
        edges = c["views"]["group_graph"]["edges"]
        assert set(edges) == {"prototype_class"}
        h = head.h_proto.detach()
        want = {
            (p, round(float(h[c["index"], p]), 6))
            for p in torch.nonzero(head.prototype_class == c["index"]).flatten().tolist()
            if float(h[c["index"], p]) != 0
        }
        assert {(e["prototype"], round(e["weight"], 6)) for e in edges["prototype_class"]} == want


def test_group_graph_uses_only_nonzero_group_weights(explained):
    res = explained["scaleprotoseg"]
    head = res["predictor"].model.head
    grouping = head.grouping
    weight = grouping.weight.detach()
    N = grouping.groups_per_class
    assert (weight == 0).any(), "the threshold stage should have zeroed some weights"
    for c in res["manifest"]["classes"]:
        k = c["index"]
        want = set()
        for n in range(N):
            for slot in range(weight.shape[2]):
                w = float(weight[k, n, slot])
                if bool(grouping.member_mask[k, slot]) and w != 0:
                    want.add((int(grouping.member_index[k, slot]), k * N + n, round(w, 6)))
        edges = c["views"]["group_graph"]["edges"]
        got = {(e["prototype"], e["group"], round(e["weight"], 6)) for e in edges["prototype_group"]}
        assert got == want
        assert all(e["weight"] != 0 for e in edges["prototype_group"])
        h = head.h_group.detach()
        assert {(e["group"], round(e["weight"], 6)) for e in edges["group_class"]} == {
            (k * N + n, round(float(h[k, k * N + n]), 6)) for n in range(N) if float(h[k, k * N + n]) != 0
        }
        nodes = {p["prototype"] for p in c["views"]["group_graph"]["nodes"]["prototypes"]}
        assert nodes == {p for p, _, _ in want}


def test_default_cells_lie_in_the_class_region_and_get_top3(explained):
    res = explained["scaleprotoseg"]
    predictor, image = res["predictor"], res["image"]
    acts = predictor.maps(image).activations[0]
    from scaleprotoseg.ops import resize_labels

    pred_grid = resize_labels(torch.from_numpy(predictor.predict(image)), tuple(acts.shape[-2:])).numpy()
    for c in res["manifest"]["classes"]:
        cells = c["views"]["nearest_prototypes"]["cells"]
        assert 1 <= len(cells) <= 3
        for e in cells:
            r, col = e["cell"]
            if (pred_grid == c["index"]).any():
                assert pred_grid[r, col] == c["index"]
            order = torch.argsort(acts[:, r, col], descending=True, stable=True)[:3].tolist()
            assert e["prototypes"] == order


def test_nearest_prototypes_of_given_cells_are_top3(explained, tmp_path):
    res = explained["scaleprotoseg"]
    predictor, image = res["predictor"], res["image"]
    cls = res["manifest"]["classes"][0]["name"]
    man = explain_image(
        predictor, image, tmp_path, run_dir=res["run"], classes=cls, patches="0,0;2,3;4,1", views=["nearest_prototypes"]
    )
    assert [c["name"] for c in man["classes"]] == [cls]
    others = {k: v for k, v in man["classes"][0]["views"].items() if k != "nearest_prototypes"}
    assert others and all(not v["available"] and v["reason"] == "not requested" for v in others.values())
    view = man["classes"][0]["views"]["nearest_prototypes"]
    acts = predictor.maps(image).activations[0]
    assert [e["cell"] for e in view["cells"]] == [[0, 0], [2, 3], [4, 1]]
    for e in view["cells"]:
        a = acts[:, e["cell"][0], e["cell"][1]]
        top = torch.topk(a, 3).indices.tolist()
        assert e["prototypes"] == top
        np.testing.assert_allclose(e["activations"], a[top].numpy(), rtol=1e-6)
        assert e["activations"] == sorted(e["activations"], reverse=True)
    assert len(view["files"]) == 3 and all((tmp_path / f).stat().st_size > 0 for f in view["files"])
    assert man["failure"] is None  # no label, no failure view
    with pytest.raises(ValueError, match="outside the feature grid"):
        explain_image(predictor, image, tmp_path / "bad", classes=cls, patches="99,0")
    with pytest.raises(ValueError, match="not known"):
        explain_image(predictor, image, tmp_path / "bad", views=["heatmap"])


def test_failure_view_for_badly_predicted_classes(explained):
    for method, res in explained.items():
        fail = res["manifest"]["failure"]
        assert fail is not None and fail["threshold"] == 0.2
        cases = {c["class"]: c for c in fail["cases"]}
        assert set(cases) == res["failing"], method
        for case in cases.values():
            assert case["iou"] == 0.0
            assert case["taken_by"] and case["taken_by"][0]["fraction"] == 1.0
            assert case["confusing_class"] == case["taken_by"][0]["class"]
            files = case["files"]
            expected = {"overview", "prototypes_true", "prototypes_confusing"}
            if method == "scaleprotoseg":
                expected |= {"groups_true", "groups_confusing"}
            assert set(files) == expected, method
            for f in files.values():
                assert _nonempty(res["out"] / f), f
            rows = case["details"]["true"]["rows"]
            if method == "scaleprotoseg":
                assert len(rows) == res["predictor"].model.head.groups_per_class
                for row in rows:
                    assert all(p["weight"] > 0 for p in row["prototypes"])


def test_pick_cells_and_top_prototypes_are_deterministic():
    grid = np.zeros((4, 5), np.int64)
    grid[1:3, 1:4] = 2
    cells = pick_cells(grid, 2, 3)
    assert cells == [(1, 2), (2, 1), (2, 3)]
    assert all(grid[r, c] == 2 for r, c in cells)
    score = np.zeros((4, 5))
    score[3, 4] = 1
    assert pick_cells(grid, 1, 3, score=score) == [(3, 4)]
    acts = torch.tensor([[[1.0]], [[3.0]], [[3.0]], [[2.0]]])
    assert top_prototypes_at(acts, (0, 0), 3) == [(1, 3.0), (2, 3.0), (3, 2.0)]


def test_argument_parsing():
    assert parse_cells("1,2; 3,4") == [(1, 2), (3, 4)]
    with pytest.raises(ValueError, match="row,col"):
        parse_cells("1;2")
    names = ["background", "square", "disc"]
    assert resolve_classes("disc,0", names) == [0, 2]
    with pytest.raises(ValueError, match="unknown class"):
        resolve_classes("cow", names)


def test_nearest_patches_exported_at_the_end_of_training(explain_runs):
    for method in ("scaleprotoseg", "protoseg"):
        d = explain_runs[method] / "final" / "nearest"
        man = json.loads((d / "manifest.json").read_text())
        assert man["k"] == 3 and man["prototypes"]
        for e in man["prototypes"]:
            dists = [p["distance"] for p in e["patches"]]
            assert dists == sorted(dists) and len(dists) == 3
            assert len({p["name"] for p in e["patches"]}) == 3  # one patch per image
            for p in e["patches"]:
                assert _nonempty(d / p["patch"]) and _nonempty(d / p["overlay"])
        if method == "scaleprotoseg":
            from scaleprotoseg.predict import Predictor

            head = Predictor.from_run(explain_runs[method]).model.head
            assert [e["prototype"] for e in man["prototypes"]] == head.grouping.used_prototypes().tolist()


def test_cli_explain(explain_runs, tmp_path):
    from scaleprotoseg.cli import main

    root = explain_runs["root"]
    out = tmp_path / "cli"
    rc = main(
        [
            "explain",
            str(explain_runs["protoseg"]),
            "--input",
            str(root / "images" / "img07.png"),
            "--output",
            str(out),
            "--label",
            str(root / "masks" / "img07.png"),
            "--classes",
            "0",
            "--patches",
            "1,1",
            "--views",
            "group_graph,nearest_prototypes",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert [c["index"] for c in man["classes"]] == [0]
    assert [k for k, v in man["classes"][0]["views"].items() if v["available"]] == ["group_graph", "nearest_prototypes"]
    assert man["failure"] is not None
    assert (
        main(["explain", str(explain_runs["protoseg"]), "--input", str(root / "nope.png"), "--output", str(out)]) == 1
    )


def test_deeplabv2_gets_the_prediction_only(tmp_path, swap_label):
    from scaleprotoseg.checkpoint import CheckpointMeta
    from scaleprotoseg.config import load_config
    from scaleprotoseg.models.segmenter import build_model
    from scaleprotoseg.predict import Predictor

    cfg = load_config(None, ["model.method=deeplabv2", "model.backbone=resnet18", "model.aspp_rates=[1, 2]"])
    model = build_model(cfg.model, 3).eval()
    info = CheckpointMeta(
        "deeplabv2",
        "train",
        ["a", "b", "c"],
        np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8),
        255,
        "imagenet",
        8,
        {"method": "deeplabv2"},
    )
    predictor = Predictor(model, cfg, info, torch.device("cpu"))
    image = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)
    pred = predictor.predict(image)
    label, failing = swap_label(pred, 3)
    man = explain_image(predictor, image, tmp_path, label=label)
    assert man["classes"] == [] and "no prototypes" in man["notes"][0]
    assert all(_nonempty(tmp_path / f) for f in man["files"].values())
    cases = man["failure"]["cases"]
    assert {c["class"] for c in cases} == failing
    assert all(set(c["files"]) == {"overview"} and _nonempty(tmp_path / c["files"]["overview"]) for c in cases)
