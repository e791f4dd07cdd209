"""The optimizer-step loop of the gradient stages (kinds ``train`` and ``proto_finetune``), resumable at any step.

A stage trains the parameter groups it names (``StageConfig.trainable``) for ``steps`` optimizer steps of
``accumulation`` batches each. Mid-stage checkpoints (``train.checkpoint_every``) hold the optimizer, scheduler, RNG
and the sampler position, so a run killed anywhere and resumed gives the same weights as an uninterrupted one. The
host-device synchronisation points of a step are marked ``# host sync``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from scaleprotoseg.config import StageConfig
from scaleprotoseg.engine import distributed as dist_utils
from scaleprotoseg.engine.group_stats import group_change, group_snapshot
from scaleprotoseg.engine.optim import build_optimizer, build_scheduler
from scaleprotoseg.engine.sampler import KeyedDataset, StreamSampler
from scaleprotoseg.losses import compute_losses, msc_loss_outputs
from scaleprotoseg.models.heads import ScaleProtoSegHead
from scaleprotoseg.models.segmenter import msc_forward, prototype_head
from scaleprotoseg.rundir import recover_dir

if TYPE_CHECKING:
    from scaleprotoseg.engine.trainer import Trainer

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the stage and step. Nothing after the last good checkpoint
    was written."""


class StopRequested(Exception):
    """Raised internally when ``stop_at`` is reached (used to stop a run at a chosen step, e.g. in tests)."""


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def _batches(t: Trainer, consumed: int) -> Iterator[dict[str, Any]]:
    """Training batches from sample number ``consumed`` of the seeded stream (the same on a resume)."""
    cfg = t.cfg
    sampler = StreamSampler(len(t.train_dataset), cfg.train.seed, consumed, t.dist.rank, t.dist.world_size)
    loader = DataLoader(
        KeyedDataset(t.train_dataset),
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=_collate,
        pin_memory=t.device.type == "cuda",
        persistent_workers=False,
    )
    return iter(loader)


def _losses(t: Trainer, net: torch.nn.Module, batch: dict[str, Any], terms: list[str]) -> dict[str, torch.Tensor]:
    """Forward one batch (multi-scale inputs when configured) and compute the stage's loss terms (Eqs. 7 and 9)."""
    cfg = t.cfg
    x = batch["image"].to(t.device, non_blocking=True)
    y = batch["label"].to(t.device, non_blocking=True)
    amp = cfg.train.amp and t.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
        if cfg.data.msc_scales:
            outs, fused = msc_forward(net, x, cfg.data.msc_scales, cfg.data.msc_fusion)
            output, *extra = msc_loss_outputs(outs, fused, cfg.data.msc_scales, cfg.loss.msc_all_scales)
        else:
            output, extra = net(x), []
    return compute_losses(output, y, t.model.head, cfg.loss, terms, ignore_index=t.ignore_index, extra_outputs=extra)


