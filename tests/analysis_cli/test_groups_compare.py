"""``scaleprotoseg analyze compare RUN_A RUN_B`` (Figure 6): each run's own group activations on run A's images."""

import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scaleprotoseg.analysis.context import AnalysisContext, AnalysisOptions
from scaleprotoseg.analysis.groups_compare import GroupsCompareAnalysis, entropy_weight, shown_class
from scaleprotoseg.checkpoint import CheckpointMeta, load_model, write_checkpoint
from scaleprotoseg.cli import main
from scaleprotoseg.config import load_config, save_config
from scaleprotoseg.data.registry import build_dataset
from scaleprotoseg.rundir import RunDir

CPU = torch.device("cpu")


def _tiny_grouped_run(
    root, tiny_model, class_names=("background", "square", "disc"), entropy=0.0, normalization="imagenet"
):
    """A final-only grouped U-Net run (untrained, seed 1) whose config has ``loss.entropy`` = ``entropy``."""
    model, cfg = tiny_model("scaleprotoseg", grouped=True, seed=1)
    cfg.loss.entropy = entropy
    cfg.data.normalization = normalization
    info = SimpleNamespace(class_names=list(class_names), palette=np.zeros((3, 3), np.uint8), ignore_index=255)
    run = RunDir(root)
    root.mkdir(parents=True)
    save_config(cfg, run.config)
    meta = CheckpointMeta.of_model(model, stage="final", step=0, info=info, normalization=normalization)
    write_checkpoint(run.final, model, meta, config=cfg)
    return root


def _open(run):
    return AnalysisContext.open(run, CPU, AnalysisOptions(progress=False))


def test_shown_class():
    pred = np.array([[0, 0, 0], [1, 2, 2]])
    assert shown_class(pred, ["background", "square", "disc"]) == 2  # background passed over
    assert shown_class(pred, ["road", "square", "disc"]) == 0  # a real class with most cells
    assert shown_class(np.zeros((2, 2), np.int64), ["background", "square", "disc"]) == 0  # nothing else predicted


def test_entropy_weight():
    assert entropy_weight(load_config(None, ["model.method=scaleprotoseg"]), "scaleprotoseg") == 0.05
    assert entropy_weight(load_config(None, ["loss.entropy=0.25"]), "scaleprotoseg") == 0.25
    assert entropy_weight(load_config(None, ["loss.entropy=0"]), "scaleprotoseg") == 0.0
    # the weight is set but no enabled stage uses the entropy loss: trained without it
    off = ["loss.entropy=0.25", "train.stages.group_joint.enabled=false", "train.stages.group_warmup.losses=[ce]"]
    assert entropy_weight(load_config(None, off), "scaleprotoseg") == 0.0


def test_panels_come_from_each_run(trained_runs, tiny_model, tmp_path):
    run_a = trained_runs["scaleprotoseg"]
    run_b = _tiny_grouped_run(tmp_path / "b", tiny_model, normalization="tf")  # B reads its own inputs
    a, b = _open(run_a), _open(run_b)
    panels = GroupsCompareAnalysis(b, num_images=2).panels(a)
    assert [p["index"] for p in panels] == [0, 1]
    dataset = a.dataset("val")
    data_tf = copy.deepcopy(a.cfg.data)
    data_tf.normalization = "tf"
    dataset_tf = build_dataset(data_tf, "val", train=False)
    model_a, model_b = load_model(run_a).model, load_model(run_b).model
    for p in panels:
        x, x_tf = dataset[p["index"]]["image"].unsqueeze(0), dataset_tf[p["index"]]["image"].unsqueeze(0)
        assert not torch.allclose(x, x_tf)
        with torch.no_grad():
            out_a, out_b = model_a(x), model_b(x_tf)
        counts = np.bincount(out_a.logits[0].argmax(0).numpy().ravel(), minlength=3)
        expected = 0 if counts[1:].sum() == 0 else 1 + int(np.argmax(counts[1:]))
        assert p["class"] == expected and p["name"] == dataset.load_raw(p["index"])[2]
        for side, model, out in (("a", model_a, out_a), ("b", model_b, out_b)):
            groups = np.nonzero(model.head.group_class.numpy() == expected)[0]
            np.testing.assert_array_equal(p[side]["groups"], groups)
            np.testing.assert_allclose(p[side]["maps"], out.group_activations[0, groups].numpy(), rtol=1e-5)
        assert p["a"]["maps"].shape[1:] != p["b"]["maps"].shape[1:] or not np.allclose(p["a"]["maps"], p["b"]["maps"])


def test_compare_command_writes_figure_into_run_a(trained_runs, tiny_model, tmp_path, capsys):
    run_a = tmp_path / "a"
    shutil.copytree(trained_runs["scaleprotoseg"], run_a)
    run_b = _tiny_grouped_run(tmp_path / "b", tiny_model, entropy=0.0)
    argv = ["analyze", "compare", str(run_a), str(run_b), "--device", "cpu", "--no-progress", "--max-images", "1"]
    out = RunDir(run_a).analysis
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()  # other tests may have analysed the run
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} - before == {f"groups-compare.{ext}" for ext in ("json", "csv", "png")}
    data = json.loads((out / "groups-compare.json").read_text())
    assert data["runs"]["a"]["entropy"] == 0.05 and data["runs"]["b"]["entropy"] == 0.0
    assert data["meta"]["num_images"] == 1 and data["meta"]["other"] == str(run_b)
    (image,) = data["images"]
    a, b = _open(run_a), _open(run_b)
    shown = a.class_names.index(image["class"])
    assert image["groups_a"] == np.nonzero(a.head.group_class.numpy() == shown)[0].tolist()
    assert len(image["groups_b"]) == b.head.groups_per_class == 2
    # the caption names both runs and their entropy weights
    analysis = GroupsCompareAnalysis(b, num_images=1)
    title = analysis.figures(analysis.compute(a))[""]._suptitle.get_text()
    assert "A = a (loss.entropy=0.05)" in title and "B = b (loss.entropy=0)" in title


def test_compare_errors(trained_runs, tiny_model, tmp_path, capsys):
    run_a = trained_runs["scaleprotoseg"]
    common = ["--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]
    # a run without groups
    assert main(["analyze", "compare", str(run_a), str(trained_runs["protoseg"]), *common]) == 1
    err = capsys.readouterr().err.strip()
    assert "has no groups" in err and "protoseg" in err and len(err.splitlines()) == 1
    # runs of other classes
    other = _tiny_grouped_run(tmp_path / "other", tiny_model, class_names=("background", "square", "ring"))
    assert main(["analyze", "compare", str(run_a), str(other), *common]) == 1
    err = capsys.readouterr().err.strip()
    assert "different classes" in err and "ring" in err and len(err.splitlines()) == 1
    # one run only
    assert main(["analyze", "compare", str(run_a), *common]) == 1
    assert "expected two" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="at least 1"):
        GroupsCompareAnalysis(_open(run_a), num_images=0)
