"""Per-stage optimizer and learning-rate schedule (supplement section 6: Adam, beta = (0.9, 0.999))."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_optimizer(model: nn.Module, stage: Any) -> torch.optim.Adam:
    """Adam over the stage's trainable groups, each with its own learning rate.

    Weight decay applies to convolution kernels only (backbone and ASPP), as in the release; prototypes, group
    weights and last layers get none (the last layers have their own L1 term).
    """
    groups = model.param_groups()
    param_groups: list[dict[str, Any]] = []
    for name in stage.trainable:
        params = [p for p in groups.get(name, []) if p.requires_grad]
        if not params:
            continue
        decay = [p for p in params if p.ndim == 4]
        rest = [p for p in params if p.ndim != 4]
        lr = float(stage.lr[name])
        if decay:
            param_groups.append({"params": decay, "lr": lr, "weight_decay": stage.weight_decay, "name": f"{name}"})
        if rest:
            param_groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": f"{name}_nodecay"})
    if not param_groups:
        raise ValueError(f"no trainable parameters for groups {stage.trainable}")
    # On a GPU, the fused kernel updates every parameter in a few launches (same update rule, same state layout).
    on_gpu = all(p.is_cuda and p.is_floating_point() for g in param_groups for p in g["params"])
    return torch.optim.Adam(param_groups, betas=(0.9, 0.999), fused=True if on_gpu else None)


def lr_factor(step: int, total: int, schedule: str, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``: 1 (constant) or ``(1 - step/total)^power``."""
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return max(0.0, 1.0 - step / max(total, 1)) ** power
    raise ValueError(f"schedule {schedule!r} is not valid; expected 'constant' or 'poly'")


def build_scheduler(optimizer: torch.optim.Optimizer, stage: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, stage.steps, stage.schedule, stage.power)
    )
