"""Trivial and classical baselines that every trained mIoU is reported next to.

* ``majority class``: predict the most frequent class of the training labels everywhere.
* ``Otsu threshold`` (2-class sets, and 3-class sets of grey images): threshold each image's grey level (mean of the
  RGB channels) with Otsu's method (multi-level Otsu for 3 classes), computed per image without training, and map the
  intensity levels (dark..bright) to the classes learned on the training split (for each level, the majority class of
  the training pixels that fall in it).
* ``pixel forest`` (optional, needs scikit-learn: the ``baselines`` extra): the classic interactive pixel classifier of
  bio-image tools. Per pixel, Gaussian smoothing, Laplacian of Gaussian, gradient magnitude and difference of
  Gaussians at sigmas 0.7-10 of every channel (:func:`filter_features`); a random forest trained on pixels sampled
  from the training split, class-balanced.

Scores are computed like the model's evaluation: whole images at their original size, one confusion matrix summed over
the split, ignore pixels excluded (see :mod:`scaleprotoseg.evaluation.miou`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.evaluation.miou import ConfusionMatrix, metrics_from_matrix
from scaleprotoseg.thresholds import otsu_split

__all__ = [
    "MAJORITY",
    "OTSU",
    "BaselineResult",
    "baseline_report",
    "compare_to_baselines",
    "evaluate_baselines",
    "filter_features",
    "forest_available",
    "pixel_forest_baseline",
    "fit_level_mapping",
    "grey_levels",
    "intensity_levels",
    "is_grey",
    "majority_class",
    "threshold_baseline",
    "training_baseline_report",
    "write_baselines",
]

MAJORITY = "majority class"
OTSU = "Otsu threshold"
FOREST = "pixel forest"
FOREST_SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)


@dataclass(frozen=True)
class BaselineResult:
    """One baseline's score on a split: mIoU and per-class IoU as fractions (NaN for absent classes)."""

    name: str
    miou: float
    iou: list[float] = field(default_factory=list)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "miou": _finite_or_none(self.miou),
            "iou": [_finite_or_none(v) for v in self.iou],
            "description": self.description,
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------------------------
# Per-image intensity levels


def grey_levels(image: np.ndarray) -> np.ndarray:
    """Grey level (H, W) float64 of an (H, W, 3) image: the mean of its channels."""
    img = np.asarray(image)
    if img.ndim == 2:
        return img.astype(np.float64)
    return img.astype(np.float64).mean(axis=-1)


def intensity_levels(image: np.ndarray, levels: int, bins: int = 256) -> np.ndarray:
    """Level map (H, W) int64 in 0..levels-1 (dark..bright) from this image's own (multi-level) Otsu split.

    A pixel's level is that of its histogram bin, so the whole bin of a threshold stays in the darker level (a
    constant image is all level 0).
    """
    grey = grey_levels(image)
    split = otsu_split(grey, levels, bins)
    if split is None:
        return np.zeros(grey.shape, dtype=np.int64)
    idx, edges = split
    return np.searchsorted(edges[idx + 1], grey, side="right").astype(np.int64)


