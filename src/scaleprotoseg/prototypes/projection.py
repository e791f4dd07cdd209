"""Prototype projection ("push") and duplicate removal (paper section 3.3, Stage 1).

- :func:`project_prototypes`: every prototype becomes the nearest feature vector *of its own scale* among the
  training cells *of its own class* (ProtoPNet's push, done per scale for ScaleProtoSeg): the best-k search of
  :mod:`scaleprotoseg.prototypes.streaming` with k = 1, so streaming, deterministic (ties broken by (distance,
  dataset index, cell index)) and sharded under ``torch.distributed`` with the single-process result on every rank.
- :func:`apply_projection` writes the vectors into the model; :func:`remove_duplicates` then drops exact
  duplicates (same scale, bitwise-identical vector), as the paper does after projection.
- :func:`save_prototype_patches`: the receptive-field crop of each projected prototype as a PNG, plus a manifest
  (boxes: :mod:`scaleprotoseg.prototypes.boxes`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scaleprotoseg.prototypes.boxes import scale_box
from scaleprotoseg.prototypes.streaming import ImageMaps, best_k, prototype_head, smallest_cells, unwrap


@dataclass
class PrototypeSource:
    """Where a projected prototype came from.

    ``cell`` is (row, col) on the feature grid; ``box`` is (y0, x0, y1, x1) in pixels of the image as the model saw
    it (``image_size`` = (H, W)), the ASPP receptive field without the backbone's (module docstring).
    """

    dataset_index: int
    name: str
    scale: int
    cell: tuple[int, int]
    distance: float
    box: tuple[int, int, int, int]
    image_size: tuple[int, int]
    class_index: int = -1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cell"], d["box"], d["image_size"] = list(self.cell), list(self.box), list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrototypeSource:
        return cls(
            dataset_index=int(d["dataset_index"]),
            name=str(d["name"]),
            scale=int(d["scale"]),
            cell=(int(d["cell"][0]), int(d["cell"][1])),
            distance=float(d["distance"]),
            box=tuple(int(v) for v in d["box"]),  # type: ignore[arg-type]
            image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
            class_index=int(d.get("class_index", -1)),
        )


@dataclass
class ProjectionResult:
    """Outcome of :func:`project_prototypes`, indexed like the model's prototypes.

    vectors: (P, D) projected vectors (``None`` after :meth:`from_json`: vectors live in the model weights).
    sources: one :class:`PrototypeSource` per prototype, ``None`` when its class has no labelled cell.
    distances: (P,) squared distance between the old prototype and its new vector (``inf`` without a source).
    prototype_class, prototype_scale: (P,) int64 bookkeeping at projection time.
    """

    vectors: torch.Tensor | None
    sources: list[PrototypeSource | None]
    distances: torch.Tensor
    prototype_class: torch.Tensor
    prototype_scale: torch.Tensor

    @property
    def num_prototypes(self) -> int:
        return len(self.sources)

    def select(self, keep: Sequence[int] | torch.Tensor) -> ProjectionResult:
        """The result restricted to ``keep`` (old numbering), in that order: follows duplicate removal/pruning."""
        idx = torch.as_tensor(keep, dtype=torch.long).flatten()
        return ProjectionResult(
            vectors=None if self.vectors is None else self.vectors.index_select(0, idx).clone(),
            sources=[self.sources[i] for i in idx.tolist()],
            distances=self.distances.index_select(0, idx).clone(),
            prototype_class=self.prototype_class.index_select(0, idx).clone(),
            prototype_scale=self.prototype_scale.index_select(0, idx).clone(),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: for each prototype its class, scale, distance and source (no vectors)."""
        protos = []
        for i, src in enumerate(self.sources):
            d = float(self.distances[i])
            protos.append(
                {
                    "index": i,
                    "class": int(self.prototype_class[i]),
                    "scale": int(self.prototype_scale[i]),
                    "distance": d if math.isfinite(d) else None,
                    "source": None if src is None else src.to_dict(),
                }
            )
        return {"version": 1, "num_prototypes": self.num_prototypes, "prototypes": protos}

    @classmethod
    def from_dict(cls, d: dict[str, Any], vectors: torch.Tensor | None = None) -> ProjectionResult:
        protos = sorted(d["prototypes"], key=lambda p: p["index"])
        return cls(
            vectors=vectors,
            sources=[None if p["source"] is None else PrototypeSource.from_dict(p["source"]) for p in protos],
            distances=torch.tensor(
                [math.inf if p["distance"] is None else float(p["distance"]) for p in protos], dtype=torch.float32
            ),
            prototype_class=torch.tensor([int(p["class"]) for p in protos], dtype=torch.long),
            prototype_scale=torch.tensor([int(p["scale"]) for p in protos], dtype=torch.long),
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, vectors: torch.Tensor | None = None) -> ProjectionResult:
        return cls.from_dict(json.loads(text), vectors)

    def save(self, path: str | Path) -> None:
        """Write ``projection.json`` (sources only)."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path, vectors: torch.Tensor | None = None) -> ProjectionResult:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"projection file {p} does not exist; expected a projection.json")
        return cls.from_json(p.read_text(), vectors)


@dataclass
class DuplicateReport:
    """Exact-duplicate removal: ``kept`` and ``removed`` in the old numbering; ``duplicate_of[r]`` is the kept
    prototype (old numbering) that removed prototype ``r`` duplicated."""

    kept: list[int]
    removed: list[int]
    duplicate_of: dict[int, int]
    num_before: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_before": self.num_before,
            "num_after": len(self.kept),
            "kept": self.kept,
            "removed": self.removed,
            "duplicate_of": {str(k): v for k, v in self.duplicate_of.items()},
        }


@torch.no_grad()
def project_prototypes(
    model: nn.Module,
    dataset: Any,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> ProjectionResult:
    """Stage-1 projection (section 3.3; ProtoPNet's push): the nearest same-class training feature of each
    prototype's own scale.

    For every image (batch size 1, whole image), labels are downsampled (nearest) to the feature grid; the model's
    ``distances`` (already per scale) are masked to the cells of each prototype's class (ignore cells never count),
    and only the best (distance, vector, source) per prototype is kept. Ties go to the smallest (distance, dataset
    index, cell index), so the result does not depend on the order of the data. Under an initialised
    ``torch.distributed`` (or ``distributed=True``) each rank scans ``rank::world_size`` and the per-rank bests are
    merged with the same rule: every rank returns the single-process result. The model (already on ``device``)
    runs in eval mode; its training flag is restored afterwards. Prototypes whose class has no labelled cell keep
    their vector, get ``source=None`` and a warning. The model is not modified: call :func:`apply_projection`.
    """
    device = torch.device(device)
    head = prototype_head(unwrap(model))
    cls = head.prototype_class.to(device)
    scale = head.prototype_scale.to(device)
    num_scales = head.num_scales
    old = head.prototypes.prototypes.detach()
    D = old.shape[1]

    def own_class_cell(maps: ImageMaps) -> tuple[torch.Tensor, torch.Tensor]:
        own = maps.grid_label.unsqueeze(0) == cls.unsqueeze(1)
        return smallest_cells(torch.where(own, maps.distances, math.inf), 1)

    def vectors(maps: ImageMaps, cells: torch.Tensor, enters: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = maps.grid  # each prototype's own scale at its chosen cell: (P, 1, D)
        return {"vector": maps.features.reshape(num_scales, D, h * w)[scale, :, cells[:, 0]].float().unsqueeze(1)}

    best = best_k(
        model,
        dataset,
        k=1,
        propose=own_class_cell,
        fill=vectors,
        initial={"vector": old.to(device, torch.float32).unsqueeze(1).clone()},
        device=device,
        num_workers=num_workers,
        progress=progress,
        desc="projection",
        distributed=distributed,
    )
    cls_l, scale_l = cls.tolist(), scale.tolist()
    sources: list[PrototypeSource | None] = [
        None
        if bool(best.empty[p, 0])
        else PrototypeSource(
            dataset_index=int(best.dataset_indices[p, 0]),
            name=str(best.names[p][0]),
            scale=scale_l[p],
            cell=(int(best.cells[p, 0, 0]), int(best.cells[p, 0, 1])),
            distance=float(best.distances[p, 0]),
            box=tuple(int(v) for v in best.boxes[p, 0]),  # type: ignore[arg-type]
            image_size=(int(best.image_sizes[p, 0, 0]), int(best.image_sizes[p, 0, 1])),
            class_index=cls_l[p],
        )
        for p in range(len(cls_l))
    ]
    missing = [p for p, s in enumerate(sources) if s is None]
    if missing and best.rank == 0:
        classes = sorted({cls_l[p] for p in missing})
        warnings.warn(
            f"projection: prototypes {missing} (classes {classes}) have no labelled cell of their class in the "
            "dataset; their vectors are kept unchanged and their source is None",
            stacklevel=2,
        )
    return ProjectionResult(
        vectors=best.payload["vector"][:, 0].to(old.dtype),
        sources=sources,
        distances=best.distances[:, 0].float(),
        prototype_class=cls.cpu().clone(),
        prototype_scale=scale.cpu().clone(),
    )


@torch.no_grad()
def apply_projection(model: nn.Module, result: ProjectionResult) -> None:
    """Copy the projected vectors into the model's prototype parameter (in place; prototypes without a source keep
    their vector, which :func:`project_prototypes` already left unchanged)."""
    head = prototype_head(unwrap(model))
    param = head.prototypes.prototypes
    if result.vectors is None:
        raise ValueError(
            "projection result has no vectors (loaded from JSON?); expected the output of project_prototypes"
        )
    if tuple(result.vectors.shape) != tuple(param.shape):
        raise ValueError(
            f"projection vectors have shape {tuple(result.vectors.shape)}; "
            f"expected the prototypes' shape {tuple(param.shape)}"
        )
    if not torch.equal(result.prototype_class.to(param.device), head.prototype_class) or not torch.equal(
        result.prototype_scale.to(param.device), head.prototype_scale
    ):
        raise ValueError("projection result was computed for a different prototype layout than the model's")
    param.data.copy_(result.vectors.to(param.device, param.dtype))


@torch.no_grad()
def remove_duplicates(model: nn.Module) -> DuplicateReport:
    """Remove exact duplicates after projection (section 3.3): prototypes of the same scale with bitwise-identical
    vectors; the first (lowest index) is kept. Class, scale and last-layer columns follow through
    ``head.remove_prototypes``. Use ``result.select(report.kept)`` to reindex a :class:`ProjectionResult`."""
    head = prototype_head(unwrap(model))
    vectors = head.prototypes.prototypes.detach().cpu().contiguous()
    scales = head.prototype_scale.cpu().tolist()
    first: dict[tuple[int, bytes], int] = {}
    kept: list[int] = []
    duplicate_of: dict[int, int] = {}
    for p in range(vectors.shape[0]):
        key = (scales[p], vectors[p].numpy().tobytes())
        if key in first:
            duplicate_of[p] = first[key]
        else:
            first[key] = p
            kept.append(p)
    removed = sorted(duplicate_of)
    if removed:
        head.remove_prototypes(torch.tensor(kept, dtype=torch.long))
    return DuplicateReport(kept=kept, removed=removed, duplicate_of=duplicate_of, num_before=vectors.shape[0])


def save_prototype_patches(
    result: ProjectionResult,
    raw: Any,
    out_dir: str | Path,
) -> list[dict[str, Any]]:
    """Save each sourced prototype's receptive-field crop as ``proto_{i:04d}.png`` plus ``manifest.json``.

    ``raw`` is a dataset with ``load_raw(i) -> (uint8 HxWx3 image, label, name)`` or such a callable. When the
    model saw a resized image (e.g. short-side test mode), i.e. ``source.image_size`` differs from the raw image,
    the box is scaled by the size ratio (outward rounding). Returns the manifest entries.
    """
    load: Callable[[int], tuple[Any, Any, str]] = raw.load_raw if hasattr(raw, "load_raw") else raw
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    entries: list[dict[str, Any]] = []
    for i, src in enumerate(result.sources):
        if src is None:
            continue
        image, _, name = load(src.dataset_index)
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"load_raw({src.dataset_index}) returned an image {image.shape} {image.dtype}; expected uint8 HxWx3"
            )
        if str(name) != src.name:
            warnings.warn(
                f"prototype {i}: raw sample {src.dataset_index} is named {name!r}, the projection source {src.name!r}",
                stacklevel=2,
            )
        raw_size = (int(image.shape[0]), int(image.shape[1]))
        box = src.box if raw_size == tuple(src.image_size) else scale_box(src.box, src.image_size, raw_size)
        y0, x0, y1, x1 = box
        fname = f"proto_{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).save(out / fname)
        entries.append(
            {
                "prototype": i,
                "class": int(result.prototype_class[i]),
                "scale": int(result.prototype_scale[i]),
                "file": fname,
                "source": src.to_dict(),
                "raw_box": list(box),
                "raw_size": list(raw_size),
            }
        )
    (out / "manifest.json").write_text(json.dumps({"prototypes": entries}, indent=1))
    return entries
