"""``folder_parts``: the folder format (``scaleprotoseg.data.folder``) plus part annotations, for the consistency and
stability metrics (section 4.2, Tables 3-4) on users' own data and in tests.

::

    <root>/...                      # a folder dataset (classes.yaml, images/, masks/, splits/)
    <parts_root>/part_names.yaml    # {class name: [part name, ...]}; part p of a class is the p-th name (1-based)
    <parts_root>/<stem>.png         # index PNG (or 2-D .tif): part id within the pixel's class, 0 = no part

``parts_root`` (option; default ``<root>/parts``) may be absolute or relative to ``root``. Stems without a part
file are left out, like the panoptic-parts datasets keep only the images that have part labels. Items add
``parts`` int64 (H, W) and ``dataset.part_names`` maps class index -> part names, as for
``cityscapes_panoptic_parts`` / ``pascal_panoptic_parts``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scaleprotoseg.data.folder import FolderDataset
from scaleprotoseg.data.io import MASK_SUFFIXES, read_label
from scaleprotoseg.data.registry import register_dataset

PART_NAMES_FILE = "part_names.yaml"


def read_part_names(path: Path, class_names: list[str]) -> dict[int, list[str]]:
    """``{class index: part names}`` from a ``part_names.yaml`` keyed by class name."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {{class name: [part names]}} for the part dataset")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping {{class name: [part names]}}, got {type(data).__name__}")
    out: dict[int, list[str]] = {}
    for cls, parts in data.items():
        if cls not in class_names:
            raise ValueError(f"{path}: class {cls!r} is not a class of the dataset; expected one of {class_names}")
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{path}: parts of {cls!r} are {parts!r}; expected a list of part names")
        if parts:
            out[class_names.index(cls)] = list(parts)
    return out


@register_dataset("folder_parts")
class FolderPartsDataset(FolderDataset):
    """A folder dataset with part maps (see the module docstring). Options: ``parts_root``, ``intensity``."""

    has_parts = True

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        transform: Any = None,
        seed: int = 0,
        intensity: str = "range",
        parts_root: str | Path = "parts",
    ) -> None:
        super().__init__(root, split, transform=transform, seed=seed, intensity=intensity)
        proot = Path(root) / parts_root  # an absolute parts_root replaces root
        if not proot.is_dir():
            raise FileNotFoundError(f"{proot}: part annotation folder does not exist (data.options.parts_root)")
        names = read_part_names(proot / PART_NAMES_FILE, list(self.info.class_names))
        files = {}
        for rec in self.samples:
            found = [proot / f"{rec.name}{s}" for s in MASK_SUFFIXES if (proot / f"{rec.name}{s}").is_file()]
            if found:
                files[rec.name] = found[0]
        self.samples = [replace(r, extra={**r.extra, "parts": files[r.name]}) for r in self.samples if r.name in files]
        if not self.samples:
            raise FileNotFoundError(f"{proot}: no part map <stem>.png for any image of split {split!r} of {root}")
        self.parts_root = proot
        self.info = replace(self.info, part_names=names)

    def _read_parts(self, index: int) -> np.ndarray:
        rec = self.samples[index]
        parts = read_label(rec.extra["parts"])
        label_size = _size_of(rec.label) if rec.label is not None else None
        if label_size is not None and parts.shape != label_size:
            raise ValueError(
                f"{rec.extra['parts']}: part map size {parts.shape[::-1]} differs from the label size "
                f"{label_size[::-1]} ({rec.label}); expected equal sizes (width x height)"
            )
        return parts.astype(np.int64)


def _size_of(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image file from its header (None for formats read otherwise, e.g. TIFF)."""
    if path.suffix.lower() != ".png":
        return None
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]