def train_steps(t: Trainer, name: str, stage: StageConfig) -> dict[str, Any]:
    """Run (or resume) the optimizer steps of a gradient stage; return its metrics (mean losses, group change)."""
    cfg, model = t.cfg, t.model
    head = model.head
    proto = prototype_head(model)
    if stage.groups and not (proto is not None and proto.grouped):
        if not isinstance(proto, ScaleProtoSegHead):
            raise ValueError(f"stage {name}: groups need a ScaleProtoSeg model, not {model.method}")
        proto.enable_groups()
    start_step, consumed, train_state = 0, 0, None
    if recover_dir(t.run.partial_dir(name)) is not None:
        train_state = t.load_stage_checkpoint(name, partial=True)
        start_step = int(train_state["step"])
        consumed = int(train_state["samples_consumed"])
    group_start = None  # the groups at the start of the stage (kept in the partial checkpoint to survive a resume)
    if stage.groups:
        saved = (train_state or {}).get("group_start")
        group_start = saved if saved is not None else group_snapshot(head)
    unknown = model.set_trainable(stage.trainable)
    if unknown:
        raise ValueError(f"stage {name}: the {model.method} model has no parameter group(s) {', '.join(unknown)}")
    optimizer = build_optimizer(model, stage)
    scheduler = build_scheduler(optimizer, stage)
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        torch.set_rng_state(train_state["rng"])
    net: torch.nn.Module = model
    if t.dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[t.device.index] if t.device.type == "cuda" else None
        )
    model.train()
    batches = _batches(t, consumed)
    terms = stage.losses or ["ce"]
    groups_head = proto if "groups" in stage.trainable and isinstance(proto, ScaleProtoSegHead) else None
    show = t.progress and t.dist.is_main
    bar = tqdm(total=stage.steps, initial=start_step, desc=name, disable=not show, dynamic_ncols=True)
    t0 = time.time()
    running: dict[str, float] = {}
    for step in range(start_step, stage.steps):
        optimizer.zero_grad(set_to_none=True)
        step_terms: dict[str, float] = {}
        for _ in range(stage.accumulation):
            losses = _losses(t, net, next(batches), terms)
            consumed += cfg.data.batch_size
            total = losses["total"]
            if not torch.isfinite(total):  # host sync: stop before a NaN reaches the weights
                raise TrainingDiverged(
                    f"stage {name!r}, step {step}: the loss is {total.item()} "
                    f"(terms: { {k: round(float(v.detach()), 6) for k, v in losses.items()} }); stopped before the "
                    f"optimizer step, nothing was written; the last good checkpoint is {t.last_good(name)}"
                )
            (total / stage.accumulation).backward()
            for k, v in losses.items():  # host sync: the loss values for the log and the progress bar
                step_terms[k] = step_terms.get(k, 0.0) + float(v.detach()) / stage.accumulation
        optimizer.step()
        scheduler.step()
        if groups_head is not None:
            groups_head.project_groups_()  # projected gradient: rows back on the simplex after every step
        for k, v in step_terms.items():
            running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
        done = step + 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()}, refresh=False)
        if done % max(cfg.train.log_every, 1) == 0 or done == stage.steps:
            _log_step(t, name, done, step_terms, scheduler.get_last_lr()[0], time.time() - t0)
        if cfg.train.val_every and done % cfg.train.val_every == 0 and done != stage.steps:
            t.validate(name, step=done)  # host sync: a whole validation pass
            model.train()
        at_stop = t.stop_at == (name, done)
        every = cfg.train.checkpoint_every
        if (every and done % every == 0 and done != stage.steps) or at_stop:
            if t.dist.is_main:  # host sync: the weights and optimizer state go to disk
                state = {
                    "stage": name,
                    "step": done,
                    "samples_consumed": consumed,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                }
                if group_start is not None:
                    state["group_start"] = group_start
                t.save_checkpoint(t.run.partial_dir(name), name, done, train_state=state)
                t.run.write_state({**t.run.read_state(), "current": {"stage": name, "step": done}})
            dist_utils.barrier()
        if at_stop:
            bar.close()
            logger.debug("%s: stopped at step %d as requested (checkpoint written)", name, done)
            raise StopRequested(f"stopped at stage {name} step {done} as requested")
    bar.close()
    del batches
    model.set_trainable([])
    metrics: dict[str, Any] = {"steps": stage.steps, "loss": {k: round(v, 6) for k, v in running.items()}}
    if group_start is not None:
        metrics["groups"] = group_change(group_start, head)
    return metrics


def _log_step(t: Trainer, name: str, done: int, step_terms: dict[str, float], lr: float, seconds: float) -> None:
    """One ``metrics.jsonl`` record (and TensorBoard scalars) of the loss terms averaged over the ranks."""
    reduced = dist_utils.all_reduce_mean(step_terms, t.device)  # collective (host sync): every rank calls it
    if not t.dist.is_main:
        return
    t.run.log_metrics({"stage": name, "step": done, "lr": lr, **reduced, "time": round(seconds, 3)})
    terms = "  ".join(f"{k} {v:.4g}" for k, v in reduced.items())
    logger.debug("%s step %d: %s  lr %.3g  (%.1f s)", name, done, terms, lr, seconds)
    if t.tb is not None:
        for k, v in reduced.items():
            t.tb.add_scalar(f"{name}/{k}", v, done)
