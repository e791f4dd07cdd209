"""Prototype projection ("push"), duplicate removal and ProtoSeg pruning (paper section 3.3, Stage 1).

- :func:`project_prototypes`: every prototype becomes the nearest feature vector *of its own scale* among the
  training cells *of its own class* (ProtoPNet's push, done per scale for ScaleProtoSeg). Streaming over the
  dataset (one running best per prototype), deterministic (ties broken by (distance, dataset index, cell index)),
  and sharded under ``torch.distributed`` with a global merge that gives every rank the single-process result.
- :func:`apply_projection` writes the vectors into the model; :func:`remove_duplicates` then drops exact
  duplicates (same scale, bitwise-identical vector), as the paper does after projection.
- :func:`nearest_patches` / :func:`find_nearest_patches`: the k nearest labelled training cells of each prototype,
  one per image by default, as ProtoPNet's ``find_k_nearest_patches_to_prototypes`` (``find_nearest.py``) keeps
  for every image only ``np.amin`` of the prototype's distance map, i.e. the closest patch of that image, in a
  size-k heap. ProtoSeg's segmentation version (gmum/proto-segmentation, reused by the ScaleProtoSeg release) does
  the same per image after excluding void cells. Reused by the explanations (nearest training patches, Figs. 14-19).
- :func:`prune_prototypes`: ProtoPNet's pruning for the ProtoSeg baseline (``prune.py``): a prototype is removed
  when fewer than ``threshold`` (3) of its ``k`` (6) nearest patches belong to its class. Unlike ProtoPNet, we never
  remove every prototype of a class: when that would happen, the class's best prototype is kept with a warning.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

from scaleprotoseg.ops import resize_labels

__all__ = [
    "DuplicateReport",
    "NearestPatches",
    "ProjectionResult",
    "PrototypeSource",
    "PruneReport",
    "apply_projection",
    "find_nearest_patches",
    "nearest_patches",
    "project_prototypes",
    "prototype_rates",
    "prune_prototypes",
    "receptive_field_box",
    "remove_duplicates",
    "save_prototype_patches",
    "scale_box",
]

_SENTINEL = torch.iinfo(torch.int64).max  # dataset / cell index of an empty slot: sorts after every real key


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------
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


@dataclass
class NearestPatches:
    """The k nearest labelled training cells of some prototypes, nearest first; empty slots hold -1 (``inf``).

    prototype_indices: (Q,) which prototypes (model numbering at search time).
    distances: (Q, k) squared distances. labels: (Q, k) class of each patch. dataset_indices: (Q, k).
    cells: (Q, k, 2) (row, col) on the feature grid. boxes: (Q, k, 4) receptive-field (y0, x0, y1, x1) in pixels.
    image_sizes: (Q, k, 2) (H, W) of the image as the model saw it. names: (Q, k) sample names (``None`` if empty).
    """

    prototype_indices: torch.Tensor
    distances: torch.Tensor
    labels: torch.Tensor
    dataset_indices: torch.Tensor
    cells: torch.Tensor
    boxes: torch.Tensor
    image_sizes: torch.Tensor
    names: list[list[str | None]]

    @property
    def k(self) -> int:
        return self.distances.shape[1]


@dataclass
class PruneReport:
    """ProtoPNet pruning outcome, old numbering. ``own_class_counts[p]``: how many of p's k nearest patches are of
    p's class; ``rescued``: prototypes that failed the test but were kept as their class's last prototype."""

    kept: list[int]
    pruned: list[int]
    rescued: list[int]
    own_class_counts: list[int]
    k: int
    threshold: int
    nearest: NearestPatches | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "threshold": self.threshold,
            "num_before": len(self.own_class_counts),
            "num_after": len(self.kept),
            "kept": self.kept,
            "pruned": self.pruned,
            "rescued": self.rescued,
            "own_class_counts": self.own_class_counts,
        }


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module (not the DDP wrapper: DDP's forward syncs buffers and would hang on uneven shards)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _head(net: nn.Module) -> nn.Module:
    head = getattr(net, "head", None)
    if head is None or not hasattr(head, "prototype_class"):
        raise ValueError(f"model {type(net).__name__} has no prototype head; projection needs ProtoSeg/ScaleProtoSeg")
    return head


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


def _first(batch: list[Any]) -> Any:
    return batch[0]


def _dist_state(distributed: bool | None) -> tuple[int, int]:
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is None:
        distributed = active
    if distributed and not active:
        raise ValueError("distributed=True but torch.distributed is not initialised with more than one process")
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def _iter_shard(dataset: Any, rank: int, world: int, num_workers: int) -> tuple[Iterator[tuple[int, Any]], int | None]:
    """(position, item) of this rank's shard ``rank::world``, one whole image at a time, and the shard length."""
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        indices = list(range(rank, len(dataset), world))
        if num_workers > 0:
            loader = DataLoader(
                Subset(dataset, indices), batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first
            )
            return zip(indices, loader), len(indices)
        return ((i, dataset[i]) for i in indices), len(indices)
    if isinstance(dataset, Iterable):
        return ((i, item) for i, item in enumerate(dataset) if i % world == rank), None
    raise ValueError(f"dataset of type {type(dataset).__name__} is neither indexable nor iterable")


