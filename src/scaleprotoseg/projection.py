"""Prototype projection ("push") and duplicate removal (paper section 3.3, Stage 1).

- :func:`project_prototypes`: every prototype becomes the nearest feature vector *of its own scale* among the
  training cells *of its own class* (ProtoPNet's push, done per scale for ScaleProtoSeg). Streaming over the
  dataset (one running best per prototype), deterministic (ties broken by (distance, dataset index, cell index)),
  and sharded under ``torch.distributed`` with a global merge that gives every rank the single-process result.
- :func:`apply_projection` writes the vectors into the model; :func:`remove_duplicates` then drops exact
  duplicates (same scale, bitwise-identical vector), as the paper does after projection.
- Nearest training patches and ProtoSeg's pruning live in :mod:`scaleprotoseg.pruning`.
- :func:`save_prototype_patches`: the receptive-field crop of each projected prototype as a PNG, plus a manifest.

Receptive-field boxes: a cell (row, col) on the feature grid of output stride ``os`` seen through the 3x3 ASPP
branch of rate ``r`` (scale ``s`` uses ``head.aspp.rates[s]``; ProtoSeg's summed ASPP uses its largest rate)
covers cells ``row - r .. row + r``, i.e. pixels ``[(row - r) * os, (row + r + 1) * os)`` clipped to the image.
The backbone's own receptive field is NOT included, so the box is a lower bound of the true receptive field.
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

from scaleprotoseg.ops import resize_labels
from scaleprotoseg.streaming import (
    SENTINEL,
    all_gather,
    all_gather_object,
    comm_device,
    forward_maps,
    iter_shard,
    key_less,
    progress_bar,
    prototype_head,
    shard_info,
    unpack_item,
    unwrap,
)


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


def prototype_rates(head: nn.Module) -> list[int]:
    """ASPP rate that defines each prototype's receptive field: ``aspp.rates[scale]`` for concatenated ASPP, the
    largest rate for ProtoSeg's summed ASPP (one scale)."""
    rates = [int(r) for r in head.aspp.rates]
    scales = head.prototype_scale.tolist()
    if int(getattr(head, "num_scales", 1)) == 1:
        return [max(rates)] * len(scales)
    return [rates[s] for s in scales]


def receptive_field_box(
    cell: tuple[int, int], *, rate: int, output_stride: int, image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) pixels of the 3x3 atrous conv of ``rate`` at ``cell``: cells ``row - rate .. row + rate``
    times the output stride, clipped to ``image_size`` = (H, W). The backbone's own receptive field is not included."""
    row, col = int(cell[0]), int(cell[1])
    H, W = int(image_size[0]), int(image_size[1])
    y0 = min(max(0, (row - rate) * output_stride), H)
    x0 = min(max(0, (col - rate) * output_stride), W)
    y1 = max(min(H, (row + rate + 1) * output_stride), y0)
    x1 = max(min(W, (col + rate + 1) * output_stride), x0)
    return y0, x0, y1, x1


