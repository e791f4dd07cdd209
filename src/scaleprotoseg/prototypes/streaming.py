"""Streaming whole images of a dataset through a model, sharded across ranks, and the one best-k search over them.

:func:`best_k` serves prototype projection (the nearest own-class cell of each prototype), the nearest-patch search
and ProtoSeg's pruning (the k nearest labelled cells): each rank takes the images ``rank::world_size``, a caller's
``propose`` picks candidate cells of each image for every query prototype, the ``k`` best per prototype are kept in
one deterministic order, (distance, dataset index, cell index), the ranks' bests are merged with the same order so
that every rank gets the single-process result, and the winning cells become (row, col) and receptive-field boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

from scaleprotoseg.models import segmenter
from scaleprotoseg.models.heads import PrototypeHead
from scaleprotoseg.models.segmenter import unwrap
from scaleprotoseg.ops import resize_labels
from scaleprotoseg.prototypes.boxes import prototype_rates, receptive_field_box

SENTINEL = torch.iinfo(torch.int64).max  # dataset / cell index of an empty slot: sorts after every real key


def prototype_head(net: nn.Module) -> PrototypeHead:
    """The prototype head of ``net``, or an error naming the model."""
    head = segmenter.prototype_head(net)
    if head is None:
        raise ValueError(f"model {type(net).__name__} has no prototype head; projection needs ProtoSeg/ScaleProtoSeg")
    return head


def first_item(batch: list[Any]) -> Any:
    return batch[0]


def shard_info(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the search: the initialised process group's, or (0, 1)."""
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is None:
        distributed = active
    if distributed and not active:
        raise ValueError("distributed=True but torch.distributed is not initialised with more than one process")
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def iter_shard(dataset: Any, rank: int, world: int, num_workers: int) -> tuple[Iterator[tuple[int, Any]], int | None]:
    """(position, item) of this rank's shard ``rank::world``, one whole image at a time, and the shard length."""
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        indices = list(range(rank, len(dataset), world))
        if num_workers > 0:
            loader = DataLoader(
                Subset(dataset, indices), batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=first_item
            )
            return zip(indices, loader), len(indices)
        return ((i, dataset[i]) for i in indices), len(indices)
    if isinstance(dataset, Iterable):
        return ((i, item) for i, item in enumerate(dataset) if i % world == rank), None
    raise ValueError(f"dataset of type {type(dataset).__name__} is neither indexable nor iterable")


