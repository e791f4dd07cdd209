"""The folder format for users' own data (registry name ``folder``); see docs/data.md.

::

    root/
      classes.yaml            # class names, colours, ignore index, optional split lists
      images/<stem>.<ext>     # png, jpg, jpeg, tif, tiff, bmp, webp; gray / 16-bit / RGBA are converted
      masks/<stem>.png        # index image: one class index per pixel (mode L or P), or a 2-D integer .tif
      splits/<split>.txt      # one stem per line ('#' starts a comment)

``classes.yaml``::

    name: my-data             # optional (default: the folder name)
    classes:                  # in class-index order; a name or {name, color}
      - {name: background, color: [0, 0, 0]}
      - {name: nucleus, color: [230, 25, 75]}
    ignore_index: 255         # optional (default 255): mask value of void pixels
    splits:                   # optional (default: every splits/*.txt)
      train: splits/train.txt # a file of stems relative to the root ...
      val: [img_07, img_08]   # ... or the stems themselves
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scaleprotoseg.data.base import DatasetInfo, SampleRecord, SegmentationDataset
from scaleprotoseg.data.io import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    SCALINGS,
    read_image,
    read_label,
    voc_colormap,
    write_image,
    write_index_png,
)
from scaleprotoseg.data.registry import register_dataset

CLASSES_FILE = "classes.yaml"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
SPLITS_DIR = "splits"


@dataclass
class FolderSpec:
    """The parsed ``classes.yaml`` of a folder dataset."""

    root: Path
    name: str
    class_names: list[str]
    palette: np.ndarray
    ignore_index: int = 255
    splits: dict[str, list[str] | Path] = field(default_factory=dict)

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, list(self.class_names), self.palette, self.ignore_index)


def read_folder_spec(root: str | Path) -> FolderSpec:
    """Parse ``root/classes.yaml``; errors name the file, the key and what was expected."""
    root = Path(root)
    path = root / CLASSES_FILE
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a folder dataset needs classes.yaml with its class names")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with a 'classes' list, got {type(data).__name__}")
    known = {"name", "classes", "ignore_index", "splits", "description"}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(known))}"
        )
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{path}: 'classes' is {classes!r}; expected a non-empty list of names or {{name, color}}")
    names: list[str] = []
    default = voc_colormap(max(len(classes), 1))
    colors = []
    for i, entry in enumerate(classes):
        color: Any = None
        if isinstance(entry, str):
            name = entry
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, color = entry["name"], entry.get("color")
            extra = [k for k in entry if k not in ("name", "color")]
            if extra:
                raise ValueError(f"{path}: classes[{i}] has unknown key(s) {extra}; expected name and color")
        else:
            raise ValueError(f"{path}: classes[{i}] is {entry!r}; expected a name or a mapping with name and color")
        if color is None:
            color = default[i].tolist()
        if (
            not isinstance(color, list | tuple)
            or len(color) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
        ):
            raise ValueError(f"{path}: classes[{i}] ({name}) color is {color!r}; expected [r, g, b] with 0..255 ints")
        names.append(name)
        colors.append(list(color))
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: class names {dup} appear more than once; expected unique names")
    ignore = data.get("ignore_index", 255)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or (0 <= ignore < len(names)):
        raise ValueError(
            f"{path}: ignore_index is {ignore!r}; expected an integer outside the class indices "
            f"0..{len(names) - 1} (usually 255)"
        )
    splits: dict[str, list[str] | Path] = {}
    raw_splits = data.get("splits")
    if raw_splits is not None:
        if not isinstance(raw_splits, dict):
            raise ValueError(f"{path}: 'splits' is {raw_splits!r}; expected a mapping of split name to a file or list")
        for split, value in raw_splits.items():
            if isinstance(value, str):
                splits[str(split)] = root / value
            elif isinstance(value, list) and all(isinstance(v, str | int) for v in value):
                splits[str(split)] = [str(v) for v in value]
            else:
                raise ValueError(f"{path}: splits.{split} is {value!r}; expected a file path or a list of stems")
    else:
        split_dir = root / SPLITS_DIR
        if split_dir.is_dir():
            for f in sorted(split_dir.glob("*.txt")):
                splits[f.stem] = f
    name = data.get("name") or root.resolve().name
    return FolderSpec(root, str(name), names, np.asarray(colors, dtype=np.uint8), int(ignore), splits)


def read_split_file(path: Path) -> list[str]:
    """Stems listed in a split file: one per line, blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file does not exist")
    stems = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            stems.append(line)
    return stems


