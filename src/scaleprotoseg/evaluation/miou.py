"""Confusion-matrix accumulation and the mIoU family of metrics.

mIoU follows the paper's protocol (section 4, supplement 6): intersections and unions are summed over the whole
split, ignore pixels are excluded, and the mean runs over the classes with a non-empty union. A class that appears
neither in the ground truth nor in the predictions of the split is *absent*: its IoU is reported as NaN and it does
not count as zero in the mean.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "metrics_from_matrix", "write_results"]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or numpy array of integer class ids, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of class ids, got dtype {x.dtype}")
    return x


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix; rows are ground truth, columns are predictions.

    Args:
        num_classes: number of classes C.
        ignore_index: target value of void pixels, which never enter the matrix.
        device: where the matrix lives (the device of the predictions for speed; needed for NCCL all-reduce).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: got {num_classes}; expected a positive integer")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted class ids and ground-truth labels of the same shape (any number of dims)."""
        pred = _as_tensor(pred, "pred")
        target = _as_tensor(target, "target")
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"pred shape {tuple(pred.shape)} and target shape {tuple(target.shape)} differ; expected equal shapes"
            )
        pred = pred.reshape(-1).to(device=self.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.device, dtype=torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        c = self.num_classes
        bad = (target < 0) | (target >= c)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(
                f"target contains label {value}; expected values in [0, {c}) or the ignore index {self.ignore_index}"
            )
        bad = (pred < 0) | (pred >= c)
        if bool(bad.any()):
            value = int(pred[bad][0])
            raise ValueError(f"pred contains class id {value}; expected values in [0, {c})")
        counts = torch.bincount(target * c + pred, minlength=c * c)
        self.matrix += counts.reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix.to(self.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks when torch.distributed is initialised (no-op otherwise); returns self."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> dict[str, Any]:
        """Metrics of the accumulated counts; see `metrics_from_matrix`."""
        return metrics_from_matrix(self.matrix.detach().cpu().numpy())


def metrics_from_matrix(matrix: np.ndarray) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel and mean class accuracy from a (C, C) confusion matrix (rows = ground truth).

    Returns a dict with ``miou`` (float, NaN when no class is present), ``iou`` (C,) float64 with NaN for absent
    classes, ``present`` (C,) bool (union > 0), ``pixel_accuracy``, ``mean_accuracy`` (over classes with ground-truth
    pixels), ``class_accuracy`` (C,), ``gt_pixels`` / ``pred_pixels`` (C,) int64, ``num_pixels`` and ``matrix``.
    """
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix shape {m.shape}: expected a square (C, C) matrix")
    tp = np.diag(m).astype(np.float64)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    union = gt + pred - np.diag(m)
    present = union > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, tp / np.maximum(union, 1), np.nan)
        class_acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
    total = int(m.sum())
    return {
        "miou": float(np.mean(iou[present])) if present.any() else math.nan,
        "iou": iou,
        "present": present,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_accuracy": float(np.mean(class_acc[gt > 0])) if (gt > 0).any() else math.nan,
        "class_accuracy": class_acc,
        "gt_pixels": gt,
        "pred_pixels": pred,
        "num_pixels": total,
        "matrix": m,
    }


def _json_value(x: Any) -> Any:
    """Plain-JSON form of a metric value: NaN/inf become null, numpy scalars and arrays become Python values."""
    if isinstance(x, np.ndarray):
        return [_json_value(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_json_value(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _json_value(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


def write_results(result: dict[str, Any], class_names: Sequence[str], out_dir: str | Path) -> dict[str, Path]:
    """Write ``per_class_iou.csv``, ``confusion_matrix.csv`` and ``metrics.json`` into ``out_dir``.

    ``result`` is a `ConfusionMatrix.compute()` dict, possibly with extra scalar entries (timing, mode), which go
    into ``metrics.json``. IoUs are fractions in [0, 1]; absent classes have an empty IoU in the CSV and null in JSON.
    Returns the written paths by kind.
    """
    m = np.asarray(result["matrix"], dtype=np.int64)
    c = m.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries; expected {c}, one per row of the confusion matrix")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = metrics_from_matrix(m)
    iou = np.asarray(result.get("iou", base["iou"]), dtype=np.float64)
    present = np.asarray(result.get("present", base["present"]), dtype=bool)

    paths = {"per_class": out / "per_class_iou.csv", "confusion": out / "confusion_matrix.csv"}
    with paths["per_class"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou", "present", "gt_pixels", "pred_pixels"])
        for i, name in enumerate(names):
            value = "" if not math.isfinite(iou[i]) else f"{iou[i]:.6f}"
            w.writerow([name, value, int(present[i]), int(base["gt_pixels"][i]), int(base["pred_pixels"][i])])
    with paths["confusion"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ground_truth\\prediction", *names])
        for i, name in enumerate(names):
            w.writerow([name, *(int(v) for v in m[i])])

    skip = {"iou", "present", "matrix", "class_accuracy", "gt_pixels", "pred_pixels"}
    summary: dict[str, Any] = {k: _json_value(v) for k, v in result.items() if k not in skip}
    summary["num_classes"] = c
    summary["num_present"] = int(present.sum())
    summary["per_class_iou"] = {name: _json_value(float(iou[i])) for i, name in enumerate(names)}
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return paths
