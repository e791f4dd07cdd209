"""Expert edits of a run: prototypes and groups removed by a person, recorded and re-exported as a new stage.

An edit is saved as the checkpoint ``checkpoints/edit-NNN/`` of the run (see :mod:`scaleprotoseg.rundir`): the
edited model (the rule of :mod:`scaleprotoseg.explore.decision`: removed prototypes leave their groups, which are
renormalised onto the simplex; removed or emptied groups get a zero last-layer column; prototypes that no group uses
any more are dropped), its ``meta.json`` (stage ``edit-NNN``), the projection of the prototypes it keeps and
``edit.json`` (:class:`EditRecord`: what was removed, by whom, why, when, from which checkpoint, with the old -> new
prototype numbering and the measured effect when known). ``scaleprotoseg evaluate RUN --stage edit-NNN`` measures
it; :func:`finetune_edit` runs a short ``group_joint`` on it into ``checkpoints/edit-NNN-finetune/``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import getpass
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleprotoseg.checkpoint import CheckpointMeta, load_model, write_checkpoint
from scaleprotoseg.explore.decision import Ablation, DecisionTables, ExploreError
from scaleprotoseg.models.segmenter import Segmenter, prototype_head
from scaleprotoseg.rundir import FINAL, CheckpointDir, RunDir, atomic_write_json

__all__ = ["EDIT_PREFIX", "EditRecord", "apply_ablation", "finetune_edit", "list_edits", "save_edit"]

EDIT_PREFIX = "edit-"
RECORD = "edit.json"


@dataclass
class EditRecord:
    """``edit.json``: one expert edit of a run."""

    stage: str
    base: str
    removed_prototypes: list[int]
    removed_groups: list[int]
    author: str
    reason: str
    created: str
    kept_prototypes: list[int] = field(default_factory=list)  # old index of each prototype of the edited model
    effect: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, **asdict(self)}

    @classmethod
    def read(cls, path: Path) -> EditRecord:
        try:
            d = json.loads(Path(path).read_text())
            d.pop("version", None)
            return cls(**d)
        except (OSError, ValueError, TypeError) as err:
            raise ExploreError(f"{path}: not a readable edit record ({err}); expected an edit.json") from err

    @property
    def ablation(self) -> Ablation:
        return Ablation.of(self.removed_prototypes, self.removed_groups)


@torch.no_grad()
def apply_ablation(model: Segmenter, ablation: Ablation) -> tuple[Segmenter, list[int]]:
    """A copy of ``model`` with ``ablation`` applied for good; returns it and the kept prototypes (old indices).

    The copy computes the same scores as :meth:`DecisionTables.ablate` predicts (tests).
    """
    head = prototype_head(model)
    if head is None:
        raise ExploreError(f"a {model.method} model has no prototypes to remove")
    tables = DecisionTables.of_head(head).ablate(ablation)
    new = copy.deepcopy(model)
    nh = prototype_head(new)
    assert nh is not None
    dev = nh.h_proto.device
    if nh.grouping is None:
        nh.h_proto.copy_(tables.last_layer.to(dev))
        used = torch.nonzero(tables.last_layer.abs().sum(0) > 0).flatten()
    else:
        g = nh.grouping
        C, N, K = g.weight.shape
        dense = tables.group_weight.to(dev).view(C, N, -1)  # type: ignore[union-attr]
        gathered = dense.gather(2, g.member_index.unsqueeze(1).expand(C, N, K))
        g.weight.copy_(gathered * g.member_mask.unsqueeze(1))
        nh.h_group.copy_(tables.last_layer.to(dev))  # type: ignore[union-attr]
        used = g.used_prototypes().cpu()
    nh.refresh_layout()  # the group weights changed in place: rebuild the inference layout
    keep = sorted(int(p) for p in used)
    if not keep:
        raise ExploreError("the edit removes every prototype the model uses; expected at least one to remain")
    if len(keep) < nh.num_prototypes:
        nh.remove_prototypes(torch.tensor(keep, dtype=torch.long))
    return new, keep


def list_edits(run: str | Path | RunDir) -> list[EditRecord]:
    """The edit records of a run, oldest first."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    return [EditRecord.read(run.stage_dir(s) / RECORD) for s in run.stages_with_checkpoints() if _is_edit(run, s)]


def _is_edit(run: RunDir, stage: str) -> bool:
    return stage.startswith(EDIT_PREFIX) and (run.stage_dir(stage) / RECORD).is_file()


