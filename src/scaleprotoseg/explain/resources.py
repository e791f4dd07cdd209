"""Files a run exported for its explanations: prototype patches (``final/prototypes/``) and nearest training patches
(``final/nearest/``), written from the model of ``final/``.

They are read only for that model: ``final/`` itself, or the stage checkpoint ``final/`` was exported from (the same
weights). Any other checkpoint (e.g. ``--stage joint``, before duplicate removal or pruning) has no galleries, so
the views fall back to placeholders, saying why; a gallery never meets a model of another prototype numbering.

A manifest names its files relative to its folder; every name must resolve (following symbolic links) inside the run
directory, else :class:`RunPathError` is raised: a run copied from elsewhere cannot make ``report`` or ``explain``
read or copy files from outside it (``/etc/...``, ``../..``, a link).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.rundir import FINAL, RunDir

__all__ = ["NearestGallery", "PrototypeGallery", "RunPathError", "confine", "load_galleries"]


class RunPathError(ValueError):
    """A file named by (or found in) a run directory resolves outside it."""


def confine(path: Path, root: Path, source: str | Path | None = None) -> Path:
    """``path`` when it resolves (links followed) inside ``root``; else :class:`RunPathError` naming ``source``."""
    from scaleprotoseg.data.io import printable

    real, base = Path(path).resolve(), Path(root).resolve()
    if real == base or real.is_relative_to(base):
        return Path(path)
    where = f"{printable(source)}: " if source is not None else ""
    raise RunPathError(
        f"{where}{printable(path)} resolves to {printable(real)}, outside the run directory {printable(base)}; "
        "expected a file inside the run"
    )


def _read_png(path: Path) -> np.ndarray | None:
    try:
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception:
        return None


def _read_manifest(
    directory: Path, missing: str, root: Path | None = None
) -> tuple[dict[int, dict[str, Any]], dict[str, Any], str | None]:
    """(entries by prototype, the whole manifest, problem) of ``directory/manifest.json``; ``missing`` completes the
    problem when the file does not exist. The manifest must resolve inside ``root`` (:class:`RunPathError`)."""
    man = directory / "manifest.json"
    if not man.is_file():
        return {}, {}, f"{man} does not exist{missing}"
    confine(man, root or directory)
    try:
        data = json.loads(man.read_text())
        return {int(e["prototype"]): e for e in data["prototypes"]}, data, None
    except Exception as err:
        return {}, {}, f"{man} could not be read ({err})"


@dataclass
class PrototypeGallery:
    """Projected training patches of the prototypes: ``patch(p)`` (uint8 RGB or ``None``) and ``source(p)``."""

    directory: Path | None
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None
    root: Path | None = None  # the run directory every file must resolve inside (default: ``directory``)

    @property
    def available(self) -> bool:
        return bool(self.entries)

    def path(self, p: int) -> Path | None:
        e = self.entries.get(int(p))
        if e is None or self.directory is None:
            return None
        f = confine(self.directory / str(e["file"]), self.root or self.directory, self.directory / "manifest.json")
        return f if f.is_file() else None

    def patch(self, p: int) -> np.ndarray | None:
        f = self.path(p)
        return None if f is None else _read_png(f)

    def source(self, p: int) -> dict[str, Any] | None:
        e = self.entries.get(int(p))
        return None if e is None else e.get("source")

    @classmethod
    def load(cls, directory: Path, root: Path | None = None) -> PrototypeGallery:
        """Read ``directory/manifest.json`` (``save_prototype_patches``); files must lie inside ``root``."""
        entries, _, problem = _read_manifest(directory, ": prototype patches are shown as placeholders", root)
        return cls(directory, entries, problem, root)


@dataclass
class NearestGallery:
    """Precomputed nearest training patches of prototypes (``explain.nearest.export_nearest_patches``)."""

    directory: Path | None
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None
    k: int = 0
    root: Path | None = None  # the run directory every file must resolve inside (default: ``directory``)

    @property
    def available(self) -> bool:
        return bool(self.entries)

    def patches(self, p: int) -> list[dict[str, Any]]:
        e = self.entries.get(int(p))
        return [] if e is None else list(e.get("patches", []))

    def image(self, name: str) -> np.ndarray | None:
        if self.directory is None:
            return None
        f = confine(self.directory / name, self.root or self.directory, self.directory / "manifest.json")
        return _read_png(f) if f.is_file() else None

    @classmethod
    def load(cls, directory: Path, root: Path | None = None) -> NearestGallery:
        """Read ``directory/manifest.json`` (``export_nearest_patches``); files must lie inside ``root``."""
        missing = " (runs trained before nearest-patch export have none)"
        entries, data, problem = _read_manifest(directory, missing, root)
        return cls(directory, entries, problem, k=int(data.get("k", 0)), root=root)


def _final_stage(run: RunDir) -> str | None:
    """The stage ``final/`` was exported from, or ``None`` when it cannot be read."""
    from scaleprotoseg.checkpoint import CheckpointMeta

    try:
        return CheckpointMeta.read(run.checkpoint().meta).stage
    except (OSError, ValueError):
        return None


def load_galleries(run_dir: str | Path | None, stage: str | None = None) -> tuple[PrototypeGallery, NearestGallery]:
    """Both galleries of the model of ``run_dir`` at ``stage`` (``final/`` by default; see the module docstring)."""
    if run_dir is None:
        return (
            PrototypeGallery(None, problem="no run directory given: prototype patches are shown as placeholders"),
            NearestGallery(None, problem="no run directory given: nearest training patches are not available"),
        )
    run = RunDir(run_dir)
    final = run.checkpoint()
    if stage not in (None, FINAL) and _final_stage(run) != stage:
        why = f"the checkpoint of stage {stage!r} has none (only the model of {final.path} has)"
        return (
            PrototypeGallery(None, problem=f"prototype patches: {why}; they are shown as placeholders"),
            NearestGallery(None, problem=f"nearest training patches: {why}"),
        )
    return PrototypeGallery.load(final.prototypes, run.root), NearestGallery.load(final.nearest, run.root)