def _unpack(item: dict[str, Any], pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    image = torch.as_tensor(item["image"])
    label = torch.as_tensor(item["label"]).long()
    if image.dim() == 4:  # an already batched item (B = 1)
        image, label = image[0], label.reshape(label.shape[-2:])
    if image.dim() != 3 or label.shape != image.shape[-2:]:
        raise ValueError(
            f"dataset item {pos}: image {tuple(image.shape)} and label {tuple(label.shape)}; expected (3, H, W), (H, W)"
        )
    index = int(item.get("index", pos))
    name = str(item.get("name", index))
    return image.to(device, torch.float32).unsqueeze(0), label.to(device), index, name


def _forward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(x)
    if getattr(out, "distances", None) is None or getattr(out, "features", None) is None:
        raise ValueError("model output has no distances/features; projection needs a prototype head")
    return out.features[0], out.distances[0]


def _key_less(
    d1: torch.Tensor, i1: torch.Tensor, c1: torch.Tensor, d2: torch.Tensor, i2: torch.Tensor, c2: torch.Tensor
) -> torch.Tensor:
    """Lexicographic (distance, dataset index, cell index) comparison, elementwise."""
    return (d1 < d2) | ((d1 == d2) & ((i1 < i2) | ((i1 == i2) & (c1 < c2))))


def _lex_order(d: torch.Tensor, i: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation sorting (d, i, c) lexicographically (stable sorts from the last key)."""
    perm = torch.sort(c, dim=1, stable=True).indices
    perm = perm.gather(1, torch.sort(i.gather(1, perm), dim=1, stable=True).indices)
    return perm.gather(1, torch.sort(d.gather(1, perm), dim=1, stable=True).indices)


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_gather(t: torch.Tensor, comm: torch.device) -> list[torch.Tensor]:
    t = t.to(comm).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def _all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _progress(it: Iterator, total: int | None, desc: str, enabled: bool) -> Iterator:
    return tqdm(it, total=total, desc=desc, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------------
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
    net = _unwrap(model)
    head = _head(net)
    rank, world = _dist_state(distributed)
    cls = head.prototype_class.to(device)
    scale = head.prototype_scale.to(device)
    P = cls.numel()
    num_scales = int(getattr(head, "num_scales", 1))
    old = head.prototypes.prototypes.detach()
    D = old.shape[1]

    best_d = torch.full((P,), math.inf, device=device)
    best_i = torch.full((P,), _SENTINEL, dtype=torch.long, device=device)
    best_c = torch.full((P,), _SENTINEL, dtype=torch.long, device=device)
    best_v = old.to(device, torch.float32).clone()
    meta: dict[int, tuple[str, int, int, int]] = {}  # dataset index -> (name, H, W, grid width), only live winners

    was_training = net.training
    net.eval()
    try:
        items, total = _iter_shard(dataset, rank, world, num_workers)
        for pos, item in _progress(items, total, "projection", progress and rank == 0):
            x, label, index, name = _unpack(item, pos, device)
            feats, dists = _forward(net, x)
            h, w = dists.shape[-2:]
            lab = resize_labels(label, (h, w)).reshape(-1)
            masked = torch.where(lab.unsqueeze(0) == cls.unsqueeze(1), dists.reshape(P, -1).float(), math.inf)
            cell = masked.argmin(dim=1)  # first minimum: the smallest cell index among ties
            d = masked.gather(1, cell.unsqueeze(1)).squeeze(1)
            idx = torch.full_like(best_i, index)
            better = torch.isfinite(d) & _key_less(d, idx, cell, best_d, best_i, best_c)
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
        comm = _comm_device(device)
        ds, is_, cs, vs = (_all_gather(t, comm) for t in (best_d, best_i, best_c, best_v))
        live = set(best_i.tolist())
        metas = _all_gather_object({k: v for k, v in meta.items() if k in live})
        best_d, best_i, best_c, best_v = ds[0], is_[0], cs[0], vs[0]
        for r in range(1, world):
            better = torch.isfinite(ds[r]) & _key_less(ds[r], is_[r], cs[r], best_d, best_i, best_c)
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
    head = _head(_unwrap(model))
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
    head = _head(_unwrap(model))
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


# ---------------------------------------------------------------------------------------------------------------
# Nearest patches and pruning
# ---------------------------------------------------------------------------------------------------------------
def _footprint_label(label: torch.Tensor, cell: tuple[int, int], grid: tuple[int, int], own: int, ignore: int) -> int:
    """ProtoSeg release's patch label: the prototype's class if any pixel of the cell's footprint
    ``[int(row * H / h), int((row + 1) * H / h))`` has it, else the footprint's most common labelled class."""
    H, W = label.shape
    ph, pw = H / grid[0], W / grid[1]
    r, c = cell
    y0, x0 = int(r * ph), int(c * pw)
    patch = label[y0 : max(int((r + 1) * ph), y0 + 1), x0 : max(int((c + 1) * pw), x0 + 1)]
    if bool((patch == own).any()):
        return own
    vals = patch[patch != ignore]
    if vals.numel() == 0:
        return -1
    v, counts = torch.unique(vals, return_counts=True)
    return int(v[counts.argmax()])


@torch.no_grad()
def nearest_patches(
    model: nn.Module,
    dataset: Any,
    prototype_indices: Sequence[int] | torch.Tensor | None = None,
    k: int = 6,
    one_per_image: bool = True,
    *,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    patch_label: Literal["cell", "footprint"] = "cell",
    distributed: bool | None = None,
) -> NearestPatches:
    """The ``k`` nearest labelled training cells (any class, ignore cells excluded) of each selected prototype.

    With ``one_per_image`` (default, ProtoPNet's ``find_k_nearest_patches_to_prototypes``) each image contributes at
    most its closest cell; otherwise any cells. Streaming top-k per prototype with the (distance, dataset index,
    cell index) order, sharded and merged under ``torch.distributed`` like :func:`project_prototypes`.
    ``patch_label="cell"`` labels a patch with its cell's (nearest-downsampled) class; ``"footprint"`` follows the
    ProtoSeg release: the prototype's class if any pixel under the cell has it, else the most common pixel class.
    Used for pruning and for the explanations' nearest training patches (paper Figures 14-19).
    """
    if k < 1:
        raise ValueError(f"k is {k}; expected k >= 1")
    if patch_label not in ("cell", "footprint"):
        raise ValueError(f"patch_label {patch_label!r}; expected 'cell' or 'footprint'")
    device = torch.device(device)
    net = _unwrap(model)
    head = _head(net)
    rank, world = _dist_state(distributed)
    P = head.prototype_class.numel()
    q_idx = (
        torch.arange(P) if prototype_indices is None else torch.as_tensor(prototype_indices, dtype=torch.long).flatten()
    )
    if q_idx.numel() and (int(q_idx.min()) < 0 or int(q_idx.max()) >= P):
        raise ValueError(f"prototype_indices {q_idx.tolist()} out of range; the model has {P} prototypes")
    q_dev = q_idx.to(device)
    Q = q_idx.numel()
    num_classes = int(getattr(head, "num_classes", int(head.prototype_class.max()) + 1))
    own_cls = head.prototype_class.to(device).index_select(0, q_dev)

    run_d = torch.full((Q, k), math.inf, device=device)
    run_i = torch.full((Q, k), _SENTINEL, dtype=torch.long, device=device)
    run_c = torch.full((Q, k), _SENTINEL, dtype=torch.long, device=device)
    run_l = torch.full((Q, k), -1, dtype=torch.long, device=device)
    meta: dict[int, tuple[str, int, int, int]] = {}  # dataset index -> (name, H, W, grid width)

    was_training = net.training
    net.eval()
    try:
        items, total = _iter_shard(dataset, rank, world, num_workers)
        for pos, item in _progress(items, total, "nearest patches", progress and rank == 0):
            x, label, index, name = _unpack(item, pos, device)
            _, dists = _forward(net, x)
            h, w = dists.shape[-2:]
            lab = resize_labels(label, (h, w)).reshape(-1)
            labelled = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
            masked = torch.where(labelled.unsqueeze(0), dists.reshape(P, -1).index_select(0, q_dev).float(), math.inf)
            if one_per_image:
                cand_c = masked.argmin(dim=1, keepdim=True)
                cand_d = masked.gather(1, cand_c)
            else:
                m = min(k, h * w)
                sd, sc = torch.sort(masked, dim=1, stable=True)
                cand_d, cand_c = sd[:, :m], sc[:, :m]
            valid = torch.isfinite(cand_d)
            cand_i = torch.where(valid, torch.full_like(cand_c, index), _SENTINEL)
            cand_l = torch.where(valid, lab[cand_c], -1)
            if patch_label == "footprint":
                worst_d, worst_i, worst_c = run_d[:, -1:], run_i[:, -1:], run_c[:, -1:]
                enters = valid & _key_less(cand_d, cand_i, cand_c, worst_d, worst_i, worst_c)
                for q, j in enters.nonzero().tolist():
                    c = int(cand_c[q, j])
                    cand_l[q, j] = _footprint_label(label, (c // w, c % w), (h, w), int(own_cls[q]), ignore_index)
            cand_c = torch.where(valid, cand_c, _SENTINEL)
            all_d, all_i = torch.cat([run_d, cand_d], 1), torch.cat([run_i, cand_i], 1)
            all_c, all_l = torch.cat([run_c, cand_c], 1), torch.cat([run_l, cand_l], 1)
            perm = _lex_order(all_d, all_i, all_c)[:, :k]
            run_d, run_i, run_c, run_l = (t.gather(1, perm) for t in (all_d, all_i, all_c, all_l))
            meta[index] = (name, int(x.shape[-2]), int(x.shape[-1]), int(w))
            if len(meta) > 4 * Q * k:
                live = set(run_i.flatten().tolist())
                meta = {kk: v for kk, v in meta.items() if kk in live}
    finally:
        net.train(was_training)

    live = set(run_i.flatten().tolist())
    meta = {kk: v for kk, v in meta.items() if kk in live}
    if world > 1:
        comm = _comm_device(device)
        gathered = [_all_gather(t, comm) for t in (run_d, run_i, run_c, run_l)]
        all_d, all_i, all_c, all_l = (torch.cat(g, dim=1) for g in gathered)
        perm = _lex_order(all_d, all_i, all_c)[:, :k]
        run_d, run_i, run_c, run_l = (t.gather(1, perm) for t in (all_d, all_i, all_c, all_l))
        meta = {kk: v for m in _all_gather_object(meta) for kk, v in m.items()}

    run_d, run_i, run_c, run_l = run_d.cpu(), run_i.cpu(), run_c.cpu(), run_l.cpu()
    rates = prototype_rates(head)
    os_ = int(getattr(net, "output_stride", 8))
    cells = torch.full((Q, k, 2), -1, dtype=torch.long)
    boxes = torch.full((Q, k, 4), -1, dtype=torch.long)
    sizes = torch.full((Q, k, 2), -1, dtype=torch.long)
    names: list[list[str | None]] = [[None] * k for _ in range(Q)]
    empty = ~torch.isfinite(run_d)
    for q in range(Q):
        for j in range(k):
            if bool(empty[q, j]):
                continue
            name, H, W, w = meta[int(run_i[q, j])]
            c = int(run_c[q, j])
            rc = (c // w, c % w)
            cells[q, j] = torch.tensor(rc)
            sizes[q, j] = torch.tensor((H, W))
            boxes[q, j] = torch.tensor(
                receptive_field_box(rc, rate=rates[int(q_idx[q])], output_stride=os_, image_size=(H, W))
            )
            names[q][j] = name
    return NearestPatches(
        prototype_indices=q_idx.clone(),
        distances=run_d,
        labels=torch.where(empty, -1, run_l),
        dataset_indices=torch.where(empty, -1, run_i),
        cells=cells,
        boxes=boxes,
        image_sizes=sizes,
        names=names,
    )


def find_nearest_patches(
    model: nn.Module,
    dataset: Any,
    *,
    k: int = 6,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    patch_label: Literal["cell", "footprint"] = "cell",
    distributed: bool | None = None,
) -> NearestPatches:
    """ProtoPNet's k-nearest-patches search for every prototype, one patch (the closest cell) per image."""
    return nearest_patches(
        model,
        dataset,
        None,
        k,
        True,
        device=device,
        ignore_index=ignore_index,
        num_workers=num_workers,
        progress=progress,
        patch_label=patch_label,
        distributed=distributed,
    )


@torch.no_grad()
def prune_prototypes(
    model: nn.Module,
    dataset: Any,
    *,
    k: int = 6,
    threshold: int = 3,
    device: torch.device | str = "cpu",
    ignore_index: int = 255,
    num_workers: int = 0,
    progress: bool = True,
    patch_label: Literal["cell", "footprint"] = "cell",
    nearest: NearestPatches | None = None,
    distributed: bool | None = None,
) -> PruneReport:
    """ProtoPNet pruning for the ProtoSeg baseline (``prune.py``; k = 6, threshold = 3): prune a prototype when
    fewer than ``threshold`` of its ``k`` nearest training patches (one per image) belong to its class.

    Safeguard (not in ProtoPNet): a class never loses all its prototypes; if every prototype of a class fails,
    the best one (most own-class patches, then smallest summed patch distance, then lowest index) is kept and a
    warning names it. Calls ``head.remove_prototypes(keep)``; pass ``nearest`` to reuse an earlier search.
    """
    head = _head(_unwrap(model))
    P = head.prototype_class.numel()
    if nearest is None:
        nearest = find_nearest_patches(
            model,
            dataset,
            k=k,
            device=device,
            ignore_index=ignore_index,
            num_workers=num_workers,
            progress=progress,
            patch_label=patch_label,
            distributed=distributed,
        )
    if nearest.prototype_indices.tolist() != list(range(P)):
        raise ValueError("nearest patches must cover every prototype in order; expected find_nearest_patches output")
    cls = head.prototype_class.cpu()
    own = (nearest.labels == cls.unsqueeze(1)).sum(dim=1)
    fail = own < threshold
    dsum = torch.where(torch.isfinite(nearest.distances), nearest.distances, torch.finfo(torch.float32).max).sum(1)
    rescued: list[int] = []
    for c in sorted(set(cls.tolist())):
        members = (cls == c).nonzero().flatten().tolist()
        if members and all(bool(fail[p]) for p in members):
            best = min(members, key=lambda p: (-int(own[p]), float(dsum[p]), p))
            fail[best] = False
            rescued.append(best)
    if rescued:
        warnings.warn(
            f"pruning would remove every prototype of some classes; kept prototypes {rescued} "
            f"(classes {[int(cls[p]) for p in rescued]}) as their class's best",
            stacklevel=2,
        )
    kept = (~fail).nonzero().flatten().tolist()
    pruned = fail.nonzero().flatten().tolist()
    if pruned:
        head.remove_prototypes(torch.tensor(kept, dtype=torch.long))
    return PruneReport(
        kept=kept,
        pruned=pruned,
        rescued=sorted(rescued),
        own_class_counts=own.tolist(),
        k=nearest.k,
        threshold=threshold,
        nearest=nearest,
    )


# ---------------------------------------------------------------------------------------------------------------
# Prototype crops
# ---------------------------------------------------------------------------------------------------------------
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