def scale_box(
    box: tuple[int, int, int, int], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Map a pixel box from an image of ``from_size`` (H, W) to the same image resized to ``to_size`` (outward
    rounding, clipped, at least one pixel when the box was non-empty)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    y0, x0, y1, x1 = box
    ny0, nx0 = min(int(math.floor(y0 * sy)), to_size[0]), min(int(math.floor(x0 * sx)), to_size[1])
    ny1, nx1 = min(int(math.ceil(y1 * sy)), to_size[0]), min(int(math.ceil(x1 * sx)), to_size[1])
    if y1 > y0 and ny1 <= ny0:
        ny0, ny1 = max(0, ny1 - 1), max(ny1, 1)
    if x1 > x0 and nx1 <= nx0:
        nx0, nx1 = max(0, nx1 - 1), max(nx1, 1)
    return ny0, nx0, ny1, nx1


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
    and only the running best (distance, vector, source) per prototype is kept. Ties go to the smallest
    (distance, dataset index, cell index), so the result does not depend on the order of the data. Under an
    initialised ``torch.distributed`` (or ``distributed=True``) each rank scans ``rank::world_size`` and the
    per-rank bests are all-gathered and merged with the same rule: every rank returns the single-process result.
    The model (already on ``device``) runs in eval mode; its training flag is restored afterwards. Prototypes whose
    class has no labelled cell keep their vector, get ``source=None`` and a warning. The model is not modified:
    call :func:`apply_projection`.
    """
    device = torch.device(device)
    net = unwrap(model)
    head = prototype_head(net)
    rank, world = shard_info(distributed)
    cls = head.prototype_class.to(device)
    scale = head.prototype_scale.to(device)
    P = cls.numel()
    num_scales = int(getattr(head, "num_scales", 1))
    old = head.prototypes.prototypes.detach()
    D = old.shape[1]

    best_d = torch.full((P,), math.inf, device=device)
    best_i = torch.full((P,), SENTINEL, dtype=torch.long, device=device)
    best_c = torch.full((P,), SENTINEL, dtype=torch.long, device=device)
    best_v = old.to(device, torch.float32).clone()
    meta: dict[int, tuple[str, int, int, int]] = {}  # dataset index -> (name, H, W, grid width), only live winners

    was_training = net.training
    net.eval()
    try:
        items, total = iter_shard(dataset, rank, world, num_workers)
        for pos, item in progress_bar(items, total, "projection", progress and rank == 0):
            x, label, index, name = unpack_item(item, pos, device)
            feats, dists = forward_maps(net, x)
            h, w = dists.shape[-2:]
            lab = resize_labels(label, (h, w)).reshape(-1)
            masked = torch.where(lab.unsqueeze(0) == cls.unsqueeze(1), dists.reshape(P, -1).float(), math.inf)
            cell = masked.argmin(dim=1)  # first minimum: the smallest cell index among ties
            d = masked.gather(1, cell.unsqueeze(1)).squeeze(1)
            idx = torch.full_like(best_i, index)
            better = torch.isfinite(d) & key_less(d, idx, cell, best_d, best_i, best_c)
            if not bool(better.any()):
                continue
            vecs = feats.reshape(num_scales, D, h * w)[scale, :, cell].float()  # (P, D): own scale, chosen cell
            best_d = torch.where(better, d, best_d)
            best_i = torch.where(better, idx, best_i)
            best_c = torch.where(better, cell, best_c)
            best_v = torch.where(better.unsqueeze(1), vecs, best_v)
            meta[index] = (name, int(x.shape[-2]), int(x.shape[-1]), int(w))
            if len(meta) > 4 * P:
                live = set(best_i.tolist())
                meta = {k: v for k, v in meta.items() if k in live}
    finally:
        net.train(was_training)

    if world > 1:
        comm = comm_device(device)
        ds, is_, cs, vs = (all_gather(t, comm) for t in (best_d, best_i, best_c, best_v))
        live = set(best_i.tolist())
        metas = all_gather_object({k: v for k, v in meta.items() if k in live})
        best_d, best_i, best_c, best_v = ds[0], is_[0], cs[0], vs[0]
        for r in range(1, world):
            better = torch.isfinite(ds[r]) & key_less(ds[r], is_[r], cs[r], best_d, best_i, best_c)
            best_d = torch.where(better, ds[r], best_d)
            best_i = torch.where(better, is_[r], best_i)
            best_c = torch.where(better, cs[r], best_c)
            best_v = torch.where(better.unsqueeze(1), vs[r], best_v)
        meta = {k: v for m in metas for k, v in m.items()}

    best_d, best_i, best_c, best_v = best_d.cpu(), best_i.cpu(), best_c.cpu(), best_v.cpu()
    rates = prototype_rates(head)
    os_ = int(getattr(net, "output_stride", 8))
    sources: list[PrototypeSource | None] = []
    cls_l, scale_l = cls.tolist(), scale.tolist()
    for p in range(P):
        if not math.isfinite(float(best_d[p])):
            sources.append(None)
            continue
        name, H, W, w = meta[int(best_i[p])]
        c = int(best_c[p])
        cell_rc = (c // w, c % w)
        box = receptive_field_box(cell_rc, rate=rates[p], output_stride=os_, image_size=(H, W))
        sources.append(
            PrototypeSource(
                dataset_index=int(best_i[p]),
                name=name,
                scale=scale_l[p],
                cell=cell_rc,
                distance=float(best_d[p]),
                box=box,
                image_size=(H, W),
                class_index=cls_l[p],
            )
        )
    missing = [p for p, s in enumerate(sources) if s is None]
    if missing and rank == 0:
        classes = sorted({cls_l[p] for p in missing})
        warnings.warn(
            f"projection: prototypes {missing} (classes {classes}) have no labelled cell of their class in the "
            "dataset; their vectors are kept unchanged and their source is None",
            stacklevel=2,
        )
    return ProjectionResult(
        vectors=best_v.to(old.dtype),
        sources=sources,
        distances=best_d.float(),
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
