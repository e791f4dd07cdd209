"""Whole-split evaluation: predict every image at full resolution, accumulate one confusion matrix, report mIoU."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from scaleprotoseg.evaluation.inference import Mode, predict_logits
from scaleprotoseg.evaluation.miou import ConfusionMatrix
from scaleprotoseg.models.segmenter import MscFusion

__all__ = ["evaluate", "shard_indices"]


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Indices of this rank's shard, ``rank::world_size`` like a non-shuffling DistributedSampler but without the
    padding duplicates, so that every image is counted exactly once over all ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")
    return list(range(rank, num_samples, world_size))


def _collate_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _group_by_size(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return list(groups.values())


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    ignore_index: int = 255,
    device: torch.device | str | None = None,
    mode: Mode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    test_size: int = 0,
    msc_scales: Sequence[float] = (),
    msc_fusion: MscFusion = "features",
    flip: bool = False,
    tile_batch_size: int = 4,
    batch_size: int = 1,
    num_workers: int = 0,
    max_samples: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """mIoU of ``model`` over ``dataset`` (items: ``image`` (3, H, W) float32, ``label`` (H, W) int64).

    Images are predicted whole-size with `predict_logits` (the mode arguments are passed through), the argmax is
    compared with the label and counts are summed over the split (ignore pixels excluded). A batch of
    ``batch_size`` items is split into groups of equal image size, so variable-size splits need no padding. Under
    torch.distributed each rank evaluates the shard ``rank::world_size`` and the matrices are summed; every rank
    returns the same metrics. The model is put in eval mode and its previous mode restored afterwards; ``device``
    (default: the device of the model's first parameter) is where images, labels and the counts go.

    Returns `ConfusionMatrix.compute()` plus ``num_images``, ``seconds`` and ``seconds_per_image`` (wall clock of
    this rank) and ``mode``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; expected >= 1")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(dataset)  # type: ignore[arg-type]
    if max_samples > 0:
        n = min(n, max_samples)
    subset = Subset(dataset, shard_indices(n, rank, world))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_list)

    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    count = 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for items in tqdm(loader, desc="evaluate", disable=not progress or rank != 0, dynamic_ncols=True):
            for group in _group_by_size(items):
                image = torch.stack([torch.as_tensor(it["image"]) for it in group]).to(device, non_blocking=True)
                label = torch.stack([torch.as_tensor(it["label"]) for it in group]).to(device, non_blocking=True)
                if tuple(label.shape[-2:]) != tuple(image.shape[-2:]):
                    name = group[0].get("name", group[0].get("index", "?"))
                    raise ValueError(
                        f"sample {name}: label size {tuple(label.shape[-2:])} differs from image size "
                        f"{tuple(image.shape[-2:])}; expected equal sizes"
                    )
                logits = predict_logits(
                    model,
                    image,
                    mode=mode,
                    crop_size=crop_size,
                    stride=stride,
                    test_size=test_size,
                    msc_scales=msc_scales,
                    msc_fusion=msc_fusion,
                    flip=flip,
                    tile_batch_size=tile_batch_size,
                )
                cm.update(logits.argmax(dim=1), label)
                count += len(group)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    cm.all_reduce()
    if distributed:
        total = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        count = int(total.item())
    result = cm.compute()
    result.update(
        num_images=count,
        seconds=seconds,
        seconds_per_image=seconds * world / count if count else float("nan"),
        mode=mode,
    )
    return result
