"""``scaleprotoseg data check``: read every file of a dataset before training and report every problem.

A folder dataset is checked file by file: classes.yaml, each split list (missing or empty), each listed stem
(image and mask present), each image (fully decoded, so truncated files are caught), each mask (an index image, not
RGB; same size as its image; values among the classes or the ignore index). Grayscale, 16-bit and RGBA images are
fine (loading converts them). Other registered datasets are checked by loading every sample of the train and val
splits through their loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scaleprotoseg.data.folder import (
    CLASSES_FILE,
    IMAGES_DIR,
    MASKS_DIR,
    FolderSpec,
    index_files,
    read_folder_spec,
    split_stems,
)
from scaleprotoseg.data.io import IMAGE_SUFFIXES, MASK_SUFFIXES, read_image, read_label

if TYPE_CHECKING:
    from scaleprotoseg.config import Config, DataConfig


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CheckReport:
    """Problems plus what was looked at (for the summary line)."""

    problems: list[Problem]
    samples: int = 0
    splits: int = 0

    def summary(self) -> str:
        status = "OK" if not self.problems else f"{len(self.problems)} problem(s)"
        return f"data check: {self.samples} sample(s) in {self.splits} split(s): {status}"


def check_dataset(
    target: str | Path | Config | DataConfig, *, splits: list[str] | None = None, progress: bool = True
) -> list[Problem]:
    """Problems found in a folder dataset (a folder, or its classes.yaml), a config file, a Config or a DataConfig.

    ``splits`` restricts the check (default: every split of a folder dataset; the train and val splits of a config).
    """
    return run_check(target, splits=splits, progress=progress).problems


def run_check(
    target: str | Path | Config | DataConfig, *, splits: list[str] | None = None, progress: bool = True
) -> CheckReport:
    """Like :func:`check_dataset`, with counts for a summary."""
    from scaleprotoseg.config import Config, DataConfig, load_config

    if isinstance(target, Config):
        target = target.data
    if isinstance(target, DataConfig):
        return _check_data_config(target, splits, progress)
    path = Path(target)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml") and path.name != CLASSES_FILE:
        return _check_data_config(load_config(path).data, splits, progress)
    if path.is_file() and path.name == CLASSES_FILE:
        path = path.parent
    if not path.exists():
        return CheckReport([Problem(str(path), "does not exist; expected a dataset folder or a config file")])
    return check_folder(path, splits=splits, progress=progress)


def _check_data_config(data_cfg: DataConfig, splits: list[str] | None, progress: bool) -> CheckReport:
    wanted = splits or list(dict.fromkeys([data_cfg.train_split, data_cfg.val_split]))
    if data_cfg.name == "folder":
        if not data_cfg.root:
            return CheckReport([Problem("data.root", "is empty; expected the dataset folder")])
        return check_folder(Path(data_cfg.root), splits=wanted, progress=progress)
    return check_registered(data_cfg, wanted, progress=progress)


def check_registered(data_cfg: DataConfig, splits: list[str], *, progress: bool = True) -> CheckReport:
    """Load every sample of ``splits`` of a registered dataset through its loader; each failure is a problem."""
    from tqdm import tqdm

    from scaleprotoseg.data.registry import get_dataset_class

    report = CheckReport([], splits=len(splits))
    try:
        cls = get_dataset_class(data_cfg.name)
    except ValueError as err:
        report.problems.append(Problem("data.name", str(err)))
        return report
    for split in splits:
        try:
            ds = cls.from_config(data_cfg, split) if hasattr(cls, "from_config") else cls(data_cfg, split)
        except (OSError, ValueError) as err:
            report.problems.append(Problem(str(data_cfg.root), f"split {split!r}: {err}"))
            continue
        if len(ds) == 0:
            report.problems.append(Problem(str(data_cfg.root), f"split {split!r} has no files"))
            continue
        for i in tqdm(
            range(len(ds)), desc=f"check {split}", disable=None if progress else True, dynamic_ncols=True, leave=False
        ):
            report.samples += 1
            try:
                image, label, _ = ds.load_raw(i)
                if ds.has_parts:
                    parts = ds.load_parts(i)
                    if parts.shape != label.shape:
                        raise ValueError(f"part map size {parts.shape} differs from label size {label.shape}")
            except Exception as err:  # every failure of one sample is reported, the check goes on
                files = " / ".join(str(p) for p in ds.sample_files(i))
                report.problems.append(Problem(files, _strip_path(str(err), Path(files))))
    return report


def check_folder(root: Path, *, splits: list[str] | None = None, progress: bool = True) -> CheckReport:
    """Check a folder dataset file by file (see the module docstring)."""
    from tqdm import tqdm

    report = CheckReport([])
    add = report.problems.append
    try:
        spec = read_folder_spec(root)
    except (OSError, ValueError) as err:
        add(Problem(str(root / CLASSES_FILE), _strip_path(str(err), root / CLASSES_FILE)))
        return report
    try:
        images = index_files(root / IMAGES_DIR, IMAGE_SUFFIXES)
        masks = index_files(root / MASKS_DIR, MASK_SUFFIXES)
    except ValueError as err:
        add(Problem(str(root), str(err)))
        return report
    if not (root / IMAGES_DIR).is_dir():
        add(Problem(str(root / IMAGES_DIR), "folder does not exist; expected the images"))
    if not (root / MASKS_DIR).is_dir():
        add(Problem(str(root / MASKS_DIR), "folder does not exist; expected the index masks"))
    names = splits if splits else sorted(spec.splits)
    if not names:
        add(
            Problem(
                str(root / "splits"), f"no split lists; expected splits/<split>.txt files or 'splits' in {CLASSES_FILE}"
            )
        )
    report.splits = len(names)
    to_check: dict[str, list[str]] = {}
    for split in names:
        where = _split_where(spec, split)
        try:
            stems = split_stems(spec, split, images, masks)
        except (OSError, ValueError) as err:
            add(Problem(where, _strip_path(str(err), Path(where))))
            continue
        if not stems:
            add(Problem(where, f"split {split!r} lists no files; expected at least one stem"))
            continue
        for stem in stems:
            if stem not in images:
                add(
                    Problem(
                        str(root / IMAGES_DIR / stem) + ".*",
                        f"no image for stem {stem!r} listed in split {split!r} ({where})",
                    )
                )
            if stem not in masks:
                add(
                    Problem(
                        str(root / MASKS_DIR / stem) + ".png",
                        f"no mask for stem {stem!r} listed in split {split!r} ({where})",
                    )
                )
            if stem in images and stem in masks:
                to_check.setdefault(stem, []).append(split)
    for stem in tqdm(
        sorted(to_check), desc="check", disable=None if progress else True, dynamic_ncols=True, leave=False
    ):
        report.samples += 1
        report.problems.extend(_check_pair(spec, images[stem], masks[stem]))
    return report


def _split_where(spec: FolderSpec, split: str) -> str:
    value = spec.splits.get(split)
    if isinstance(value, Path):
        return str(value)
    if value is not None:
        return f"{spec.root / CLASSES_FILE} (splits.{split})"
    return str(spec.root / "splits" / f"{split}.txt")


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _check_pair(spec: FolderSpec, image_path: Path, mask_path: Path) -> list[Problem]:
    problems: list[Problem] = []
    image = None
    try:
        image = read_image(image_path)
    except (OSError, ValueError) as err:
        problems.append(Problem(str(image_path), _strip_path(str(err), image_path)))
    try:
        label = read_label(mask_path)
    except (OSError, ValueError) as err:
        problems.append(Problem(str(mask_path), _strip_path(str(err), mask_path)))
        return problems
    if image is not None and label.shape != image.shape[:2]:
        problems.append(
            Problem(
                str(mask_path),
                f"label size {label.shape[1]}x{label.shape[0]} differs from image "
                f"size {image.shape[1]}x{image.shape[0]} ({image_path.name}); "
                "expected equal sizes (width x height)",
            )
        )
    num = len(spec.class_names)
    bad = ((label < 0) | (label >= num)) & (label != spec.ignore_index)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        problems.append(
            Problem(
                str(mask_path),
                f"label values {shown} are outside the classes 0..{num - 1} "
                f"(ignore index {spec.ignore_index}) of {CLASSES_FILE}",
            )
        )
    return problems
