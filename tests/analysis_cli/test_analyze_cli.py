"""``scaleprotoseg analyze RUN all`` end to end on tiny trained runs (fixture ``tiny_runs`` in conftest.py)."""

import csv
import json

import numpy as np
import pytest
import torch

from scaleprotoseg.analysis.results import jsonable
from scaleprotoseg.analysis.runner import METRICS
from scaleprotoseg.checkpoint import load_model
from scaleprotoseg.cli import main


def _json(path):
    def no_nan(value):
        raise AssertionError(f"{path}: {value} is not plain JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _analyze(run, parts, *extra):
    argv = [
        "analyze",
        str(run),
        "all",
        "--device",
        "cpu",
        "--no-progress",
        "--parts-dataset",
        "folder_parts",
        "--parts-root",
        str(parts),
        *extra,
    ]
    return main(argv)


def _stage_end(run, stage):
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == stage and rec.get("event") == "stage_end":
            return rec
    raise AssertionError(f"no stage_end for {stage}")


def _direct_sparsity(W, dense=None):
    active = np.abs(W) >= 0.005
    if dense is None:
        return active.sum(1)
    return ((active.astype(int) @ (dense > 0).astype(int)) > 0).sum(1)


def test_analyze_all_scaleprotoseg(tiny_runs, capsys):
    run, parts = tiny_runs["scaleprotoseg"], tiny_runs["parts"]
    assert _analyze(run, parts, "--noise-std", "0") == 0
    printed = capsys.readouterr().out
    out = run / "analysis"
    for metric in METRICS:
        for ext in ("json", "csv", "png"):
            assert (out / f"{metric}.{ext}").is_file(), f"{metric}.{ext}"
    assert "skipped" not in printed and "Consistency of prototypes" in printed

    # prototypes (Tables 2, 7): counts from the checkpoints, mIoU as validated during training
    proto = _json(out / "prototypes.json")
    steps = {(s["step"], s["alpha"]): s for s in proto["steps"]}
    meta = json.loads((run / "checkpoints" / "projection" / "meta.json").read_text())
    assert steps[("initial", None)]["prototypes"] == _stage_end(run, "projection")["prototypes_before"]
    assert steps[("project", None)]["prototypes"] == len(meta["structure"]["prototype_class"])
    assert steps[("project", None)]["miou"] == pytest.approx(100 * _stage_end(run, "projection")["val_miou"])
    model = load_model(run, "group_joint").model
    counts = []
    for alpha in (0.0, 0.05, 0.1):
        grouping = load_model(run, "group_joint").model.head.grouping
        grouping.threshold_(alpha)
        w = grouping.weight.detach()
        kept = (w > 0) & grouping.member_mask.unsqueeze(1)
        step = steps[("grouped", alpha)]
        assert step["prototypes"] == grouping.used_prototypes().numel()
        assert step["group_avg"] == pytest.approx(kept.sum(-1).float().mean().item())
        counts.append(step["prototypes"])
    assert counts[0] >= counts[1] >= counts[2]
    assert counts[0] == int(model.head.grouping.used_prototypes().numel())
    assert steps[("grouped", 0.0)]["miou"] == pytest.approx(100 * _stage_end(run, "group_joint")["val_miou"])
    assert len(_csv(out / "prototypes.csv")) == 5

    # sparsity (Tables 3-4, 10): a direct computation on the final head
    final = load_model(run).model
    head = final.head
    W = head.h_group.detach().numpy()
    dense = head.grouping.dense_weight(head.num_prototypes).numpy()
    sp = _json(out / "sparsity.json")
    direct = _direct_sparsity(W, dense)
    assert sp["sparsity"] == pytest.approx(direct.mean())
    assert list(sp["active_prototypes"].values()) == direct.tolist()
    assert sp["avg_abs_weight"] == pytest.approx(np.abs(W).mean())
    used = head.grouping.used_prototypes().numel()
    D, C, G = head.prototypes.dim, W.shape[0], W.shape[1]
    n_group = head.groups_per_class * int(head.grouping.member_mask.sum())
    assert sp["extra_parameters"] == used * D + n_group + C * G - D * C
    assert sp["last_layer"] == "h_group"

    # consistency / stability: only prototypes used by the groups are scored; no noise -> fully stable
    cons, stab = _json(out / "consistency.json"), _json(out / "stability.json")
    used_mask = np.zeros(head.num_prototypes, bool)
    used_mask[head.grouping.used_prototypes().numpy()] = True
    assert not np.any(np.asarray(cons["evaluated"]) & ~used_mask)
    assert cons["num_evaluated"] > 0 and 0 <= cons["score"] <= 100
    assert cons["meta"]["num_images"] == 2 and set(cons["scores"]) == {"70", "80", "90"}
    assert stab["score"] == 100.0 and stab["num_pairs"] > 0 and stab["noise_std"] == 0.0
    assert [r["percentile"] for r in _csv(out / "stability.csv")] == ["70.0", "80.0", "90.0", "mean"]

    # components: every (image, prototype) map of each scale counted once per quantile
    comp = _json(out / "components.json")
    scales = head.prototype_scale.numpy()
    assert comp["num_maps"] == [2 * int((scales == s).sum()) for s in comp["scales"]]
    assert all(c is None or c >= 1 for row in comp["mean_count"] for c in row)

    # group overlap and equivariance
    ov = _json(out / "group-overlap.json")
    assert ov["miou"] is None or 0 <= ov["miou"] <= 100
    assert _csv(out / "group-overlap.csv")[-1]["class"] == "mean"
    eq = _json(out / "equivariance.json")
    assert eq["meta"]["split"] == "train" and eq["scale_ratios"] == [1.0, 2.0] and eq["num_groups"] == G
    for res in eq["results"].values():
        assert all(0 <= res[k] <= 1 for k in ("ratio_groups", "ratio_prototypes", "ratio_classes"))
    assert len(eq["candidate_pairs"]) == res["num_candidate_pairs"] > 0
    assert (out / "equivariance-pairs.png").is_file()  # Figures 8-10


def test_analyze_all_protoseg(tiny_runs, capsys):
    run, parts = tiny_runs["protoseg"], tiny_runs["parts"]
    assert _analyze(run, parts) == 0
    printed = capsys.readouterr().out
    out = run / "analysis"
    for metric in ("sparsity", "prototypes", "consistency", "stability", "components"):
        for ext in ("json", "csv", "png"):
            assert (out / f"{metric}.{ext}").is_file(), f"{metric}.{ext}"
    for metric in ("group-overlap", "equivariance"):
        assert not (out / f"{metric}.json").exists()
        assert f"{metric}: skipped (protoseg run)" in printed

    proto = {s["step"]: s for s in _json(out / "prototypes.json")["steps"]}
    for step, stage in (("project", "projection"), ("pruned", "pruning")):
        meta = json.loads((run / "checkpoints" / stage / "meta.json").read_text())
        assert proto[step]["prototypes"] == len(meta["structure"]["prototype_class"])
        assert proto[step]["miou"] == pytest.approx(100 * _stage_end(run, stage)["val_miou"])
    assert proto["project"]["prototypes"] >= proto["pruned"]["prototypes"] == proto["finetuned"]["prototypes"]

    head = load_model(run).model.head
    W = head.h_proto.detach().numpy()
    sp = _json(out / "sparsity.json")
    assert sp["last_layer"] == "h_proto" and sp["sparsity"] == pytest.approx(_direct_sparsity(W).mean())
    P, D, C = head.num_prototypes, head.prototypes.dim, W.shape[0]
    assert sp["extra_parameters"] == P * D + C * P - D * C
    cons = _json(out / "consistency.json")
    assert cons["meta"]["prototypes_scored"] == P and 0 <= cons["score"] <= 100
    stab = _json(out / "stability.json")
    assert 0 <= stab["score"] <= 100 and stab["noise_std"] == 0.2
    comp = _json(out / "components.json")
    assert comp["scales"] == [0] and comp["num_maps"] == [2 * P]


def test_analyze_options_and_errors(tiny_runs, tmp_path, capsys):
    run, parts = tiny_runs["scaleprotoseg"], tiny_runs["parts"]
    # part metrics asked for explicitly without part annotations: a clear error, not a crash
    assert main(["analyze", str(run), "consistency", "--device", "cpu", "--out", str(tmp_path / "a")]) == 1
    assert "--parts-dataset" in capsys.readouterr().err
    # --stage, --max-images, --count-background, --out
    argv = [
        "analyze",
        str(run),
        "consistency",
        "components",
        "--device",
        "cpu",
        "--no-progress",
        "--stage",
        "projection",
        "--max-images",
        "1",
        "--count-background",
        "--parts-dataset",
        "folder_parts",
        "--parts-root",
        str(parts),
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 0
    cons = _json(tmp_path / "b" / "consistency.json")
    assert cons["meta"]["stage"] == "projection" and cons["meta"]["num_images"] == 1
    assert cons["meta"]["count_background"] is True
    assert cons["meta"]["prototypes_scored"] == cons["meta"]["num_prototypes"]  # no groups before stage 2
    assert _json(tmp_path / "b" / "components.json")["meta"]["num_images"] == 1


def test_jsonable():
    data = {70.0: np.float32(0.5), 0.05: np.array([1.0, np.nan]), 3: (np.int64(2), torch.tensor([True]))}
    assert jsonable(data) == {"70": 0.5, "0.05": [1.0, None], "3": [2, [True]]}
    json.dumps(jsonable({"x": float("inf")}), allow_nan=False)