def unpack_item(item: dict[str, Any], pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(image (1, 3, H, W), label (H, W), dataset index, name) of a dataset item, on ``device``."""
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


def forward_maps(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(x)
    if out.distances is None or out.features is None:
        raise ValueError("model output has no distances/features; projection needs a prototype head")
    return out.features[0], out.distances[0]


def key_less(
    d1: torch.Tensor, i1: torch.Tensor, c1: torch.Tensor, d2: torch.Tensor, i2: torch.Tensor, c2: torch.Tensor
) -> torch.Tensor:
    """Lexicographic (distance, dataset index, cell index) comparison, elementwise."""
    return (d1 < d2) | ((d1 == d2) & ((i1 < i2) | ((i1 == i2) & (c1 < c2))))


def lex_order(d: torch.Tensor, i: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation sorting (d, i, c) lexicographically (stable sorts from the last key)."""
    perm = torch.sort(c, dim=1, stable=True).indices
    perm = perm.gather(1, torch.sort(i.gather(1, perm), dim=1, stable=True).indices)
    return perm.gather(1, torch.sort(d.gather(1, perm), dim=1, stable=True).indices)


def comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather(t: torch.Tensor, comm: torch.device) -> list[torch.Tensor]:
    t = t.to(comm).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def progress_bar(it: Iterator, total: int | None, desc: str, enabled: bool) -> Iterator:
    return tqdm(it, total=total, desc=desc, disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------------------------
# The best-k search


@dataclass
class ImageMaps:
    """One image of the stream as ``propose`` and ``fill`` see it.

    ``size`` (H, W): the image as the model saw it; ``label`` (H, W) on the device; ``grid`` (h, w): the feature
    grid; ``grid_label`` (h * w,): the label nearest-downsampled to it; ``features`` (S * D, h, w);
    ``distances`` (Q, h * w) float32: squared distances of the query prototypes to every cell.
    """

    index: int
    name: str
    size: tuple[int, int]
    label: torch.Tensor
    grid: tuple[int, int]
    grid_label: torch.Tensor
    features: torch.Tensor
    distances: torch.Tensor


@dataclass
class BestK:
    """The ``k`` best cells of each query prototype, nearest first, in the images as the model saw them.

    prototypes: (Q,) the query prototypes. distances: (Q, k), ``inf`` in empty slots. dataset_indices: (Q, k).
    cells: (Q, k, 2) (row, col) on the feature grid. boxes: (Q, k, 4) receptive-field (y0, x0, y1, x1) in pixels.
    image_sizes: (Q, k, 2) (H, W). names: (Q, k) sample names. Empty slots hold -1 and ``None``. payload: the
    caller's values per slot (what ``fill`` gave, ``initial`` in slots no image filled). rank: this process's rank.
    """

    prototypes: torch.Tensor
    distances: torch.Tensor
    dataset_indices: torch.Tensor
    cells: torch.Tensor
    boxes: torch.Tensor
    image_sizes: torch.Tensor
    names: list[list[str | None]]
    payload: dict[str, torch.Tensor]
    rank: int = 0

    @property
    def empty(self) -> torch.Tensor:
        """(Q, k) bool: slots no labelled cell filled."""
        return ~torch.isfinite(self.distances)


def smallest_cells(masked: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, cells), each (Q, m), of the ``m`` smallest entries of every row of ``masked`` (Q, h * w); ties go
    to the lower cell index (``inf`` marks cells that must not be chosen)."""
    if m == 1:
        cells = masked.argmin(dim=1, keepdim=True)  # first minimum: the smallest cell index among ties
        return masked.gather(1, cells), cells
    d, c = torch.sort(masked, dim=1, stable=True)
    m = min(m, masked.shape[1])
    return d[:, :m], c[:, :m]


def _take(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t`` (Q, n, ...) with dim 1 reordered (and cut) by ``perm`` (Q, m)."""
    index = perm.reshape(*perm.shape, *([1] * (t.dim() - 2))).expand(*perm.shape, *t.shape[2:])
    return t.gather(1, index)


class _Slots:
    """Running (distance, dataset index, cell index) keys and payloads, ``k`` per query prototype, best first."""

    def __init__(self, d: torch.Tensor, i: torch.Tensor, c: torch.Tensor, payload: dict[str, torch.Tensor]) -> None:
        self.d, self.i, self.c, self.payload = d, i, c, payload

    @classmethod
    def empty(cls, rows: int, k: int, device: torch.device, payload: dict[str, torch.Tensor]) -> _Slots:
        full = torch.full((rows, k), SENTINEL, dtype=torch.long, device=device)
        return cls(torch.full((rows, k), math.inf, device=device), full, full.clone(), payload)

    def admits(self, d: torch.Tensor, i: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Which candidates (Q, m) come before the current k-th best."""
        return torch.isfinite(d) & key_less(d, i, c, self.d[:, -1:], self.i[:, -1:], self.c[:, -1:])

    def merge(self, others: list[_Slots]) -> _Slots:
        """The best ``k`` of these slots and ``others`` (earlier ones first among equal keys)."""
        every = [self, *others]
        d, i, c = (torch.cat([getattr(s, n) for s in every], 1) for n in ("d", "i", "c"))
        perm = lex_order(d, i, c)[:, : self.d.shape[1]]
        payload = {n: _take(torch.cat([s.payload[n] for s in every], 1), perm) for n in self.payload}
        return _Slots(d.gather(1, perm), i.gather(1, perm), c.gather(1, perm), payload)

    def live(self, meta: dict[int, Any]) -> dict[int, Any]:
        """``meta`` restricted to the dataset indices that hold a slot."""
        keep = set(self.i.flatten().tolist())
        return {k: v for k, v in meta.items() if k in keep}

    def gathered(self, device: torch.device) -> list[_Slots]:
        """Every rank's slots, in rank order (a collective)."""
        comm = comm_device(device)
        keys = [all_gather(t, comm) for t in (self.d, self.i, self.c)]
        payloads = {n: all_gather(t, comm) for n, t in self.payload.items()}
        ranks = range(len(keys[0]))
        return [_Slots(keys[0][r], keys[1][r], keys[2][r], {n: p[r] for n, p in payloads.items()}) for r in ranks]


Propose = Callable[[ImageMaps], tuple[torch.Tensor, torch.Tensor]]
Fill = Callable[[ImageMaps, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def best_k(
    model: nn.Module,
    dataset: Any,
    *,
    k: int,
    propose: Propose,
    fill: Fill | None = None,
    initial: dict[str, torch.Tensor] | None = None,
    prototypes: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "search",
    distributed: bool | None = None,
) -> BestK:
    """The ``k`` best cells of the dataset for each query prototype (``prototypes``, default all), streaming.

    For every image (batch size 1, whole image) ``propose(maps) -> (distances, cells)``, each (Q, m), names
    candidate cells per prototype (``inf``: none); the candidates that enter a prototype's k best get their payload
    from ``fill(maps, cells, enters) -> {name: (Q, m, ...)}`` (``enters``: (Q, m) bool; other rows may hold
    anything), ``initial`` (``{name: (Q, k, ...)}``) fills slots no image reaches. Order and ties: (distance,
    dataset index, cell index). Under an initialised ``torch.distributed`` (or ``distributed=True``) each rank scans
    ``rank::world_size`` and the ranks' slots are all-gathered and merged with the same order. The model (already
    on ``device``) runs in eval mode; its training flag is restored afterwards.
    """
    device = torch.device(device)
    net = unwrap(model)
    head = prototype_head(net)
    rank, world = shard_info(distributed)
    P = head.prototype_class.numel()
    rows = torch.arange(P) if prototypes is None else torch.as_tensor(prototypes, dtype=torch.long).flatten()
    rows_dev = None if prototypes is None else rows.to(device)
    slots = _Slots.empty(rows.numel(), k, device, dict(initial or {}))
    meta: dict[int, tuple[str, int, int, int]] = {}  # dataset index -> (name, H, W, grid width), only live slots
    was_training = net.training
    net.eval()
    try:
        items, total = iter_shard(dataset, rank, world, num_workers)
        for pos, item in progress_bar(items, total, desc, progress and rank == 0):
            x, label, index, name = unpack_item(item, pos, device)
            feats, dists = forward_maps(net, x)
            h, w = dists.shape[-2:]
            dists = dists.reshape(P, -1) if rows_dev is None else dists.reshape(P, -1).index_select(0, rows_dev)
            size = (int(x.shape[-2]), int(x.shape[-1]))
            grid_label = resize_labels(label, (h, w)).reshape(-1)
            maps = ImageMaps(index, name, size, label, (h, w), grid_label, feats, dists.float())
            cand_d, cells = propose(maps)
            valid = torch.isfinite(cand_d)
            cand_i = torch.where(valid, torch.full_like(cells, index), SENTINEL)
            cand_c = torch.where(valid, cells, SENTINEL)
            enters = slots.admits(cand_d, cand_i, cand_c)
            if not bool(enters.any()):
                continue
            payload = fill(maps, cells, enters) if fill is not None else {}
            slots = slots.merge([_Slots(cand_d, cand_i, cand_c, payload)])
            meta[index] = (name, size[0], size[1], int(w))
            if len(meta) > 4 * slots.d.numel():
                meta = slots.live(meta)
    finally:
        net.train(was_training)
    meta = slots.live(meta)
    if world > 1:
        first, *others = slots.gathered(device)
        slots = first.merge(others)
        meta = {key: v for m in all_gather_object(meta) for key, v in m.items()}
    return _result(slots, rows, meta, prototype_rates(head), int(net.output_stride), rank)


def _result(slots: _Slots, rows: torch.Tensor, meta: dict[int, Any], rates: list[int], stride: int, rank: int) -> BestK:
    """Cells (row, col), receptive-field boxes, image sizes and names of the winning slots."""
    d, i, c = slots.d.cpu(), slots.i.cpu(), slots.c.cpu()
    Q, k = d.shape
    cells = torch.full((Q, k, 2), -1, dtype=torch.long)
    boxes = torch.full((Q, k, 4), -1, dtype=torch.long)
    sizes = torch.full((Q, k, 2), -1, dtype=torch.long)
    names: list[list[str | None]] = [[None] * k for _ in range(Q)]
    empty = ~torch.isfinite(d)
    for q in range(Q):
        for j in range(k):
            if bool(empty[q, j]):
                continue
            name, H, W, w = meta[int(i[q, j])]
            rc = (int(c[q, j]) // w, int(c[q, j]) % w)
            cells[q, j] = torch.tensor(rc)
            sizes[q, j] = torch.tensor((H, W))
            box = receptive_field_box(rc, rate=rates[int(rows[q])], output_stride=stride, image_size=(H, W))
            boxes[q, j] = torch.tensor(box)
            names[q][j] = name
    return BestK(
        prototypes=rows.clone(),
        distances=d,
        dataset_indices=torch.where(empty, -1, i),
        cells=cells,
        boxes=boxes,
        image_sizes=sizes,
        names=names,
        payload={n: t.cpu() for n, t in slots.payload.items()},
        rank=rank,
    )
