"""The dataset contract shared by every loader: :class:`DatasetInfo` and :class:`SegmentationDataset`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from scaleprotoseg.config import DataConfig
    from scaleprotoseg.data.transforms import Transform


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """What a model needs to know about a dataset's labels.

    ``palette`` is (C, 3) uint8, one colour per class. ``part_names`` (part datasets only) maps a class index to the
    names of its parts: part id ``p`` (1-based, as in the items' ``parts`` map) is ``part_names[c][p - 1]``.
    """

    name: str
    class_names: list[str]
    palette: np.ndarray
    ignore_index: int = 255
    part_names: dict[int, list[str]] | None = field(default=None)

    def __post_init__(self) -> None:
        pal = np.asarray(self.palette)
        if pal.shape != (len(self.class_names), 3):
            raise ValueError(
                f"dataset {self.name!r}: palette of shape {pal.shape}; expected "
                f"({len(self.class_names)}, 3), one RGB colour per class"
            )
        object.__setattr__(self, "palette", pal.astype(np.uint8))
        if 0 <= self.ignore_index < len(self.class_names):
            raise ValueError(
                f"dataset {self.name!r}: ignore index {self.ignore_index} is a class index; expected a "
                f"value outside 0..{len(self.class_names) - 1}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives: its stable ``name``, image and label files, and loader-specific ``extra`` data."""

    name: str
    image: Path
    label: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SegmentationDataset(Dataset):
    """Base class: items are dicts ``image`` float32 (3, H, W), ``label`` int64 (H, W), ``name``, ``index``.

    Subclasses fill ``self.samples`` (a list of :class:`SampleRecord`) and implement :meth:`_read`; part datasets set
    ``has_parts`` and implement :meth:`_read_parts`. Randomness of the transform comes from a generator seeded with
    (``seed``, ``epoch``, index), so a sample's augmentation does not depend on the worker that loads it; call
    :meth:`set_epoch` before each epoch (DataLoader workers must not be persistent for the epoch to reach them).
    """

    has_parts = False

    def __init__(
        self, info: DatasetInfo, samples: list[SampleRecord], *, transform: Transform | None = None, seed: int = 0
    ) -> None:
        from scaleprotoseg.data.transforms import EvalTransform

        self.info = info
        self.samples = list(samples)
        self.transform: Transform = transform if transform is not None else EvalTransform()
        self.seed = int(seed)
        self.epoch = 0
        self._native_ignore = info.ignore_index

    # -- subclass interface ------------------------------------------------------------------------------------
    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 (H, W, 3) and label int64 (H, W) of sample ``index``, ignore pixels at the native value."""
        raise NotImplementedError

    def _read_parts(self, index: int) -> np.ndarray:
        """Part ids int64 (H, W), 0 = no part (part datasets only)."""
        raise NotImplementedError(f"dataset {self.info.name!r} has no part annotations")

    # -- public API --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def part_names(self) -> dict[int, list[str]] | None:
        return self.info.part_names

    def sample_name(self, index: int) -> str:
        return self.samples[self._check_index(index)].name

    def sample_files(self, index: int) -> list[Path]:
        """The files that sample ``index`` is read from (for messages)."""
        rec = self.samples[self._check_index(index)]
        files = [rec.image] + ([rec.label] if rec.label is not None else [])
        files += [v for v in rec.extra.values() if isinstance(v, Path)]
        return files

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations :meth:`__getitem__` draws."""
        self.epoch = int(epoch)

    def limit(self, n: int) -> None:
        """Keep only the first ``n`` samples (``n <= 0``: keep all)."""
        if n > 0:
            self.samples = self.samples[:n]

    def set_ignore_index(self, value: int) -> None:
        """Report ignore pixels as ``value`` instead of the dataset's native ignore index."""
        if 0 <= value < self.info.num_classes:
            raise ValueError(
                f"dataset {self.info.name!r}: ignore index {value} is a class index; expected a value "
                f"outside 0..{self.info.num_classes - 1}"
            )
        from dataclasses import replace

        self.info = replace(self.info, ignore_index=int(value))

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Untransformed sample: image uint8 (H, W, 3), label int64 (H, W) and name; labels are validated."""
        index = self._check_index(index)
        image, label = self._read(index)
        where = " / ".join(str(p) for p in self.sample_files(index))
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{where}: image of shape {image.shape} and type {image.dtype}; expected uint8 (H, W, 3)")
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{where}: label size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]} (width x height); expected equal sizes"
            )
        label = label.astype(np.int64, copy=False)
        ignore = self._native_ignore
        bad = ((label < 0) | (label >= self.info.num_classes)) & (label != ignore)
        if bad.any():
            values = np.unique(label[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            raise ValueError(
                f"{where}: label values {shown} are outside the classes 0..{self.info.num_classes - 1} "
                f"(ignore index {ignore})"
            )
        if self.info.ignore_index != ignore:
            label = np.where(label == ignore, self.info.ignore_index, label)
        return image, label, self.samples[index].name

    def load_parts(self, index: int) -> np.ndarray:
        """Part-id map int64 (H, W) of sample ``index`` (0 = no part); part datasets only."""
        return self._read_parts(self._check_index(index)).astype(np.int64, copy=False)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        image, label, name = self.load_raw(index)
        extras = {"parts": self.load_parts(index)} if self.has_parts else {}
        rng = np.random.default_rng([abs(self.seed), self.epoch, int(index)])
        img_t, lab_t, extras_t = self.transform(
            image, label, rng=rng, extras=extras, ignore_index=self.info.ignore_index
        )
        item: dict[str, Any] = {"image": img_t, "label": lab_t, "name": name, "index": int(index)}
        item.update(extras_t)
        return item

    def _check_index(self, index: int) -> int:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"dataset {self.info.name!r}: index {index} is out of range; expected 0..{n - 1}")
        return index % n

    # -- construction from a config ----------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        """Dataset-specific options accepted in ``DataConfig.options``."""
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in ("transform", "seed")]

    @classmethod
    def from_config(cls, data_cfg: DataConfig, split: str) -> SegmentationDataset:
        """Build from ``data_cfg.root`` and ``data_cfg.options`` (unknown options are errors listing the valid ones)."""
        valid = cls.option_names()
        unknown = [k for k in data_cfg.options if k not in valid]
        if unknown:
            raise ValueError(
                f"data.options: unknown option(s) {', '.join(map(repr, unknown))} for dataset "
                f"{data_cfg.name!r}; valid options: {', '.join(valid) or 'none'}"
            )
        if not data_cfg.root:
            raise ValueError(f"data.root is empty; expected the directory of the {data_cfg.name!r} dataset")
        return cls(data_cfg.root, split, **data_cfg.options)


def as_tensor_image(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) with values 0..255."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def lookup_table(mapping: dict[int, int], size: int = 256, default: int = 255) -> np.ndarray:
    """A dense int64 lookup table of ``size`` entries from a sparse ``{source: target}`` mapping."""
    lut = np.full(size, default, dtype=np.int64)
    for k, v in mapping.items():
        if 0 <= k < size:
            lut[k] = v
    return lut


def apply_lut(values: np.ndarray, lut: np.ndarray, default: int = 255) -> np.ndarray:
    """Map integer ``values`` through ``lut``; values outside the table map to ``default``."""
    v = np.asarray(values).astype(np.int64, copy=False)
    inside = (v >= 0) & (v < len(lut))
    return np.where(inside, lut[np.clip(v, 0, len(lut) - 1)], default)


def split_aliases(split: str, aliases: dict[str, str]) -> str:
    """Map common split names (``train``, ``val``) to a dataset's own directory names."""
    return aliases.get(split, split)
