"""What a group stage did to the groups: the records behind the report's Groups table."""

from __future__ import annotations

from typing import Any

import torch

from scaleprotoseg.losses import group_entropy_loss

__all__ = ["group_change", "group_snapshot"]


def group_snapshot(head: Any) -> dict[str, torch.Tensor]:
    """Copies of the group weights w_g (Eq. 2) and of h_group, to measure what a stage changes."""
    return {"weight": head.grouping.weight.detach().clone(), "h_group": head.h_group.detach().clone()}


def group_change(start: dict[str, torch.Tensor], head: Any) -> dict[str, float]:
    """How far a stage moved the groups from ``start`` (:func:`group_snapshot`): max and mean |Δw| over the class
    members (padding excluded), the Frobenius norm of Δw, the mean normalised row entropy (Eq. 8, normalised as
    :func:`~scaleprotoseg.losses.group_entropy_loss`) before and after, and max |Δh_group|."""
    mask = head.grouping.member_mask
    w0, w1 = start["weight"].to(mask.device), head.grouping.weight.detach()
    members = mask.unsqueeze(1).expand_as(w1)
    diff = (w1 - w0) * members
    d = diff[members].abs()
    dh = (head.h_group.detach() - start["h_group"].to(mask.device)).abs()
    return {
        "entropy_before": float(group_entropy_loss(w0, mask)),
        "entropy_after": float(group_entropy_loss(w1, mask)),
        "weight_change_mean": float(d.mean()) if d.numel() else 0.0,
        "weight_change_max": float(d.max()) if d.numel() else 0.0,
        "weight_change_frobenius": float(torch.linalg.vector_norm(diff)),
        "h_group_change_max": float(dh.max()) if dh.numel() else 0.0,
    }