def _next_stage(run: RunDir) -> str:
    numbers = [int(s[len(EDIT_PREFIX) :]) for s in run.stages_with_checkpoints() if s[len(EDIT_PREFIX) :].isdigit()]
    return f"{EDIT_PREFIX}{max(numbers, default=0) + 1:03d}"


def save_edit(
    run: str | Path,
    ablation: Ablation,
    *,
    author: str | None = None,
    reason: str = "",
    base: str | None = None,
    effect: dict[str, Any] | None = None,
) -> EditRecord:
    """Apply ``ablation`` to the model of ``base`` (``final/`` by default) and save it as the next ``edit-NNN``
    checkpoint of ``run``, with its :class:`EditRecord`. Writes only inside ``run/checkpoints/``."""
    if ablation.empty:
        raise ExploreError("the edit removes nothing; expected some prototypes or groups to remove")
    rd = RunDir(run)
    loaded = load_model(rd, base, "cpu")
    model, keep = apply_ablation(loaded.model, ablation)
    stage = _next_stage(rd)
    meta = CheckpointMeta(
        method=loaded.meta.method,
        stage=stage,
        class_names=loaded.meta.class_names,
        palette=loaded.meta.palette,
        ignore_index=loaded.meta.ignore_index,
        normalization=loaded.meta.normalization,
        output_stride=loaded.meta.output_stride,
        structure=model.structure(),
    )
    record = EditRecord(
        stage=stage,
        base=base or FINAL,
        removed_prototypes=sorted(ablation.prototypes),
        removed_groups=sorted(ablation.groups),
        author=(author or "").strip() or _user(),
        reason=reason.strip(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        kept_prototypes=keep,
        effect=effect,
    )
    projection = None if loaded.projection is None else loaded.projection.select(keep)

    def extra(ckpt: CheckpointDir) -> None:
        atomic_write_json(ckpt.path / RECORD, record.to_dict())

    write_checkpoint(rd.stage_dir(stage), model, meta, projection=projection, extra=extra)
    return record


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def finetune_edit(run: str | Path, stage: str, steps: int = 100, device: str = "cpu", progress: bool = True) -> Path:
    """A short ``group_joint`` (groups and last layer, the run's learning rates and losses) on the edited model of
    ``stage``; saved as ``checkpoints/<stage>-finetune/`` with the same edit record. Returns that directory."""
    from scaleprotoseg.engine.trainer import Trainer

    rd = RunDir(run)
    if not _is_edit(rd, stage):
        raise ExploreError(f"{rd.stage_dir(stage)} is not an edit; expected one of: {_edit_names(rd) or 'none'}")
    record = EditRecord.read(rd.stage_dir(stage) / RECORD)
    loaded = load_model(rd, stage, "cpu")
    cfg = loaded.config
    if "group_joint" not in cfg.train.stages:
        raise ExploreError(f"{rd.config}: the run has no group_joint stage to fine-tune with")
    joint = copy.deepcopy(cfg.train.stages["group_joint"])
    joint.steps = int(steps)
    name = f"{stage}-finetune"
    cfg.train.stages = {name: joint}
    trainer = Trainer(cfg, rd.root, device=device, progress=progress)
    into: nn.Module = trainer.model
    loaded = load_model(rd, stage, trainer.device, into=into)  # type: ignore[arg-type]
    trainer.projection = loaded.projection
    state = rd.read_state()
    try:
        result = trainer.run_stage(0, name, joint)
    finally:
        rd.write_state(state)  # the fine-tune is no stage of the run's config: --resume must not see it
    head = prototype_head(trainer.model)
    if head is not None and head.grouping is not None and record.removed_groups:
        with torch.no_grad():  # the projection of each step put removed groups back on the simplex: off again
            off = torch.tensor(record.removed_groups, dtype=torch.long)
            head.grouping.weight.view(-1, head.grouping.weight.shape[-1])[off] = 0
            head.h_group[:, off] = 0  # type: ignore[index]
        head.refresh_layout()
        trainer.save_checkpoint(rd.stage_dir(name), name, joint.steps)
    record.stage, record.base, record.effect = name, stage, {"finetune_steps": int(steps), **result.metrics}
    atomic_write_json(rd.stage_dir(name) / RECORD, record.to_dict())
    return rd.stage_dir(name)


def _edit_names(run: RunDir) -> str:
    return ", ".join(s for s in run.stages_with_checkpoints() if _is_edit(run, s))
