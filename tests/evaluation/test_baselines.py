"""Baselines: Otsu thresholds (hand-made and against scikit-image), majority class, the threshold baseline on
synthetic disks and on the nuclei sample set, the comparison lines and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from scaleprotoseg.data.folder import FolderDataset, write_classes_yaml, write_sample, write_split
from scaleprotoseg.evaluation.baselines import (
    FOREST,
    FOREST_SIGMAS,
    MAJORITY,
    OTSU,
    BaselineResult,
    baseline_report,
    compare_to_baselines,
    evaluate_baselines,
    filter_features,
    fit_level_mapping,
    intensity_levels,
    majority_class,
    pixel_forest_baseline,
    threshold_baseline,
    write_baselines,
)

NUCLEI = Path(__file__).resolve().parents[2] / "data" / "samples" / "nuclei"


def test_intensity_levels_keep_the_threshold_bin_dark() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(40, 5, 1000), rng.normal(160, 5, 1000)])
    levels = intensity_levels(values.reshape(40, 50), 2)
    np.testing.assert_array_equal(levels.reshape(-1), np.arange(2000) >= 1000)


def _write_set(root: Path, samples: dict[str, list[tuple[np.ndarray, np.ndarray]]], names: list[str]) -> Path:
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]][: len(names)]
    write_classes_yaml(root, names, palette)
    for split, items in samples.items():
        stems = [f"{split}{i}" for i in range(len(items))]
        for stem, (image, label) in zip(stems, items):
            write_sample(root, stem, image, label)
        write_split(root, split, stems)
    return root


def _disks(n: int, seed: int, size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bright disks (class 1) on a noisy dark background (class 0), grey images, a void column."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        grey = rng.integers(10, 60, (size, size))
        label = np.zeros((size, size), np.uint8)
        for _ in range(2):
            r = int(rng.integers(3, 7))
            cy, cx = rng.integers(r, size - r, 2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            grey[disk] = rng.integers(180, 250, int(disk.sum()))
            label[disk] = 1
        label[:, 0] = 255
        out.append((np.repeat(grey[..., None], 3, axis=2).astype(np.uint8), label))
    return out


def test_majority_class_of_tiny_set(tmp_path: Path) -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    a = np.array([[0, 0, 1, 1], [2, 2, 2, 255], [255, 255, 255, 255], [255, 255, 255, 255]], np.uint8)
    b = np.array([[1, 1, 1, 0], [255] * 4, [255] * 4, [255] * 4], np.uint8)
    # counts: class 0: 2 + 1 = 3, class 1: 2 + 3 = 5, class 2: 3 (ignore pixels would make 255 the "majority")
    root = _write_set(tmp_path / "tiny", {"train": [(img, a), (img, b)]}, ["bg", "one", "two"])
    assert majority_class(FolderDataset(root, "train")) == 1


def test_threshold_baseline_perfect_on_bright_disks(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "disks", {"train": _disks(4, 0), "val": _disks(3, 1)}, ["background", "disk"])
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    np.testing.assert_array_equal(fit_level_mapping(train, 2), [0, 1])
    result = threshold_baseline(train, val)
    assert result.name == OTSU
    assert result.miou == 1.0 and result.iou == [1.0, 1.0]
    results = {r.name: r for r in evaluate_baselines(train, val)}
    assert set(results) == {MAJORITY, OTSU}
    assert results[OTSU].miou == 1.0
    # majority class: background everywhere -> IoU(bg) = bg pixels / valid pixels, IoU(disk) = 0 (hand count)
    labels = [lab for _, lab in _disks(3, 1)]
    bg = sum(int((lab == 0).sum()) for lab in labels)
    valid = sum(int((lab != 255).sum()) for lab in labels)
    assert results[MAJORITY].iou == pytest.approx([bg / valid, 0.0])
    assert results[MAJORITY].miou == pytest.approx(bg / valid / 2)
    # max_images scores only the first images; no training split: level k -> class k (still right here)
    assert evaluate_baselines(None, val, max_images=1)[0].miou == 1.0


def test_intensity_levels_inverted_mapping(tmp_path: Path) -> None:
    # Dark disks on a bright background: the mapping learned on train is inverted (level 0 -> class 1).
    inverted = [(255 - img, lab) for img, lab in _disks(3, 2)]
    root = _write_set(tmp_path / "inv", {"train": inverted, "val": inverted[:1]}, ["background", "disk"])
    train = FolderDataset(root, "train")
    np.testing.assert_array_equal(fit_level_mapping(train, 2), [1, 0])
    assert threshold_baseline(train, FolderDataset(root, "val")).miou == 1.0
    levels = intensity_levels(inverted[0][0], 2)
    np.testing.assert_array_equal(levels[inverted[0][1] != 255], 1 - inverted[0][1][inverted[0][1] != 255])


def test_threshold_baseline_only_for_grey_or_two_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (8, 8)).astype(np.uint8)
    grey = np.repeat(rng.integers(0, 255, (8, 8, 1)), 3, axis=2).astype(np.uint8)
    colour = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
    names = ["a", "b", "c"]
    grey_root = _write_set(tmp_path / "grey", {"train": [(grey, label)], "val": [(grey, label)]}, names)
    colour_root = _write_set(tmp_path / "colour", {"train": [(colour, label)], "val": [(colour, label)]}, names)
    got = [r.name for r in evaluate_baselines(FolderDataset(grey_root, "train"), FolderDataset(grey_root, "val"))]
    assert got == [MAJORITY, OTSU]
    got = [r.name for r in evaluate_baselines(FolderDataset(colour_root, "train"), FolderDataset(colour_root, "val"))]
    assert got == [MAJORITY]


def _baseline(name: str, miou: float) -> BaselineResult:
    return BaselineResult(name, miou, [miou], "test")


def test_compare_to_baselines_warns_when_not_beaten() -> None:
    baselines = [_baseline(MAJORITY, 0.401), _baseline(OTSU, 0.877)]
    lines = compare_to_baselines(0.912, baselines)
    assert lines == ["model 91.20 | majority class 40.10 | Otsu threshold 87.70"]
    lines = compare_to_baselines(0.5, baselines)
    assert lines[1:] == ["WARNING: the model (50.00) does not beat the Otsu threshold baseline (87.70) on this split"]
    lines = compare_to_baselines(0.3, baselines)
    assert len(lines) == 3 and all(line.startswith("WARNING") for line in lines[1:])
    assert any("majority class baseline (40.10)" in line for line in lines)
    # equal is not beating it (e.g. a model that collapsed to the majority class)
    assert len(compare_to_baselines(0.401, baselines[:1])) == 2
    assert compare_to_baselines(math.nan, baselines)[0].startswith("model n/a |")


def test_write_baselines_and_report(tmp_path: Path) -> None:
    results = [BaselineResult(MAJORITY, 0.25, [0.5, math.nan, 0.0], "d")]
    path = write_baselines(results, tmp_path / "b.json", {"split": "val"})
    data = json.loads(path.read_text())
    assert data == {
        "split": "val",
        "baselines": {MAJORITY: {"miou": 0.25, "iou": [0.5, None, 0.0], "description": "d"}},
    }

    root = _write_set(tmp_path / "disks", {"train": _disks(2, 0), "val": _disks(2, 1)}, ["background", "disk"])
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    majority = evaluate_baselines(train, val)[0].miou
    res, lines = baseline_report(
        train, val, 0.9, tmp_path / "r.json", stage_mious={"warmup": majority - 0.01, "joint": 0.9}
    )
    assert [r.name for r in res] == [MAJORITY, OTSU]
    assert [line for line in lines if "stage" in line] == [
        f"WARNING: stage warmup made the model worse than predicting one class "
        f"(val mIoU {100 * (majority - 0.01):.2f} < majority class {100 * majority:.2f})"
    ]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["model_miou"] == 0.9 and set(data["baselines"]) == {MAJORITY, OTSU}


@pytest.mark.skipif(not (NUCLEI / "classes.yaml").is_file(), reason="nuclei sample set not built")
def test_threshold_baseline_on_nuclei_sample() -> None:
    train, val = FolderDataset(NUCLEI, "train"), FolderDataset(NUCLEI, "val")
    results = {r.name: r for r in evaluate_baselines(train, val)}
    assert results[OTSU].miou > 0.8
    assert results[MAJORITY].iou[1] == 0.0  # background everywhere: no nucleus pixel right


def test_filter_features_of_a_constant_image_and_a_step() -> None:
    flat = np.full((20, 24, 3), 100, np.uint8)
    feats = filter_features(flat)
    assert feats.shape == (20, 24, 1 + 4 * len(FOREST_SIGMAS))  # grey: one channel's features
    np.testing.assert_allclose(feats[..., 0], 100.0)
    # per sigma: Gaussian = the value, gradient = DoG = 0 (scipy's reflecting border keeps a constant constant); the
    # LoG is 0 up to its truncated kernel's sum (about 1 % of the value at sigma 0.7, less above)
    for k in range(len(FOREST_SIGMAS)):
        g, log, grad, dog = (feats[..., 1 + 4 * k + i] for i in range(4))
        np.testing.assert_allclose(g, 100.0, rtol=1e-5)
        np.testing.assert_allclose(np.stack([grad, dog]), 0.0, atol=1e-3)
        assert np.abs(log).max() <= 1.0
    colour = flat.copy()
    colour[..., 1] = 50
    assert filter_features(colour).shape[-1] == 3 * (1 + 4 * len(FOREST_SIGMAS))
    step = np.zeros((16, 16, 3), np.uint8)
    step[:, 8:] = 200
    grad = filter_features(step)[..., 3]  # sigma 0.7 gradient magnitude: largest at the edge
    assert grad[:, 7:9].min() > grad[:, :4].max() and grad[:, 7:9].min() > grad[:, 12:].max()


def test_pixel_forest_learns_disks(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    # Disks darker than a bright textured background in one image and brighter in the other would fool a threshold;
    # here: bright disks, so the forest must reach the threshold's perfect score up to a few edge pixels.
    root = _write_set(tmp_path / "disks", {"train": _disks(4, 0), "val": _disks(3, 1)}, ["background", "disk"])
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    result = pixel_forest_baseline(train, val, samples=4000, trees=20, jobs=1)
    assert result.name == FOREST and result.miou > 0.95
    results = evaluate_baselines(train, val, forest=True)
    assert [r.name for r in results] == [MAJORITY, OTSU, FOREST]
