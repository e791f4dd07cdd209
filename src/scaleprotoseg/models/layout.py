"""Padded index tables of the prototypes: the one place where a flat list of prototypes is laid out per row.

Every layout of the heads is a table of rows (a class, a (class, scale) pair or a scale) with each row's prototypes
in their original order, padded to the longest row: the group members per class (Eq. 2), the members per (class,
scale) of the diversity loss (Eqs. 3-6) and the per-scale slots of the inference path (:mod:`.fused`).
"""

from __future__ import annotations

import torch


def padded_index(row: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``index (R, K)`` of the entries of each row (``row[i]`` is the row of entry i) in their order, and ``mask``.

    K is the longest row (at least 1). Padding entries point at entry 0 and are masked out; a row without entries
    gets an all-false mask.
    """
    counts = torch.bincount(row, minlength=num_rows)
    k = max(int(counts.max().item()) if len(counts) else 0, 1)
    order = torch.argsort(row, stable=True)
    sorted_row = row[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=row.device) - starts[sorted_row]
    index = torch.zeros(num_rows, k, dtype=torch.long, device=row.device)
    mask = torch.zeros(num_rows, k, dtype=torch.bool, device=row.device)
    index[sorted_row, rank] = order
    mask[sorted_row, rank] = True
    return index, mask


def member_table(
    prototype_class: torch.Tensor, prototype_scale: torch.Tensor, num_classes: int, num_scales: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, S, M) table of prototype indices per (class, scale), padded, with its validity mask."""
    index, mask = padded_index(prototype_class * num_scales + prototype_scale, num_classes * num_scales)
    return index.view(num_classes, num_scales, -1), mask.view(num_classes, num_scales, -1)


def padded_layout(
    prototype_scale: torch.Tensor, num_scales: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Slots of a per-scale (S, m, D) layout for the prototypes in ``keep`` (default: all), m = the largest count.

    Returns ``source`` (S*m,): the prototype each slot reads (padding slots repeat the first kept prototype; their
    results are never used), ``slot`` (P,): the slot of each prototype, -1 if not kept, and m.
    """
    P = len(prototype_scale)
    device = prototype_scale.device
    kept = torch.arange(P, device=device) if keep is None else torch.nonzero(keep.to(device)).flatten()
    index, mask = padded_index(prototype_scale[kept], num_scales)
    m = index.shape[1]
    if len(kept) == 0:
        return torch.zeros(num_scales * m, dtype=torch.long, device=device), torch.full((P,), -1, device=device), m
    slot = torch.full((P,), -1, dtype=torch.long, device=device)
    slot[kept[index[mask]]] = torch.nonzero(mask.flatten()).flatten()
    return kept[index.flatten()], slot, m