def is_grey(dataset: Any, n: int = 3) -> bool:
    """Whether the first ``n`` images of ``dataset`` have three equal channels."""
    for k in range(min(n, len(dataset))):
        image = dataset.load_raw(k)[0]
        if not (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Training statistics


def _valid(label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    keep = label != ignore_index
    return keep & (label >= 0) & (label < num_classes)


def _train_counts(train_dataset: Any, levels: int | None, bins: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """Class pixel counts (C,) of the training labels and, with ``levels``, the (levels, C) counts of training pixels
    per intensity level (one pass over the split; ignore pixels excluded)."""
    info = train_dataset.info
    c, ignore = info.num_classes, info.ignore_index
    class_counts = np.zeros(c, dtype=np.int64)
    level_counts = np.zeros((levels, c), dtype=np.int64) if levels else None
    for k in range(len(train_dataset)):
        image, label, _ = train_dataset.load_raw(k)
        keep = _valid(label, c, ignore)
        class_counts += np.bincount(label[keep], minlength=c)
        if level_counts is not None:
            lev = intensity_levels(image, levels, bins)[keep]
            level_counts += np.bincount(lev * c + label[keep], minlength=levels * c).reshape(levels, c)
    return class_counts, level_counts


def _argmax_counts(counts: np.ndarray, what: str) -> int:
    if counts.sum() == 0:
        raise ValueError(f"{what}: no labelled pixels (all ignored or no images); cannot pick a majority class")
    return int(np.argmax(counts))


def majority_class(train_dataset: Any) -> int:
    """The most frequent class of the training labels (ignore pixels excluded; ties: the lowest index)."""
    counts, _ = _train_counts(train_dataset, None)
    return _argmax_counts(counts, "majority_class")


def _mapping_from_counts(level_counts: np.ndarray, fallback: int) -> np.ndarray:
    mapping = np.argmax(level_counts, axis=1).astype(np.int64)
    mapping[level_counts.sum(axis=1) == 0] = fallback
    return mapping


def fit_level_mapping(train_dataset: Any, levels: int, bins: int = 256) -> np.ndarray:
    """Class (levels,) int64 of each intensity level: the majority class of the training pixels in that level after
    per-image thresholding (a level without training pixels gets the majority class)."""
    class_counts, level_counts = _train_counts(train_dataset, levels, bins)
    assert level_counts is not None
    return _mapping_from_counts(level_counts, _argmax_counts(class_counts, "fit_level_mapping"))


# ---------------------------------------------------------------------------------------------------------------
# Scoring


Predictor = Callable[[np.ndarray], np.ndarray]


def _score(eval_dataset: Any, predictors: Mapping[str, Predictor], max_images: int = 0) -> dict[str, dict[str, Any]]:
    """Metrics of each predictor (image -> class map) over ``eval_dataset``, whole images, one matrix per split."""
    info = eval_dataset.info
    matrices = {name: ConfusionMatrix(info.num_classes, info.ignore_index) for name in predictors}
    n = len(eval_dataset) if max_images <= 0 else min(len(eval_dataset), max_images)
    for k in range(n):
        image, label, _ = eval_dataset.load_raw(k)
        for name, predict in predictors.items():
            matrices[name].update(predict(image), label)
    return {name: metrics_from_matrix(cm.matrix.numpy()) for name, cm in matrices.items()}


def _result(name: str, metrics: dict[str, Any], description: str) -> BaselineResult:
    return BaselineResult(name, float(metrics["miou"]), [float(v) for v in metrics["iou"]], description)


def _majority_predictor(cls: int) -> Predictor:
    return lambda image: np.full(image.shape[:2], cls, dtype=np.int64)


def _threshold_predictor(mapping: np.ndarray, bins: int) -> Predictor:
    return lambda image: mapping[intensity_levels(image, len(mapping), bins)]


def _threshold_description(mapping: np.ndarray, class_names: Sequence[str], trained: bool) -> str:
    kind = "Otsu threshold" if len(mapping) == 2 else f"{len(mapping)}-level multi-Otsu thresholds"
    names = " | ".join(str(class_names[int(c)]) for c in mapping)
    how = "mapping learned on the training split" if trained else "no training split: level k -> class k"
    return f"per-image {kind} on the grey level (mean of RGB); levels dark..bright -> {names} ({how})"


def threshold_baseline(
    train_dataset: Any | None, eval_dataset: Any, *, max_images: int = 0, bins: int = 256
) -> BaselineResult:
    """Per-image (multi-level) Otsu thresholds with the level -> class mapping learned on ``train_dataset``.

    For 2- and 3-class datasets. Without a training split (``None``) intensity level k is predicted as class k.
    """
    levels = eval_dataset.info.num_classes
    if levels not in (2, 3):
        raise ValueError(f"threshold_baseline: the dataset has {levels} classes; expected 2 or 3")
    if train_dataset is not None:
        mapping = fit_level_mapping(train_dataset, levels, bins)
    else:
        mapping = np.arange(levels, dtype=np.int64)
    metrics = _score(eval_dataset, {OTSU: _threshold_predictor(mapping, bins)}, max_images)[OTSU]
    description = _threshold_description(mapping, eval_dataset.info.class_names, train_dataset is not None)
    return _result(OTSU, metrics, description)


def _threshold_applies(datasets: Sequence[Any], num_classes: int) -> bool:
    if num_classes == 2:
        return True
    return num_classes == 3 and all(is_grey(d) for d in datasets)


def evaluate_baselines(
    train_dataset: Any | None, eval_dataset: Any, *, max_images: int = 0, bins: int = 256, forest: bool = False
) -> list[BaselineResult]:
    """Score the baselines on (the first ``max_images`` images, 0: all, of) ``eval_dataset``.

    Always the majority class (when ``train_dataset`` is given); the Otsu threshold baseline for 2-class sets and
    3-class sets of grey images. ``train_dataset`` ``None`` (no training split available) keeps only what needs no
    training: the threshold baseline with level k -> class k. ``forest`` adds the pixel forest (needs a training
    split and scikit-learn). Datasets are read with ``load_raw`` (no transform).
    """
    info = eval_dataset.info
    c = info.num_classes
    checked = [eval_dataset] + ([train_dataset] if train_dataset is not None else [])
    threshold = _threshold_applies(checked, c)
    predictors: dict[str, Predictor] = {}
    descriptions: dict[str, str] = {}
    if train_dataset is not None:
        if train_dataset.info.num_classes != c:
            raise ValueError(
                f"the training split has {train_dataset.info.num_classes} classes and the evaluated split {c}; "
                "expected the same dataset"
            )
        class_counts, level_counts = _train_counts(train_dataset, c if threshold else None, bins)
        majority = _argmax_counts(class_counts, "training split")
        predictors[MAJORITY] = _majority_predictor(majority)
        share = class_counts[majority] / class_counts.sum()
        descriptions[MAJORITY] = (
            f"predict '{info.class_names[majority]}' everywhere: the most frequent class of the training split "
            f"({100 * share:.1f}% of its labelled pixels)"
        )
        mapping = _mapping_from_counts(level_counts, majority) if level_counts is not None else None
    else:
        mapping = np.arange(c, dtype=np.int64) if threshold else None
    if mapping is not None:
        predictors[OTSU] = _threshold_predictor(mapping, bins)
        descriptions[OTSU] = _threshold_description(mapping, info.class_names, train_dataset is not None)
    metrics = _score(eval_dataset, predictors, max_images)
    results = [_result(name, metrics[name], descriptions[name]) for name in predictors]
    if forest and train_dataset is not None:
        results.append(pixel_forest_baseline(train_dataset, eval_dataset, max_images=max_images))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Pixel classifier on filter features


def filter_features(image: np.ndarray, sigmas: Sequence[float] = FOREST_SIGMAS) -> np.ndarray:
    """(H, W, F) float32 filter responses of an (H, W, 3) image: the raw value, then per sigma Gaussian, Laplacian of
    Gaussian, Gaussian gradient magnitude and difference of Gaussians (sigma vs 1.6 sigma). A grey image (equal
    channels) gives the features of one channel, a colour image those of each channel."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    same = img.shape[-1] == 1 or all(np.array_equal(img[..., 0], img[..., k]) for k in range(1, img.shape[-1]))
    channels = [img[..., 0]] if same else [img[..., k] for k in range(img.shape[-1])]
    feats = []
    for ch in channels:
        feats.append(ch)
        for s in sigmas:
            g = ndimage.gaussian_filter(ch, s)
            feats += [
                g,
                ndimage.gaussian_laplace(ch, s),
                ndimage.gaussian_gradient_magnitude(ch, s),
                g - ndimage.gaussian_filter(ch, 1.6 * s),
            ]
    return np.stack(feats, axis=-1)


def pixel_forest_baseline(
    train_dataset: Any,
    eval_dataset: Any,
    *,
    samples: int = 60_000,
    trees: int = 100,
    seed: int = 0,
    max_images: int = 0,
    jobs: int = -1,
) -> BaselineResult:
    """A random forest on :func:`filter_features`, trained on ``samples`` pixels drawn from the training split (an
    equal share per class where a class has enough pixels; memory bounded by ``samples``, not by the split), scored
    on ``eval_dataset`` like the model."""
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError as err:
        raise ImportError(
            "the pixel forest baseline needs scikit-learn; install it with `pip install 'scaleprotoseg[baselines]'`"
        ) from err
    info = train_dataset.info
    c, ignore = info.num_classes, info.ignore_index
    counts, _ = _train_counts(train_dataset, None)  # a pass over the labels only
    if counts.sum() == 0:
        raise ValueError("pixel_forest_baseline: the training split has no labelled pixels")
    per_class = max(samples // int((counts > 0).sum()), 1)
    # Each labelled pixel of class k is kept with probability min(1, 1.2 * per_class / count_k), so that only about
    # `samples` feature rows are ever held, whatever the size of the split; a class is then cut to per_class rows.
    keep_prob = np.minimum(1.0, 1.2 * per_class / np.maximum(counts, 1))
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(len(train_dataset)):
        image, label, _ = train_dataset.load_raw(k)
        keep = _valid(label, c, ignore)
        keep &= rng.random(label.shape) < keep_prob[np.clip(label, 0, c - 1)]
        xs.append(filter_features(image)[keep])
        ys.append(label[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    picked = np.concatenate([rng.permutation(np.flatnonzero(y == cls))[:per_class] for cls in np.unique(y)])
    forest = RandomForestClassifier(n_estimators=trees, n_jobs=jobs, random_state=seed, min_samples_leaf=2)
    forest.fit(x[picked], y[picked])

    def predict(image: np.ndarray) -> np.ndarray:
        feats = filter_features(image)
        return forest.predict(feats.reshape(-1, feats.shape[-1])).reshape(image.shape[:2]).astype(np.int64)

    metrics = _score(eval_dataset, {FOREST: predict}, max_images)[FOREST]
    description = (
        f"random forest ({trees} trees) on {x.shape[1]} filter responses per pixel (Gaussian, LoG, gradient "
        f"magnitude, DoG at sigma {', '.join(f'{s:g}' for s in FOREST_SIGMAS)}), {len(picked)} class-balanced "
        f"training pixels, seed {seed}"
    )
    return _result(FOREST, metrics, description)


def forest_available() -> bool:
    """Whether scikit-learn (needed by the pixel forest) is installed."""
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _pct(x: float) -> str:
    return f"{100 * x:.2f}" if math.isfinite(x) else "n/a"


def compare_to_baselines(model_miou: float, baselines: Sequence[BaselineResult]) -> list[str]:
    """Lines for the user: ``model 91.20 | majority class 40.10 | Otsu threshold 87.70`` (mIoU in %), then a
    ``WARNING`` line for each baseline the model does not beat (model mIoU <= baseline mIoU)."""
    lines = [" | ".join([f"model {_pct(model_miou)}"] + [f"{b.name} {_pct(b.miou)}" for b in baselines])]
    for b in baselines:
        if math.isfinite(model_miou) and math.isfinite(b.miou) and model_miou <= b.miou:
            lines.append(
                f"WARNING: the model ({_pct(model_miou)}) does not beat the {b.name} baseline ({_pct(b.miou)}) "
                "on this split"
            )
    return lines


def write_baselines(
    results: Sequence[BaselineResult], path: str | Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``{**extra, "baselines": {name: {miou, iou, description}}}`` as JSON (NaN -> null); returns the path."""
    data: dict[str, Any] = dict(extra or {})
    data["baselines"] = {r.name: r.to_dict() for r in results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def baseline_report(
    train_dataset: Any | None,
    eval_dataset: Any,
    model_miou: float,
    path: str | Path,
    *,
    stage_mious: Mapping[str, float] | None = None,
    max_images: int = 0,
    extra: Mapping[str, Any] | None = None,
    forest: bool = False,
) -> tuple[list[BaselineResult], list[str]]:
    """Evaluate the baselines, write them to ``path`` (with the model's mIoU) and return them with the lines to show.

    ``stage_mious`` (stage name -> validation mIoU of a train stage) adds a warning for every stage whose model is
    worse than predicting the majority class.
    """
    results = evaluate_baselines(train_dataset, eval_dataset, max_images=max_images, forest=forest)
    lines = compare_to_baselines(model_miou, results)
    majority = next((r for r in results if r.name == MAJORITY), None)
    if majority is not None and math.isfinite(majority.miou):
        for stage, miou in (stage_mious or {}).items():
            if math.isfinite(miou) and miou < majority.miou:
                lines.append(
                    f"WARNING: stage {stage} made the model worse than predicting one class "
                    f"(val mIoU {_pct(miou)} < {MAJORITY} {_pct(majority.miou)})"
                )
    data = {**(extra or {}), "model_miou": _finite_or_none(model_miou)}
    if stage_mious:
        data["stage_mious"] = {k: _finite_or_none(v) for k, v in stage_mious.items()}
    write_baselines(results, path, data)
    return results, lines


def training_baseline_report(
    train_dataset: Any,
    val_dataset: Any,
    stage_results: Sequence[Any],
    path: str | Path,
    *,
    split: str | None = None,
) -> tuple[list[BaselineResult], list[str]]:
    """End-of-training report: baselines on the validation split against the last validated stage, a warning for
    every train stage worse than the majority class, written to ``path`` (the run's ``baselines.json``). Nothing
    (``[], []``) when no stage was validated. ``stage_results``: objects with ``name``, ``kind`` and ``metrics``
    (``val_miou``)."""
    validated = [r for r in stage_results if r.metrics.get("val_miou") is not None]
    if val_dataset is None or not validated:
        return [], []
    last = validated[-1]
    stage_mious = {r.name: float(r.metrics["val_miou"]) for r in validated if r.kind == "train"}
    extra = {"split": split, "stage": last.name}
    return baseline_report(
        train_dataset,
        val_dataset,
        float(last.metrics["val_miou"]),
        Path(path),
        stage_mious=stage_mious,
        extra=extra,
    )
