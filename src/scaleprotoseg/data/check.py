"""``scaleprotoseg data check``: read every file of a dataset before training and report every problem.

A folder dataset is checked file by file: classes.yaml, each split list (missing or empty), each listed stem
(image and mask present), each image (fully decoded, so truncated files are caught), each mask (an index image, not
RGB; same size as its image; values among the classes or the ignore index). Grayscale, 16-bit and RGBA images are
fine (loading converts them). Other registered datasets are checked by loading every sample of the train and val
splits through their loader.

The label content is checked per split as well (:func:`content_findings`): the pixels of each class are counted, and
a class that never occurs in a split, an ignore index covering most pixels, or masks holding only the values 0 and
255 while 255 is the ignore index (binary masks saved as 0/255: every foreground pixel would be ignored) are reported.

:func:`preflight` is the fast variant ``train`` runs before its first step: headers only (opens, size, mode,
complete file) for every train and val file, and the label values of a sample of masks (``data.preflight_labels``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from scaleprotoseg.data.io import IMAGE_SUFFIXES, MASK_SUFFIXES, printable, read_image, read_label

if TYPE_CHECKING:
    from scaleprotoseg.config import Config, DataConfig


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: str
    message: str

    def __str__(self) -> str:
        return printable(f"{self.path}: {self.message}")


MOSTLY_IGNORED = 0.5  # a split whose ignore pixels exceed this fraction is reported


@dataclass
class CheckReport:
    """Problems plus what was looked at (for the summary line) and the label content of each split."""

    problems: list[Problem]
    samples: int = 0
    splits: int = 0
    class_names: list[str] = field(default_factory=list)
    ignore_index: int = 255
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # split -> label value -> pixels
    findings: list[Problem] = field(default_factory=list)  # content findings (content_findings)

    def summary(self, *, findings_fail: bool = True) -> str:
        n = len(self.problems) + (len(self.findings) if findings_fail else 0)
        status = "OK" if not n else f"{n} problem(s)"
        if self.findings and not findings_fail:
            status += f", {len(self.findings)} warning(s)"
        return f"data check: {self.samples} sample(s) in {self.splits} split(s): {status}"

    def count_lines(self) -> list[str]:
        """The pixels of every class (and of the ignore index) per split, one line per split."""
        lines = []
        for split, counts in self.counts.items():
            total = sum(counts.values()) or 1
            parts = [
                f"{name} {counts.get(c, 0)} ({100 * counts.get(c, 0) / total:.1f}%)"
                for c, name in enumerate(self.class_names)
            ]
            ign = counts.get(self.ignore_index, 0)
            parts.append(f"ignore({self.ignore_index}) {ign} ({100 * ign / total:.1f}%)")
            lines.append(printable(f"  pixels in {split}: " + ", ".join(parts)))
        return lines


def content_findings(report: CheckReport, where: dict[str, str]) -> list[Problem]:
    """Per split (``where``: split -> the file that defines it): classes with no pixel, an ignore index covering
    more than half of the pixels, and masks holding only 0 and 255 while 255 is the ignore index."""
    found = []
    names, ign = report.class_names, report.ignore_index
    for split, counts in report.counts.items():
        total = sum(counts.values())
        if not total:
            continue
        values = {v for v, n in counts.items() if n}
        path = where.get(split, split)
        if ign == 255 and values == {0, 255} and len(names) >= 2:
            found.append(
                Problem(
                    path,
                    f"split {split!r}: every mask holds only the values 0 and 255, and 255 is the ignore index, so "
                    f"every foreground pixel would be ignored; expected class indices 0..{len(names) - 1} (binary "
                    "masks saved as 0/255? re-save them as 0/1)",
                )
            )
            continue
        if counts.get(ign, 0) > MOSTLY_IGNORED * total:
            found.append(
                Problem(
                    path,
                    f"split {split!r}: the ignore index {ign} covers {100 * counts[ign] / total:.0f}% of the pixels; "
                    f"expected at most {100 * MOSTLY_IGNORED:.0f}% (is ignore_index right?)",
                )
            )
        absent = [f"{n!r} ({c})" for c, n in enumerate(names) if not counts.get(c, 0)]
        if absent:
            found.append(
                Problem(
                    path,
                    f"split {split!r}: class(es) {', '.join(absent)} never occur (0 pixels); expected every class "
                    "in every split",
                )
            )
    return found


def _add_counts(report: CheckReport, splits: list[str], label: np.ndarray) -> None:
    values, counts = np.unique(label, return_counts=True)
    for split in splits:
        acc = report.counts.setdefault(split, {})
        for v, n in zip(values.tolist(), counts.tolist()):
            acc[int(v)] = acc.get(int(v), 0) + int(n)


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

    report = CheckReport([], splits=len(splits), ignore_index=data_cfg.ignore_index)
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
        report.class_names, report.ignore_index = list(ds.info.class_names), ds.info.ignore_index
        for i in tqdm(
            range(len(ds)), desc=f"check {split}", disable=None if progress else True, dynamic_ncols=True, leave=False
        ):
            report.samples += 1
            try:
                image, label, _ = ds.load_raw(i)
                _add_counts(report, [split], label)
                if ds.has_parts:
                    parts = ds.load_parts(i)
                    if parts.shape != label.shape:
                        raise ValueError(f"part map size {parts.shape} differs from label size {label.shape}")
            except Exception as err:  # every failure of one sample is reported, the check goes on
                files = " / ".join(str(p) for p in ds.sample_files(i))
                report.problems.append(Problem(files, _strip_path(str(err), Path(files))))
    report.findings = content_findings(report, {sp: f"{data_cfg.root} ({sp})" for sp in splits})
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
    report.class_names, report.ignore_index = list(spec.class_names), spec.ignore_index
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
        problems, label = _check_pair(spec, images[stem], masks[stem])
        report.problems.extend(problems)
        if label is not None:
            _add_counts(report, to_check[stem], label)
    report.counts = {sp: report.counts[sp] for sp in names if sp in report.counts}
    report.findings = content_findings(report, {sp: _split_where(spec, sp) for sp in names})
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


def _read_pair(
    image_path: Path, mask_path: Path, read_image_fn: Callable[[Path], Any], read_mask_fn: Callable[[Path], Any]
) -> tuple[list[Problem], Any, Any]:
    """Read an image and its mask with the given readers; problems name the file that failed (mask None then)."""
    problems: list[Problem] = []
    image = mask = None
    try:
        image = read_image_fn(image_path)
    except (OSError, ValueError) as err:
        problems.append(Problem(str(image_path), _strip_path(str(err), image_path)))
    try:
        mask = read_mask_fn(mask_path)
    except (OSError, ValueError) as err:
        problems.append(Problem(str(mask_path), _strip_path(str(err), mask_path)))
    return problems, image, mask


def _size_problem(mask_path: Path, image_path: Path, mask_wh: tuple[int, int], image_wh: tuple[int, int]) -> Problem:
    return Problem(
        str(mask_path),
        f"label size {mask_wh[0]}x{mask_wh[1]} differs from image size {image_wh[0]}x{image_wh[1]} "
        f"({image_path.name}); expected equal sizes (width x height)",
    )


def _check_pair(spec: FolderSpec, image_path: Path, mask_path: Path) -> tuple[list[Problem], np.ndarray | None]:
    """Problems of one image/mask pair, and the mask (None when unreadable)."""
    problems, image, label = _read_pair(image_path, mask_path, read_image, read_label)
    if label is None:
        return problems, None
    if image is not None and label.shape != image.shape[:2]:
        problems.append(_size_problem(mask_path, image_path, label.shape[::-1], image.shape[1::-1]))
    problems += _label_value_problems(spec, mask_path, label)
    return problems, label


def _label_value_problems(spec: FolderSpec, mask_path: Path, label: np.ndarray) -> list[Problem]:
    """A problem when ``label`` holds values that are neither a class index nor the ignore index."""
    num = len(spec.class_names)
    bad = ((label < 0) | (label >= num)) & (label != spec.ignore_index)
    if not bad.any():
        return []
    values = np.unique(label[bad])
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    where = f"the classes 0..{num - 1} (ignore index {spec.ignore_index}) of {CLASSES_FILE}"
    message = f"label values {shown} are outside {where}"
    return [Problem(str(mask_path), message)]


# ----------------------------------------------------------------------------------------------------------------
# Pre-flight check before training


class PreflightError(ValueError):
    """The pre-flight check found problems; the message names the first one and how many there are."""


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all when ``k`` is -1 or >= n; none when 0)."""
    if k < 0 or k >= n:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)}) if k else []


