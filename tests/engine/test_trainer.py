"""Every stage of the three methods on a tiny synthetic set; resume; divergence handling."""

import json

import pytest
import torch
from safetensors.torch import load_file

from scaleprotoseg.engine.trainer import StopRequested, Trainer, TrainingDiverged
from scaleprotoseg.rundir import RunDir


def weights(run, stage):
    return load_file(str(run / "checkpoints" / stage / "model.safetensors"))


def changed(a, b, prefix):
    keys = [k for k in a if k.startswith(prefix) and k in b and a[k].shape == b[k].shape and a[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_scaleprotoseg_all_stages(synthetic_folder, tmp_path, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config(synthetic_folder, "scaleprotoseg")
    results = Trainer(cfg, run, device="cpu", progress=False).run_stages()
    assert [r.name for r in results] == ["warmup", "joint", "projection", "group_warmup", "group_joint", "threshold"]
    w = {r.name: weights(run, r.name) for r in results}
    # warm-up: ASPP and prototypes train; backbone and h_proto do not
    init = Trainer(cfg, tmp_path / "fresh", device="cpu", progress=False).model.state_dict()
    assert changed(init, w["warmup"], "head.aspp") and changed(init, w["warmup"], "head.prototypes.prototypes")
    assert not changed(init, w["warmup"], "backbone.")
    assert torch.equal(init["head.h_proto"], w["warmup"]["head.h_proto"])
    # joint: the backbone trains too (but frozen batch norm statistics do not move), h_proto stays
    assert changed(w["warmup"], w["joint"], "backbone.layer")
    bn = [k for k in w["joint"] if "bn" in k and "running_mean" in k]
    assert bn and all(torch.equal(w["warmup"][k], w["joint"][k]) for k in bn)
    assert torch.equal(w["warmup"]["head.h_proto"], w["joint"]["head.h_proto"])
    # group warm-up: only the group weights; group joint: group weights and h_group
    gw, gj = w["group_warmup"], w["group_joint"]
    new_keys = {k for k in gw if k.startswith(("head.grouping.", "head.h_group"))}
    assert new_keys == set(gw) - set(w["projection"])
    for k in set(gw) - new_keys:
        assert torch.equal(gw[k], w["projection"][k]), k
    assert gw["head.h_group"].unique().tolist() == [-0.5, 1.0]  # h_group is frozen during the group warm-up
    assert not changed(gw, gj, "backbone.") and not changed(gw, gj, "head.aspp")
    assert changed(gw, gj, "head.h_group") and changed(gw, gj, "head.grouping.weight")
    for stage in ("group_warmup", "group_joint", "threshold"):
        g = w[stage]["head.grouping.weight"]
        mask = w[stage]["head.grouping.member_mask"].unsqueeze(1).expand_as(g)
        assert (g >= 0).all() and (g[~mask] == 0).all()
        if stage != "threshold":
            assert torch.allclose(g.sum(-1), torch.ones(g.shape[:2]), atol=1e-5)
    assert ((w["threshold"]["head.grouping.weight"] == 0) | (w["threshold"]["head.grouping.weight"] >= 0.05)).all()
    # the run directory
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["structure"]["grouped"] and meta["class_names"] == ["background", "square", "disc"]
    assert (run / "final" / "projection.json").is_file() and (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "validation" for r in records)
    # every stage that trains the groups records how far it moved them (what the report's Groups table shows)
    ends = {r["stage"]: r for r in records if r.get("event") == "stage_end"}
    assert [n for n, r in ends.items() if "groups" in r] == ["group_warmup", "group_joint"]
    gw_rec, gj_rec = ends["group_warmup"]["groups"], ends["group_joint"]["groups"]
    assert gw_rec["h_group_change_max"] == 0.0 and gj_rec["h_group_change_max"] > 0  # h_group frozen, then trained
    mask = gj["head.grouping.member_mask"].unsqueeze(1).expand_as(gj["head.grouping.weight"])
    diff = (gj["head.grouping.weight"] - gw["head.grouping.weight"])[mask].abs()
    assert gj_rec["weight_change_max"] == pytest.approx(float(diff.max()), abs=1e-7)
    assert gj_rec["weight_change_mean"] == pytest.approx(float(diff.mean()), abs=1e-7)
    assert gj_rec["weight_change_frobenius"] == pytest.approx(float(diff.norm()), abs=1e-6)
    dh = (gj["head.h_group"] - gw["head.h_group"]).abs().max()
    assert gj_rec["h_group_change_max"] == pytest.approx(float(dh), abs=1e-7)
    assert gj_rec["entropy_before"] == pytest.approx(gw_rec["entropy_after"], abs=1e-7)
    assert 0 < gw_rec["weight_change_max"] and 0 < gw_rec["entropy_before"] <= 1
    assert json.loads((run / "state.json").read_text())["completed"][-1] == "threshold"


def test_protoseg_all_stages(synthetic_folder, tmp_path, tiny_config):
    run = tmp_path / "run"
    # every prototype fails the pruning test, so each class keeps only its best one
    cfg = tiny_config(synthetic_folder, "protoseg", **{"train.stages.pruning.prune_threshold": 7})
    results = Trainer(cfg, run, device="cpu", progress=False).run_stages()
    assert [r.name for r in results] == ["warmup", "joint", "projection", "pruning", "finetune"]
    pr, ft = weights(run, "pruning"), weights(run, "finetune")
    assert changed(pr, ft, "head.h_proto")
    for k in pr:
        if k != "head.h_proto":
            assert torch.equal(pr[k], ft[k]), k
    assert "head.grouping.weight" not in ft
    # the projection is stored with every checkpoint whose prototypes it describes, never at the run root
    rd = RunDir(run)
    assert not rd.legacy_projection.exists() and not rd.checkpoint("joint").projection.exists()
    projected = json.loads(rd.checkpoint("projection").projection.read_text())
    pruned = json.loads(rd.checkpoint("pruning").projection.read_text())
    assert pruned["num_prototypes"] == 3 < projected["num_prototypes"]
    assert json.loads(rd.checkpoint("finetune").projection.read_text()) == pruned
    # re-running pruning starts again from the projection stage's numbering (it used to select from its own output)
    Trainer(cfg, run, device="cpu", progress=False).run_stages(only=["pruning"])
    assert json.loads(rd.checkpoint("pruning").projection.read_text()) == pruned
    assert json.loads(rd.checkpoint().projection.read_text()) == pruned


def test_deeplabv2_single_stage(synthetic_folder, tmp_path, tiny_config):
    run = tmp_path / "run"
    results = Trainer(tiny_config(synthetic_folder, "deeplabv2"), run, device="cpu", progress=False).run_stages()
    assert [r.name for r in results] == ["train"]
    assert "val_miou" in results[0].metrics
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("fusion", ["features", "logits"])
def test_multiscale_inputs_train_and_validate(synthetic_folder, tmp_path, tiny_config, fusion):
    """Multi-scale inputs (Pascal VOC, COCO-Stuff) through the trainer: the warm-up trains on the averaged losses of
    every scale's and the fused output, validation fuses the same way."""
    extra = {
        "data.msc_scales": "[0.5, 1.0]",
        "data.msc_fusion": fusion,
        **{f"train.stages.{s}.enabled": "false" for s in ("joint", "projection", "group_warmup", "group_joint")},
        "train.stages.threshold.enabled": "false",
    }
    cfg = tiny_config(synthetic_folder, "scaleprotoseg", **extra)
    results = Trainer(cfg, tmp_path / "run", device="cpu", progress=False).run_stages()
    assert [r.name for r in results] == ["warmup"]
    loss = results[0].metrics["loss"]
    assert loss["ce"] > 0 and loss["diversity"] > 0 and 0 <= results[0].metrics["val_miou"] <= 1


def test_resume_mid_stage_gives_identical_weights(synthetic_folder, tmp_path, tiny_config):
    extra = {"train.stages.joint.steps": 4, "train.stages.group_joint.steps": 3}
    full = tmp_path / "full"
    Trainer(tiny_config(synthetic_folder, "scaleprotoseg", **extra), full, device="cpu", progress=False).run_stages()
    part = tmp_path / "part"
    cfg = tiny_config(synthetic_folder, "scaleprotoseg", **extra)
    with pytest.raises(StopRequested):
        Trainer(cfg, part, device="cpu", progress=False, stop_at=("joint", 2)).run_stages()
    assert (part / "checkpoints" / "joint" / "partial" / "train_state.pt").is_file()
    state = torch.load(part / "checkpoints" / "joint" / "partial" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    with pytest.raises(StopRequested):  # stop again, inside stage 2
        Trainer(cfg, part, device="cpu", progress=False, stop_at=("group_joint", 1)).run_stages()
    Trainer(cfg, part, device="cpu", progress=False).run_stages()
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the group changes of the resumed stage are measured from its start, kept in the partial checkpoint
    ends = [
        {
            r["stage"]: r
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("event") == "stage_end"
        }
        for run in (full, part)
    ]
    assert ends[1]["group_joint"]["groups"] == ends[0]["group_joint"]["groups"]


def test_nan_loss_stops_with_stage_and_step_and_keeps_checkpoint(synthetic_folder, tmp_path, tiny_config, monkeypatch):
    import scaleprotoseg.engine.loop as trainer_mod

    run = tmp_path / "run"
    cfg = tiny_config(synthetic_folder, "deeplabv2", **{"train.stages.train.steps": 5, "train.checkpoint_every": 2})
    real = trainer_mod.compute_losses
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 4:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "compute_losses", poisoned)
    with pytest.raises(TrainingDiverged, match=r"stage 'train', step 3.*partial"):
        Trainer(cfg, run, device="cpu", progress=False).run_stages()
    state = torch.load(run / "checkpoints" / "train" / "partial" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    w = load_file(str(run / "checkpoints" / "train" / "partial" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_missing_file_fails_at_start_naming_it(synthetic_folder, tmp_path, tiny_config):
    (synthetic_folder / "images" / "img03.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img03"):
        Trainer(tiny_config(synthetic_folder, "deeplabv2"), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_group_change_hand_computed():
    """Class 0 has two prototypes, class 1 one (so its second column is padding); one group per class."""
    import math
    from types import SimpleNamespace

    from scaleprotoseg.engine.group_stats import group_change, group_snapshot
    from scaleprotoseg.models.grouping import GroupingLayer

    grouping = GroupingLayer(torch.tensor([0, 0, 1]), 2, 1)
    head = SimpleNamespace(grouping=grouping, h_group=torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    with torch.no_grad():
        grouping.weight.copy_(torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]]))
    start = group_snapshot(head)
    with torch.no_grad():
        grouping.weight.copy_(torch.tensor([[[0.8, 0.2]], [[1.0, 7.0]]]))  # 7: padding, must not count
    head.h_group = head.h_group + torch.tensor([[0.0, 0.25], [-0.1, 0.0]])
    got = group_change(start, head)
    # |dw| over the members: 0.3, 0.3, 0
    assert got["weight_change_max"] == pytest.approx(0.3)
    assert got["weight_change_mean"] == pytest.approx(0.2)
    assert got["weight_change_frobenius"] == pytest.approx(math.sqrt(0.18))
    assert got["h_group_change_max"] == pytest.approx(0.25)

    def ent(row, size):  # Eq. 8 per row, eps 1e-5 in the log, normalised by log |P_c| (1 for a single prototype)
        return -sum(w * math.log(w + 1e-5) for w in row) / (math.log(size) if size > 1 else 1.0)

    assert got["entropy_before"] == pytest.approx((ent([0.5, 0.5], 2) + ent([1.0], 1)) / 2, rel=1e-6)
    assert got["entropy_after"] == pytest.approx((ent([0.8, 0.2], 2) + ent([1.0], 1)) / 2, rel=1e-6)
    assert got["entropy_before"] == pytest.approx(0.5, abs=1e-4)  # a uniform row scores ~1, a one-hot row ~0
