"""One evaluation of a model on a dataset split with everything written beside it: the function both
``scaleprotoseg evaluate`` and the report call, so that their numbers and files are the same."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from scaleprotoseg.evaluation.evaluate import evaluate
from scaleprotoseg.evaluation.inference import InferenceSettings

__all__ = ["SUMMARY", "SplitEvaluation", "evaluate_split", "inference_text"]

SUMMARY = "summary.json"  # the headline numbers of one evaluation folder, beside metrics.json


@dataclass
class SplitEvaluation:
    """What :func:`evaluate_split` computed: ``result`` (:func:`evaluate`'s dictionary), ``summary`` (what
    ``summary.json`` holds) and ``out_dir`` (None when nothing was written)."""

    result: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    def write_summary(self) -> None:
        """Rewrite ``summary.json`` (after fields were added to :attr:`summary`)."""
        if self.out_dir is not None:
            (self.out_dir / SUMMARY).write_text(json.dumps(self.summary, indent=2) + "\n")


def inference_text(settings: Mapping[str, Any] | InferenceSettings | None) -> str:
    """A short description of inference settings, e.g. ``"whole images, flip"`` or ``"sliding 512 px, scales 0.5, 1
    (features fused)"``."""
    if settings is None:
        return "–"
    s = asdict(settings) if isinstance(settings, InferenceSettings) else dict(settings)
    mode = s.get("mode", "whole")
    size = int(s.get("test_size") or 0)
    parts = [{"whole": "whole images"}.get(mode, mode) + (f" {size} px" if size and mode != "whole" else "")]
    scales = [float(x) for x in s.get("msc_scales") or ()]
    if scales:
        parts.append(f"scales {', '.join(f'{x:g}' for x in scales)} ({s.get('msc_fusion', 'features')} fused)")
    if s.get("flip"):
        parts.append("flip")
    return ", ".join(parts)


def evaluate_split(
    model: nn.Module,
    dataset: Dataset,
    *,
    class_names: Sequence[str],
    out_dir: str | Path | None,
    ignore_index: int = 255,
    device: torch.device | str | None = None,
    inference: InferenceSettings | None = None,
    max_samples: int = 0,
    progress: bool = True,
    summary: Mapping[str, Any] | None = None,
) -> SplitEvaluation:
    """Evaluate ``model`` on ``dataset`` (:func:`evaluate`) and write into ``out_dir``: ``metrics.json``,
    ``per_class_iou.csv`` and ``confusion_matrix.csv`` (:func:`write_results`), ``confusion_matrix.png``,
    ``per_class_iou.png`` and ``summary.json``.

    ``summary``: fields that describe the evaluation (e.g. ``run``, ``stage``, ``split``); ``summary.json`` holds
    them, then ``miou``, ``pixel_accuracy`` (fractions), ``num_images`` and ``inference`` (the settings). With
    ``out_dir`` None nothing is written (e.g. on the non-main ranks of a distributed evaluation)."""
    from scaleprotoseg.evaluation.miou import write_results

    inference = inference or InferenceSettings()
    names = list(class_names)
    res = evaluate(
        model,
        dataset,
        num_classes=len(names),
        ignore_index=ignore_index,
        device=device,
        inference=inference,
        max_samples=max_samples,
        progress=progress,
    )
    info = {
        **dict(summary or {}),
        "miou": res["miou"],
        "pixel_accuracy": res["pixel_accuracy"],
        "num_images": res["num_images"],
        "inference": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(inference).items()},
    }
    if out_dir is None:
        return SplitEvaluation(res, info, None)
    from scaleprotoseg.evaluation.plots import plot_confusion_matrix, plot_per_class_iou

    out = Path(out_dir)
    write_results(res, names, out)
    plot_confusion_matrix(res["matrix"], names, out / "confusion_matrix.png")
    plot_per_class_iou(res["iou"], names, out / "per_class_iou.png")
    done = SplitEvaluation(res, info, out)
    done.write_summary()
    return done
