"""Streaming whole images of a dataset through a model, one at a time, sharded across ranks.

Shared by prototype projection and the nearest-patch search (pruning, explanations): each rank takes the images
``rank::world_size``, keeps a running best per prototype, and the ranks' bests are merged with one deterministic
order, (distance, dataset index, cell index), so that the result equals the single-process one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

SENTINEL = torch.iinfo(torch.int64).max  # dataset / cell index of an empty slot: sorts after every real key


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module (not the DDP wrapper: DDP's forward syncs buffers and would hang on uneven shards)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def prototype_head(net: nn.Module) -> nn.Module:
    head = getattr(net, "head", None)
    if head is None or not hasattr(head, "prototype_class"):
        raise ValueError(f"model {type(net).__name__} has no prototype head; projection needs ProtoSeg/ScaleProtoSeg")
    return head


def first_item(batch: list[Any]) -> Any:
    return batch[0]


def shard_info(distributed: bool | None) -> tuple[int, int]:
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
    if getattr(out, "distances", None) is None or getattr(out, "features", None) is None:
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
