"""Files a run exported for its explanations: prototype patches (``final/prototypes/``) and nearest training patches
(``final/nearest/``), checked against the model they are used with.

A gallery built for one prototype numbering (``final/``) must not be used with a checkpoint of another numbering
(e.g. ``--stage joint``, before duplicate removal / pruning): every entry's class and scale must match the model's,
otherwise the gallery is disabled and the views fall back to placeholders, saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NearestGallery", "PrototypeGallery", "load_galleries"]


def _read_png(path: Path) -> np.ndarray | None:
    try:
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception:
        return None


def _layout(head: Any) -> tuple[list[int], list[int]]:
    return head.prototype_class.detach().cpu().tolist(), head.prototype_scale.detach().cpu().tolist()


@dataclass
class PrototypeGallery:
    """Projected training patches of the prototypes: ``patch(p)`` (uint8 RGB or ``None``) and ``source(p)``."""

    directory: Path | None
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.entries)

    def path(self, p: int) -> Path | None:
        e = self.entries.get(int(p))
        if e is None or self.directory is None:
            return None
        f = self.directory / str(e["file"])
        return f if f.is_file() else None

    def patch(self, p: int) -> np.ndarray | None:
        f = self.path(p)
        return None if f is None else _read_png(f)

    def source(self, p: int) -> dict[str, Any] | None:
        e = self.entries.get(int(p))
        return None if e is None else e.get("source")

    @classmethod
    def load(cls, directory: str | Path | None, head: Any) -> PrototypeGallery:
        """Read ``directory/manifest.json`` (``save_prototype_patches``) and keep it if it fits ``head``."""
        if directory is None:
            return cls(None, problem="no run directory given: prototype patches are shown as placeholders")
        d = Path(directory)
        man = d / "manifest.json"
        if not man.is_file():
            return cls(d, problem=f"{man} does not exist: prototype patches are shown as placeholders")
        try:
            entries = {int(e["prototype"]): e for e in json.loads(man.read_text())["prototypes"]}
        except Exception as err:
            return cls(d, problem=f"{man} could not be read ({err})")
        pcls, pscale = _layout(head)
        bad = [
            p
            for p, e in entries.items()
            if p >= len(pcls) or int(e["class"]) != pcls[p] or int(e["scale"]) != pscale[p]
        ]
        if bad:
            return cls(
                d,
                problem=f"{man} was written for another prototype numbering (prototypes {bad[:5]} differ "
                "in class or scale from the model); patches are shown as placeholders",
            )
        return cls(d, entries)


@dataclass
class NearestGallery:
    """Precomputed nearest training patches of prototypes (``explain.nearest.export_nearest_patches``)."""

    directory: Path | None
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None
    k: int = 0

    @property
    def available(self) -> bool:
        return bool(self.entries)

    def patches(self, p: int) -> list[dict[str, Any]]:
        e = self.entries.get(int(p))
        return [] if e is None else list(e.get("patches", []))

    def image(self, name: str) -> np.ndarray | None:
        if self.directory is None:
            return None
        f = self.directory / name
        return _read_png(f) if f.is_file() else None

    @classmethod
    def load(cls, directory: str | Path | None, head: Any) -> NearestGallery:
        if directory is None:
            return cls(None, problem="no run directory given: nearest training patches are not available")
        d = Path(directory)
        man = d / "manifest.json"
        if not man.is_file():
            return cls(d, problem=f"{man} does not exist (runs trained before nearest-patch export have none)")
        try:
            data = json.loads(man.read_text())
        except Exception as err:
            return cls(d, problem=f"{man} could not be read ({err})")
        pcls, pscale = _layout(head)
        if list(data.get("prototype_class", [])) != pcls or list(data.get("prototype_scale", [])) != pscale:
            return cls(d, problem=f"{man} was written for another prototype numbering than this model's")
        entries = {int(e["prototype"]): e for e in data.get("prototypes", [])}
        return cls(d, entries, k=int(data.get("k", 0)))


def load_galleries(run_dir: str | Path | None, head: Any) -> tuple[PrototypeGallery, NearestGallery]:
    """Both galleries of ``run_dir/final`` for ``head``."""
    final = None if run_dir is None else Path(run_dir) / "final"
    return (
        PrototypeGallery.load(None if final is None else final / "prototypes", head),
        NearestGallery.load(None if final is None else final / "nearest", head),
    )
