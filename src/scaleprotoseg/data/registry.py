"""The dataset registry and :func:`build_dataset`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaleprotoseg.config import DataConfig
    from scaleprotoseg.data.base import SegmentationDataset

# name -> a SegmentationDataset subclass (built with ``from_config``) or a callable ``(data_cfg, split) -> dataset``.
_REGISTRY: dict[str, Any] = {}
_BUILTIN_MODULES = (
    "folder",
    "folder_parts",
    "pascal_voc",
    "cityscapes",
    "ade20k",
    "coco_stuff",
    "isbi_em",
    "panoptic_parts",
)


def register_dataset(name: str) -> Callable[[Any], Any]:
    """Decorator registering a dataset class (or a ``(data_cfg, split) -> dataset`` factory) under ``name``."""

    def deco(obj: Any) -> Any:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not obj and _qualname(existing) != _qualname(obj):
            raise ValueError(f"dataset name {name!r} is already registered to {_qualname(existing)}")
        _REGISTRY[name] = obj
        return obj

    return deco


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"scaleprotoseg.data.{mod}")


def available_datasets() -> list[str]:
    """Registered dataset names (built-in ones included), sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_dataset_class(name: str) -> Any:
    """The registered class or factory for ``name``; unknown names raise a ValueError listing the valid ones."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"data.name: unknown dataset {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_dataset(data_cfg: DataConfig, split: str, *, train: bool, seed: int = 0) -> SegmentationDataset:
    """The ``split`` of the dataset ``data_cfg`` describes, with the training or evaluation transform.

    ``data_cfg.max_train_samples`` (``train=True``) or ``max_val_samples`` keeps the first samples only (0: all).
    ``data_cfg.ignore_index`` is the value labels use for void pixels (remapped from the dataset's own if they
    differ), and a non-zero ``data_cfg.num_classes`` must match the dataset. ``seed`` seeds the augmentations.
    """
    from scaleprotoseg.data.transforms import build_transform

    obj = get_dataset_class(data_cfg.name)
    dataset = obj.from_config(data_cfg, split) if hasattr(obj, "from_config") else obj(data_cfg, split)
    info = dataset.info
    if data_cfg.num_classes and data_cfg.num_classes != info.num_classes:
        raise ValueError(
            f"data.num_classes: {data_cfg.num_classes} does not match dataset {info.name!r} "
            f"({data_cfg.root}), which has {info.num_classes} classes; expected {info.num_classes} or 0"
        )
    if data_cfg.ignore_index != info.ignore_index:
        dataset.set_ignore_index(data_cfg.ignore_index)
    dataset.transform = build_transform(data_cfg, train=train)
    dataset.seed = int(seed)
    dataset.limit(data_cfg.max_train_samples if train else data_cfg.max_val_samples)
    return dataset
