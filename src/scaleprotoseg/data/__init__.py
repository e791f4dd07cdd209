"""Datasets: (image, label) pairs with class names, palette and ignore index; transforms; checks; sample sets.

Public names (imported on first use): ``DatasetInfo``, ``SegmentationDataset``, ``build_dataset``,
``register_dataset``, ``available_datasets``, ``Problem``, ``check_dataset``, ``build_samples``,
``TrainTransform``, ``EvalTransform``, ``seed_worker``, ``make_generator``. See docs/data.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetInfo": "base",
    "SampleRecord": "base",
    "SegmentationDataset": "base",
    "build_dataset": "registry",
    "register_dataset": "registry",
    "available_datasets": "registry",
    "get_dataset_class": "registry",
    "Problem": "check",
    "check_dataset": "check",
    "build_samples": "samples",
    "TrainTransform": "transforms",
    "EvalTransform": "transforms",
    "seed_worker": "transforms",
    "make_generator": "transforms",
    "FolderDataset": "folder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"scaleprotoseg.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'scaleprotoseg.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
