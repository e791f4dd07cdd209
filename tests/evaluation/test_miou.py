"""ConfusionMatrix / mIoU: hand-made case, torchmetrics agreement, accumulation, invalid inputs, files, plots."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_jaccard_index

from scaleprotoseg.evaluation.miou import ConfusionMatrix, write_results
from scaleprotoseg.evaluation.plots import plot_confusion_matrix, plot_per_class_iou

IGNORE = 255


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # 4 classes; class 3 never appears in target or prediction (absent). Two ignore pixels with "wrong" predictions.
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [IGNORE, IGNORE, 0, 2]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2], [3, 0, 0, 0]])
    return pred, target


def test_hand_made_case() -> None:
    pred, target = _hand_case()
    cm = ConfusionMatrix(4, ignore_index=IGNORE)
    cm.update(pred, target)
    r = cm.compute()
    # Valid pixels (target, pred): (0,0) x3, (0,1), (1,1) x2, (1,2), (2,2) x2, (2,0).  10 pixels.
    expected = np.array([[3, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(r["matrix"], expected)
    assert r["matrix"].dtype == np.int64
    # IoU = tp / (gt + pred - tp): class 0: 3 / (4 + 4 - 3) = 3/5; class 1: 2 / (3 + 3 - 2) = 2/4; class 2: 2/(3+3-2).
    iou_hand = [3 / 5, 2 / 4, 2 / 4]
    np.testing.assert_allclose(r["iou"][:3], iou_hand)
    assert math.isnan(r["iou"][3])  # absent class: NaN, not 0
    np.testing.assert_array_equal(r["present"], [True, True, True, False])
    assert r["miou"] == pytest.approx(sum(iou_hand) / 3)  # mean over present classes only
    assert r["pixel_accuracy"] == pytest.approx(7 / 10)  # ignore pixels do not count
    assert r["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert r["iou"].dtype == np.float64


def test_class_only_predicted_counts_with_zero_iou() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))  # class 2 predicted but never in ground truth
    r = cm.compute()
    assert r["iou"][2] == 0.0 and r["present"][2]
    assert math.isnan(r["iou"][1])
    assert r["miou"] == pytest.approx((0.5 + 0.0) / 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_torchmetrics(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = 7
    target = torch.randint(0, c - 1, (3, 40, 50), generator=g)  # class 6 absent from target...
    pred = torch.randint(0, c - 2, (3, 40, 50), generator=g)  # ...and from predictions, class 5 only in target
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    cm = ConfusionMatrix(c, ignore_index=IGNORE)
    cm.update(pred, target)
    r = cm.compute()
    ref = multiclass_jaccard_index(pred, target, num_classes=c, ignore_index=IGNORE, average=None).double().numpy()
    ref_mean = float(multiclass_jaccard_index(pred, target, num_classes=c, ignore_index=IGNORE, average="macro"))
    assert not r["present"][6] and r["present"][:6].all()
    np.testing.assert_allclose(r["iou"][r["present"]], ref[r["present"]], rtol=1e-6)
    assert r["miou"] == pytest.approx(ref_mean, rel=1e-6)


def test_accumulation_equals_concatenation() -> None:
    g = torch.Generator().manual_seed(3)
    preds = [torch.randint(0, 5, (2, 9, s), generator=g) for s in (7, 11, 13)]
    targets = [torch.randint(0, 5, p.shape, generator=g) for p in preds]
    for t in targets:
        t[0, 0] = IGNORE
    acc = ConfusionMatrix(5)
    for p, t in zip(preds, targets):
        acc.update(p, t)
    one = ConfusionMatrix(5)
    one.update(torch.cat([p.flatten() for p in preds]), torch.cat([t.flatten() for t in targets]))
    np.testing.assert_array_equal(acc.compute()["matrix"], one.compute()["matrix"])
    merged = ConfusionMatrix(5)
    for p, t in zip(preds, targets):
        part = ConfusionMatrix(5)
        part.update(p, t)
        merged.merge(part)
    np.testing.assert_array_equal(merged.compute()["matrix"], one.compute()["matrix"])
    merged.all_reduce()  # not distributed: no-op
    np.testing.assert_array_equal(merged.compute()["matrix"], one.compute()["matrix"])
    merged.reset()
    assert merged.compute()["matrix"].sum() == 0 and math.isnan(merged.compute()["miou"])


def test_invalid_inputs() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="label 7"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, IGNORE]))
    with pytest.raises(ValueError, match="label -1"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="class id 3"):
        cm.update(torch.tensor([3, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="dtype"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(4))
    assert cm.compute()["matrix"].sum() == 0  # failed updates leave the counts untouched


def test_write_results(tmp_path) -> None:
    pred, target = _hand_case()
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    r = cm.compute()
    r["seconds"] = 1.5
    names = ["road", "car", "sky", "train"]
    paths = write_results(r, names, tmp_path / "eval")
    with paths["per_class"].open() as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == names
    assert float(rows[0]["iou"]) == pytest.approx(0.6) and rows[3]["iou"] == "" and rows[3]["present"] == "0"
    assert rows[0]["gt_pixels"] == "4" and rows[0]["pred_pixels"] == "4"
    with paths["confusion"].open() as f:
        grid = list(csv.reader(f))
    assert grid[0][1:] == names and grid[1] == ["road", "3", "1", "0", "0"]
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["miou"] == pytest.approx(r["miou"]) and metrics["seconds"] == 1.5
    assert metrics["per_class_iou"]["train"] is None and metrics["num_present"] == 3
    with pytest.raises(ValueError, match="class_names has 2"):
        write_results(r, names[:2], tmp_path)


def test_plots_write_png(tmp_path) -> None:
    pred, target = _hand_case()
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    r = cm.compute()
    names = ["road", "car", "sky", "train"]
    p1 = plot_confusion_matrix(r["matrix"], names, tmp_path / "cm.png")
    p2 = plot_per_class_iou(r["iou"], names, tmp_path / "iou.png")
    big = np.random.default_rng(0).integers(0, 50, (150, 150))
    p3 = plot_confusion_matrix(big, [f"class{i}" for i in range(150)], tmp_path / "cm150.png", normalize=False)
    iou150 = np.random.default_rng(1).random(150)
    iou150[::7] = np.nan
    p4 = plot_per_class_iou(iou150, [f"class{i}" for i in range(150)], tmp_path / "iou150.png")
    for p in (p1, p2, p3, p4):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
