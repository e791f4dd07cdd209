"""``scaleprotoseg evaluate``: baselines.json next to summary.json (and the trainer's own in the run root)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaleprotoseg import cli
from scaleprotoseg.data.folder import FolderDataset


def _majority_share(root: Path) -> float:
    """Share of the valid val pixels that have the most frequent training class (counted by hand): the IoU of
    predicting that class everywhere, TP / (GT + all pixels - TP) = TP / all pixels."""
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    train_labels = np.concatenate([train.load_raw(i)[1].ravel() for i in range(len(train))])
    counts = np.bincount(train_labels[train_labels != 255], minlength=3)
    labels = np.concatenate([val.load_raw(i)[1].ravel() for i in range(len(val))])
    labels = labels[labels != 255]
    return float((labels == int(np.argmax(counts))).sum() / labels.size)


def test_trainer_writes_baselines(trained_runs) -> None:
    data = json.loads((trained_runs["scaleprotoseg"] / "baselines.json").read_text())
    assert set(data) >= {"split", "stage", "model_miou", "stage_mious", "baselines"}
    assert data["split"] == "val" and data["stage"] == "threshold"
    assert set(data["stage_mious"]) == {"warmup", "joint", "group_warmup", "group_joint"}  # train stages only
    majority = data["baselines"]["majority class"]
    assert set(majority) == {"miou", "iou", "description"} and len(majority["iou"]) == 3
    # the two other classes are in the val labels but never predicted: IoU 0 each, so mIoU = IoU(majority) / 3
    assert majority["miou"] == pytest.approx(_majority_share(trained_runs["root"]) / 3)


def test_evaluate_writes_baselines(trained_runs, tmp_path: Path, capsys) -> None:
    run = trained_runs["protoseg"]
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(run), "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "majority class" in printed and printed.index("mIoU") < printed.index("| majority class")
    summary = json.loads((out / "summary.json").read_text())
    data = json.loads((out / "baselines.json").read_text())
    assert set(data) == {"split", "train_split", "model_miou", "baselines"}
    assert list(data["baselines"]) == ["majority class"]  # colour images, 3 classes: no threshold baseline
    assert summary["baselines"] == {"majority class": data["baselines"]["majority class"]["miou"]}
    assert data["model_miou"] == pytest.approx(summary["miou"])

    out2 = tmp_path / "eval2"
    assert (
        cli.main(["evaluate", str(run), "--device", "cpu", "--no-progress", "--out", str(out2), "--no-baselines"]) == 0
    )
    assert not (out2 / "baselines.json").exists()
    assert "baselines" not in json.loads((out2 / "summary.json").read_text())


def test_evaluate_refuses_a_dataset_with_other_classes() -> None:
    import pytest

    from scaleprotoseg.commands.evaluate import check_same_classes

    check_same_classes(["bg", "a"], ["bg", "a"], "/d", "run")
    with pytest.raises(ValueError, match=r"/d: .*class 1 is 'b', the run's model calls it 'a'.*expected .*bg, a"):
        check_same_classes(["bg", "b"], ["bg", "a"], "/d", "run")
    with pytest.raises(ValueError, match=r"3 classes, the run's model has 2"):
        check_same_classes(["bg", "a", "b"], ["bg", "a"], "/d", "run")
