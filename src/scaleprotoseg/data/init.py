"""Turn a folder of images and masks into a folder dataset: ``classes.yaml`` and ``splits/{train,val}.txt``.

``scaleprotoseg data init DIR`` expects ``DIR/images/<stem>.<ext>`` and ``DIR/masks/<stem>.png`` (the layout of
:mod:`scaleprotoseg.data.folder`) and writes the rest of the format:

- ``classes.yaml``: the class names of ``DIR/classes.txt`` when it exists (one name per line, in class-index order:
  mask value 0 is the first line; blank lines and ``#`` comments skipped), else ``class_0 .. class_K`` for the
  largest value found in the masks (the ignore index aside); colours from the Pascal VOC colour map.
- ``splits/train.txt`` and ``splits/val.txt``: every stem with both an image and a mask, shuffled with a seed, a
  fraction for validation (at least one image on each side when there are two or more).

Every mask is read once to check that its values are classes or the ignore index. An image without a mask (or a mask
without an image) is an error naming the stems, as is an existing ``classes.yaml`` or split file unless
``overwrite``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaleprotoseg.data.folder import (
    CLASSES_FILE,
    IMAGES_DIR,
    MASKS_DIR,
    SPLITS_DIR,
    index_files,
    write_classes_yaml,
    write_split,
)
from scaleprotoseg.data.io import IMAGE_SUFFIXES, MASK_SUFFIXES, read_label, voc_colormap

CLASSES_TXT = "classes.txt"


@dataclass
class InitResult:
    """What :func:`init_folder` wrote."""

    root: Path
    class_names: list[str]
    classes_from: str  # "classes.txt" or "masks"
    train: list[str]
    val: list[str]

    def describe(self) -> str:
        return (
            f"{self.root}: {len(self.class_names)} classes (from {self.classes_from}: "
            f"{', '.join(self.class_names)}), {len(self.train)} train / {len(self.val)} val"
        )


def read_classes_txt(path: Path) -> list[str]:
    """Class names of a ``classes.txt``: one per line in class-index order; blank lines and ``#`` comments skipped."""
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path}: no class names; expected one name per line (mask value 0 on the first line)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: class names {dup} appear more than once; expected unique names")
    return names


def _pairs(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images and masks by stem; a stem with only one of the two is an error naming the stems."""
    for sub in (IMAGES_DIR, MASKS_DIR):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: folder does not exist; expected {IMAGES_DIR}/ and {MASKS_DIR}/")
    images = index_files(root / IMAGES_DIR, IMAGE_SUFFIXES)
    masks = index_files(root / MASKS_DIR, MASK_SUFFIXES)
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:

        def listed(stems: list[str]) -> str:
            return ", ".join(stems[:5]) + (f" (and {len(stems) - 5} more)" if len(stems) > 5 else "")

        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask in {root / MASKS_DIR}: {listed(no_mask)}")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) without an image in {root / IMAGES_DIR}: {listed(no_image)}")
        raise ValueError(f"{root}: {'; '.join(parts)}; expected one image and one mask per stem")
    if not images:
        raise ValueError(
            f"{root / IMAGES_DIR}: no images; expected files with one of the suffixes {', '.join(IMAGE_SUFFIXES)}"
        )
    return images, masks


def split_stems_randomly(stems: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Sorted ``stems`` shuffled with ``seed``; ``round(val_fraction * n)`` of them (at least 1 and at most n - 1 when
    n >= 2) are validation. Both lists come back sorted."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}; expected 0 <= fraction < 1")
    order = np.random.default_rng(seed).permutation(len(stems))
    shuffled = [sorted(stems)[i] for i in order]
    n_val = round(val_fraction * len(stems))
    if len(stems) >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), len(stems) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def init_folder(
    root: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    ignore_index: int = 255,
    overwrite: bool = False,
) -> InitResult:
    """Write ``classes.yaml`` and ``splits/train.txt`` / ``splits/val.txt`` for the images and masks in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder does not exist")
    written = [root / CLASSES_FILE, root / SPLITS_DIR / "train.txt", root / SPLITS_DIR / "val.txt"]
    existing = [str(p) for p in written if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(existing)}: already exist(s); pass --overwrite to replace them")
    images, masks = _pairs(root)
    classes_txt = root / CLASSES_TXT
    names = read_classes_txt(classes_txt) if classes_txt.is_file() else None
    if names is not None and 0 <= ignore_index < len(names):
        raise ValueError(
            f"--ignore-index {ignore_index} is a class index of {classes_txt} (0..{len(names) - 1}); "
            "expected a value outside them (usually 255)"
        )
    largest = -1
    for stem in sorted(masks):
        values = np.unique(read_label(masks[stem]))
        values = values[values != ignore_index]
        if values.size and values.min() < 0:
            raise ValueError(f"{masks[stem]}: negative mask value {int(values.min())}; expected class indices")
        if names is not None and values.size and values.max() >= len(names):
            bad = [int(v) for v in values if v >= len(names)]
            raise ValueError(
                f"{masks[stem]}: mask value(s) {bad} outside the {len(names)} classes of {classes_txt} "
                f"(0..{len(names) - 1}, ignore index {ignore_index})"
            )
        if values.size:
            largest = max(largest, int(values.max()))
    if names is None:
        if largest < 0:
            raise ValueError(f"{root / MASKS_DIR}: every mask holds only the ignore index {ignore_index}")
        if largest >= ignore_index >= 0:
            raise ValueError(
                f"{root / MASKS_DIR}: mask value {largest} is not below the ignore index {ignore_index}; "
                "pass --ignore-index or write classes.txt"
            )
        names = [f"class_{i}" for i in range(largest + 1)]
    train, val = split_stems_randomly(list(images), val_fraction, seed)
    write_classes_yaml(root, names, voc_colormap(len(names)), ignore_index=ignore_index, name=root.resolve().name)
    write_split(root, "train", train)
    if val:
        write_split(root, "val", val)
    else:  # --val-fraction 0: no validation split (an empty list would be an error of its own)
        (root / SPLITS_DIR / "val.txt").unlink(missing_ok=True)
    return InitResult(root, names, CLASSES_TXT if classes_txt.is_file() else "masks", train, val)
