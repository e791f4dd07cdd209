"""Per-stage optimizer and learning-rate schedule.

The prototype methods use Adam, beta = (0.9, 0.999) (supplement section 6); the DeepLabv2 baseline uses DeepLab's own
recipe, SGD with momentum 0.9 (``StageConfig.optimizer``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adam", "sgd")


def _conv_parameters(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of the kernels and of the biases of every convolution in ``model``."""
    kernels: set[int] = set()
    biases: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            kernels.add(id(m.weight))
            if m.bias is not None:
                biases.add(id(m.bias))
    return kernels, biases


def build_optimizer(model: nn.Module, stage: Any) -> torch.optim.Optimizer:
    """Adam or SGD (``stage.optimizer``) over the stage's trainable groups, each with its own learning rate.

    Weight decay (``stage.weight_decay``) applies to the convolutions (backbone and ASPP): to their kernels always and
    to their biases when ``stage.bias_decay`` (the authors' release decays the ASPP biases too; DeepLabv2's recipe does
    not); convolution biases learn at ``stage.bias_lr_factor`` times their group's rate (DeepLabv2: 2, i.e. 20x the
    base rate on the classifier). Batch norm, prototypes, group weights and last layers get no decay (the last layers
    have their own L1 terms).
    """
    if stage.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {stage.optimizer!r} is not valid; expected one of {', '.join(OPTIMIZERS)}")
    kernels, biases = _conv_parameters(model)
    groups = model.param_groups()
    param_groups: list[dict[str, Any]] = []
    for name in stage.trainable:
        params = [p for p in groups.get(name, []) if p.requires_grad]
        if not params:
            continue
        lr = float(stage.lr[name])
        decay = [p for p in params if id(p) in kernels]
        bias = [p for p in params if id(p) in biases]
        rest = [p for p in params if id(p) not in kernels and id(p) not in biases]
        bias_decay = stage.weight_decay if stage.bias_decay else 0.0
        for suffix, ps, group_lr, wd in (
            ("", decay, lr, stage.weight_decay),
            ("_bias", bias, lr * stage.bias_lr_factor, bias_decay),
            ("_nodecay", rest, lr, 0.0),
        ):
            if ps:
                param_groups.append({"params": ps, "lr": group_lr, "weight_decay": wd, "name": f"{name}{suffix}"})
    if not param_groups:
        raise ValueError(f"no trainable parameters for groups {stage.trainable}")
    if stage.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=stage.momentum)
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