def index_files(directory: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map stem (path relative to ``directory`` without suffix, '/'-separated) to file, for the given suffixes."""
    out: dict[str, Path] = {}
    if not directory.is_dir():
        return out
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith("."):
            stem = f.relative_to(directory).with_suffix("").as_posix()
            if stem in out:
                raise ValueError(f"{f}: stem {stem!r} also used by {out[stem]}; expected one file per stem")
            out[stem] = f
    return out


def split_stems(
    spec: FolderSpec, split: str, images: dict[str, Path] | None = None, masks: dict[str, Path] | None = None
) -> list[str]:
    """Stems of ``split``; ``all`` (when not declared) is every stem that has both an image and a mask."""
    if split in spec.splits:
        value = spec.splits[split]
        return list(value) if isinstance(value, list) else read_split_file(value)
    if split == "all":
        images = images if images is not None else index_files(spec.root / IMAGES_DIR, IMAGE_SUFFIXES)
        masks = masks if masks is not None else index_files(spec.root / MASKS_DIR, MASK_SUFFIXES)
        return sorted(set(images) & set(masks))
    valid = sorted(spec.splits) + ([] if "all" in spec.splits else ["all"])
    raise ValueError(
        f"{spec.root}: split {split!r} is not defined (no {SPLITS_DIR}/{split}.txt and no entry in "
        f"{CLASSES_FILE}); expected one of {', '.join(valid)}"
    )


@register_dataset("folder")
class FolderDataset(SegmentationDataset):
    """A dataset in the folder format. ``intensity`` (option): ``range`` or ``percentile`` scaling of 16-bit images."""

    def __init__(
        self, root: str | Path, split: str = "train", *, transform: Any = None, seed: int = 0, intensity: str = "range"
    ) -> None:
        if intensity not in SCALINGS:
            raise ValueError(f"data.options.intensity: {intensity!r}; expected one of {', '.join(SCALINGS)}")
        spec = read_folder_spec(root)
        images = index_files(spec.root / IMAGES_DIR, IMAGE_SUFFIXES)
        masks = index_files(spec.root / MASKS_DIR, MASK_SUFFIXES)
        stems = split_stems(spec, split, images, masks)
        if not stems:
            raise ValueError(f"{spec.root}: split {split!r} lists no files; expected at least one stem")
        samples = []
        for stem in stems:
            if stem not in images:
                raise FileNotFoundError(
                    f"{spec.root / IMAGES_DIR / stem}.*: no image for stem {stem!r} of split "
                    f"{split!r}; expected one of the suffixes {', '.join(IMAGE_SUFFIXES)}"
                )
            if stem not in masks:
                raise FileNotFoundError(
                    f"{spec.root / MASKS_DIR / stem}.png: no mask for stem {stem!r} of split {split!r}"
                )
            samples.append(SampleRecord(stem, images[stem], masks[stem]))
        self.spec = spec
        self.split = split
        self.intensity = intensity
        super().__init__(spec.info(), samples, transform=transform, seed=seed)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        return read_image(rec.image, scaling=self.intensity), read_label(rec.label)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_classes_yaml(
    root: str | Path,
    class_names: Sequence[str],
    palette: np.ndarray | Sequence[Sequence[int]],
    *,
    ignore_index: int = 255,
    name: str | None = None,
    description: str | None = None,
) -> Path:
    """Write ``root/classes.yaml`` (split lists go to ``splits/*.txt`` with :func:`write_split`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(pal) != len(class_names):
        raise ValueError(f"{root / CLASSES_FILE}: {len(pal)} colours for {len(class_names)} classes; expected one each")
    data: dict[str, Any] = {}
    if name:
        data["name"] = name
    if description:
        data["description"] = description
    data["classes"] = [{"name": n, "color": [int(c) for c in col]} for n, col in zip(class_names, pal)]
    data["ignore_index"] = int(ignore_index)
    path = root / CLASSES_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return path


def write_split(root: str | Path, split: str, stems: Iterable[str]) -> Path:
    """Write ``root/splits/<split>.txt``, one stem per line."""
    path = Path(root) / SPLITS_DIR / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\n" for s in stems))
    return path


def write_sample(
    root: str | Path,
    stem: str,
    image: np.ndarray,
    label: np.ndarray,
    palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    *,
    image_suffix: str = ".png",
) -> None:
    """Write ``images/<stem><image_suffix>`` and the index mask ``masks/<stem>.png``."""
    root = Path(root)
    if image.shape[:2] != label.shape:
        raise ValueError(f"sample {stem!r}: label {label.shape} and image {image.shape[:2]} sizes differ")
    write_image(root / IMAGES_DIR / f"{stem}{image_suffix}", image)
    write_index_png(root / MASKS_DIR / f"{stem}.png", label, palette)