def _header_pair(image_path: Path, mask_path: Path) -> list[Problem]:
    from scaleprotoseg.data.io import read_header

    problems, head, mhead = _read_pair(image_path, mask_path, read_header, read_header)
    if mhead is None:
        return problems
    if mhead.channels != 1 or not (mhead.mode in _MASK_MODES or mhead.mode.startswith("tiff:")):
        problems.append(
            Problem(
                str(mask_path),
                f"mask is {mhead.mode} ({mhead.channels} channels); expected a single-channel index image "
                "(PNG mode L or P) whose pixel values are class indices",
            )
        )
    if head is not None and (head.width, head.height) != (mhead.width, mhead.height):
        problems.append(_size_problem(mask_path, image_path, (mhead.width, mhead.height), (head.width, head.height)))
    return problems


_MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def preflight(data_cfg: DataConfig, *, progress: bool = False) -> list[Problem]:
    """Fast problems of the train and val splits of ``data_cfg``, before training starts.

    Every listed file's header is read (it opens, is complete, is not too large; masks are single-channel and as
    large as their image), and ``data_cfg.preflight_labels`` masks per split (spread over it; -1: all) are decoded
    to check their values against the classes. For a folder dataset of a few thousand images this takes seconds.
    Registered datasets are checked through their loader on the same sample of items (their files are listed by
    ``sample_files``; headers of those with an image suffix are read too).
    """
    if not data_cfg.preflight:
        return []
    splits = list(dict.fromkeys([data_cfg.train_split, data_cfg.val_split]))
    limits = {data_cfg.train_split: data_cfg.max_train_samples, data_cfg.val_split: data_cfg.max_val_samples}
    if data_cfg.name != "folder":
        return _preflight_registered(data_cfg, splits, limits)
    root = Path(data_cfg.root)
    try:
        spec = read_folder_spec(root)
        images = index_files(root / IMAGES_DIR, IMAGE_SUFFIXES)
        masks = index_files(root / MASKS_DIR, MASK_SUFFIXES)
    except (OSError, ValueError) as err:
        return [Problem(str(root / CLASSES_FILE), _strip_path(str(err), root / CLASSES_FILE))]
    problems: list[Problem] = []
    headers_done: set[str] = set()
    labels_done: set[str] = set()
    for split in splits:
        where = _split_where(spec, split)
        try:
            stems = split_stems(spec, split, images, masks)
        except (OSError, ValueError) as err:
            problems.append(Problem(where, _strip_path(str(err), Path(where))))
            continue
        if limits.get(split, 0) > 0:
            stems = stems[: limits[split]]
        missing = [s for s in stems if s not in images or s not in masks]
        for stem in missing:
            kind = "image" if stem not in images else "mask"
            problems.append(Problem(where, f"no {kind} for stem {stem!r} listed in split {split!r}"))
        stems = [s for s in stems if s in images and s in masks]
        for stem in stems:
            if stem not in headers_done:
                headers_done.add(stem)
                problems += _header_pair(images[stem], masks[stem])
        for i in _spread(len(stems), data_cfg.preflight_labels):
            stem = stems[i]
            if stem in labels_done:
                continue
            labels_done.add(stem)
            try:
                label = read_label(masks[stem])
            except (OSError, ValueError) as err:
                problems.append(Problem(str(masks[stem]), _strip_path(str(err), masks[stem])))
                continue
            problems += _label_value_problems(spec, masks[stem], label)
    return list(dict.fromkeys(problems))


