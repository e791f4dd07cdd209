"""The stage kinds of the multi-stage procedure (section 3.3, supplement 6-8): one small function per kind.

Each function gets the :class:`~scaleprotoseg.engine.trainer.Trainer` (model, data, run directory), the stage's name
and its :class:`~scaleprotoseg.config.StageConfig`, changes the model in place and returns the stage's metrics (the
``stage_end`` record of ``metrics.jsonl``). :data:`STAGE_FUNCTIONS` maps every kind of
:data:`scaleprotoseg.config.STAGE_KINDS` to its function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from scaleprotoseg.config import StageConfig
from scaleprotoseg.engine.loop import train_steps
from scaleprotoseg.models.heads import ScaleProtoSegHead
from scaleprotoseg.models.segmenter import prototype_head

if TYPE_CHECKING:
    from scaleprotoseg.engine.trainer import Trainer

StageFunction = Callable[["Trainer", str, StageConfig], dict[str, Any]]


def train(t: Trainer, name: str, stage: StageConfig) -> dict[str, Any]:
    """Gradient steps on the groups the stage names: warm-up, joint, ProtoSeg's fine-tuning, the group stages."""
    return train_steps(t, name, stage)


def proto_finetune(t: Trainer, name: str, stage: StageConfig) -> dict[str, Any]:
    """Stage-1 last-layer fine-tuning after projection (the authors' release; section 6 of the paper): gradient steps
    on h_proto alone, before groups exist. With ``model.freeze_bn: false`` (ISBI EM) the training-mode forward passes
    also refresh the batch-norm statistics for the projected prototypes, as the release does."""
    head = prototype_head(t.model)
    if head is None or head.grouped:
        what = "a grouped model" if head is not None else f"a {t.model.method} model"
        raise ValueError(f"stage {name}: proto_finetune trains h_proto of an ungrouped prototype model, not {what}")
    return train_steps(t, name, stage)


def projection(t: Trainer, name: str, stage: StageConfig) -> dict[str, Any]:
    """Prototype projection onto the nearest training patches, then exact duplicates removed (section 3.3)."""
    from scaleprotoseg.prototypes import projection as proj

    if prototype_head(t.model) is None:
        raise ValueError(f"stage {name}: projection needs a prototype model, not {t.model.method}")
    result = proj.project_prototypes(
        t.model,
        t.projection_dataset(),
        device=t.device,
        ignore_index=t.ignore_index,
        num_workers=t.cfg.data.num_workers,
        progress=t.progress and t.dist.is_main,
    )
    proj.apply_projection(t.model, result)
    before = t.model.head.num_prototypes
    report = proj.remove_duplicates(t.model)
    t.projection = result.select(report.kept)
    return {
        "prototypes_before": before,
        "prototypes_after": t.model.head.num_prototypes,
        "duplicates_removed": len(report.removed),
    }


def pruning(t: Trainer, name: str, stage: StageConfig) -> dict[str, Any]:
    """ProtoSeg's pruning: a prototype goes when fewer than ``prune_threshold`` of its ``prune_k`` nearest training
    patches are of its class."""
    from scaleprotoseg.prototypes import pruning as prune

    before = t.model.head.num_prototypes
    report = prune.prune_prototypes(
        t.model,
        t.projection_dataset(),
        k=stage.prune_k,
        threshold=stage.prune_threshold,
        device=t.device,
        ignore_index=t.ignore_index,
        progress=t.progress and t.dist.is_main,
    )
    if t.projection is not None:
        t.projection = t.projection.select(report.kept)
    return {
        "prototypes_before": before,
        "prototypes_after": t.model.head.num_prototypes,
        "pruned": len(report.pruned),
        "rescued": len(report.rescued),
    }


def threshold(t: Trainer, name: str, stage: StageConfig) -> dict[str, Any]:
    """Group weights below ``alpha`` set to zero (section 3.2)."""
    head = prototype_head(t.model)
    if not isinstance(head, ScaleProtoSegHead) or head.grouping is None:
        raise ValueError(f"stage {name}: thresholding needs trained groups (run group stages first)")
    zeroed = head.threshold_groups_(stage.alpha)
    return {
        "alpha": stage.alpha,
        "weights_zeroed": zeroed,
        "prototypes_used": int(head.grouping.used_prototypes().numel()),
    }


STAGE_FUNCTIONS: Mapping[str, StageFunction] = MappingProxyType(
    {
        "train": train,
        "proto_finetune": proto_finetune,
        "projection": projection,
        "pruning": pruning,
        "threshold": threshold,
    }
)