def _preflight_registered(data_cfg: DataConfig, splits: list[str], limits: dict[str, int]) -> list[Problem]:
    from scaleprotoseg.data.io import read_header
    from scaleprotoseg.data.registry import build_dataset

    problems: list[Problem] = []
    for split in splits:
        try:
            ds = build_dataset(data_cfg, split, train=False)
        except (OSError, ValueError) as err:
            problems.append(Problem(str(data_cfg.root), f"split {split!r}: {err}"))
            continue
        n = len(ds) if limits.get(split, 0) <= 0 else min(len(ds), limits[split])
        seen: set[Path] = set()
        for i in range(n):
            for f in ds.sample_files(i):
                if f in seen or f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                seen.add(f)
                try:
                    read_header(f)
                except (OSError, ValueError) as err:
                    problems.append(Problem(str(f), _strip_path(str(err), f)))
        for i in _spread(n, data_cfg.preflight_labels):
            try:
                ds.load_raw(i)
            except (OSError, ValueError) as err:
                files = " / ".join(str(p) for p in ds.sample_files(i))
                problems.append(Problem(files, _strip_path(str(err), Path(files))))
    return list(dict.fromkeys(problems))


def require_preflight(data_cfg: DataConfig, source: str = "config") -> None:
    """Run :func:`preflight` and raise :class:`PreflightError` (one line: the first problem, the count, what to do)."""
    problems = preflight(data_cfg)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise PreflightError(
            f"{problems[0]}{more}; run `scaleprotoseg data check {source}` to list every problem, or set "
            "data.preflight=false to skip this check"
        )
