"""The multi-stage training procedure (section 3.3, supplement 6-8), resumable at any optimizer step.

ScaleProtoSeg: warmup -> joint -> projection (+ duplicate removal) -> group_warmup -> group_joint -> threshold.
ProtoSeg: warmup -> joint -> projection -> pruning -> finetune. DeepLabv2: one train stage. Stage lists, steps and
learning rates come from the config (:func:`scaleprotoseg.config.default_stages`).
"""

from __future__ import annotations

import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from scaleprotoseg.checkpoint import CheckpointMeta, load_model, write_checkpoint
from scaleprotoseg.config import Config, StageConfig, save_config
from scaleprotoseg.engine import distributed as dist_utils
from scaleprotoseg.engine.group_stats import group_change, group_snapshot
from scaleprotoseg.engine.optim import build_optimizer, build_scheduler
from scaleprotoseg.engine.sampler import KeyedDataset, StreamSampler
from scaleprotoseg.losses import compute_losses, msc_loss_outputs
from scaleprotoseg.models.segmenter import Segmenter, build_model, msc_forward, prototype_head
from scaleprotoseg.prototypes.projection import ProjectionResult
from scaleprotoseg.rundir import CheckpointDir, RunDir, atomic_write_json, discard_dir, recover_dir


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the stage and step. Nothing after the last good checkpoint
    was written."""


class StopRequested(Exception):
    """Raised internally when ``stop_at`` is reached (used to stop a run at a chosen step, e.g. in tests)."""


@dataclass
class StageResult:
    name: str
    kind: str
    metrics: dict[str, Any]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def _stage_seed(seed: int, stage_index: int) -> int:
    return int(seed) * 1000 + stage_index


def environment_info(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    import numpy

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "seed": cfg.train.seed,
        "command": " ".join(argv if argv is not None else sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class Trainer:
    """Runs a config's stages in order into a run directory and keeps enough state to resume anywhere."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        device: str | None = None,
        progress: bool = True,
        stop_at: tuple[str, int] | None = None,
        train_dataset: Any = None,
        val_dataset: Any = None,
    ) -> None:
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.progress = progress
        self.stop_at = stop_at
        self.dist = dist_utils.current()
        dev_name = device or cfg.train.device
        self.device = dist_utils.resolve_device(dev_name, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self._load_datasets()
        self.info = self.train_dataset.info
        num_classes = cfg.data.num_classes or len(self.info.class_names)
        if cfg.data.num_classes and cfg.data.num_classes != len(self.info.class_names):
            raise ValueError(
                f"data.num_classes is {cfg.data.num_classes} but the dataset has {len(self.info.class_names)} classes"
            )
        self.num_classes = num_classes
        self.ignore_index = self.info.ignore_index
        torch.manual_seed(cfg.train.seed)
        self.model: Segmenter = build_model(cfg.model, num_classes).to(self.device)
        self.tb = None
        self._proj_dataset = None
        self.projection: ProjectionResult | None = None  # the sources of the current prototypes, once projected

    # -- setup -------------------------------------------------------------------------------------------------
    def _load_datasets(self) -> None:
        from scaleprotoseg.data.registry import build_dataset

        if self.train_dataset is None:
            self.train_dataset = build_dataset(
                self.cfg.data, self.cfg.data.train_split, train=True, seed=self.cfg.train.seed
            )
        if self.val_dataset is None and self.cfg.data.val_split:
            self.val_dataset = build_dataset(self.cfg.data, self.cfg.data.val_split, train=False)
        if len(self.train_dataset) == 0:
            raise ValueError(f"the training split {self.cfg.data.train_split!r} of {self.cfg.data.root} is empty")
        self._check_files_exist()

    def _check_files_exist(self) -> None:
        """Fail at start, not hours later, when a listed file is missing (contents: ``scaleprotoseg data check``)."""
        missing: list[str] = []
        for ds in (self.train_dataset, self.val_dataset):
            if ds is None or not hasattr(ds, "sample_files"):
                continue
            for i in range(len(ds)):
                missing += [str(f) for f in ds.sample_files(i) if not Path(f).is_file()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"{len(missing)} dataset file(s) listed in the splits do not exist: {', '.join(missing[:5])}{more}; "
                f"run `scaleprotoseg data check` on the dataset"
            )

    def _projection_dataset(self):
        """Training images as the model sees them at test time (whole, no augmentation) for projection, pruning and
        the prototype patches; built once per trainer."""
        if self._proj_dataset is None:
            from scaleprotoseg.data.registry import build_dataset

            self._proj_dataset = build_dataset(self.cfg.data, self.cfg.data.train_split, train=False)
        return self._proj_dataset

    def _save(self, directory: Path, stage: str, step: int, **files: Any) -> None:
        """Write the model, its metadata and the projection of its prototypes as a checkpoint into ``directory``."""
        meta = CheckpointMeta.of_model(
            self.model, stage=stage, step=step, info=self.info, normalization=self.cfg.data.normalization
        )
        projection = self.projection if prototype_head(self.model) is not None else None
        write_checkpoint(directory, self.model, meta, projection=projection, **files)

    def load_stage_checkpoint(self, stage: str, partial: bool = False) -> dict[str, Any] | None:
        """Load the model (and the projection of its prototypes) of a stage's checkpoint; return its training state."""
        loaded = load_model(self.run, stage, self.device, partial=partial, into=self.model)
        self.projection = loaded.projection
        return loaded.train_state

    # -- the run -----------------------------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        return [n for n, s in self.cfg.train.stages.items() if s.enabled]

    def run_stages(self, only: list[str] | None = None, argv: list[str] | None = None) -> list[StageResult]:
        """Run all (or ``only`` the named) stages that are not completed yet, resuming a partial one."""
        names = self.stage_names()
        if only:
            unknown = [n for n in only if n not in names]
            if unknown:
                raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown)}; this run has {', '.join(names)}")
        state = self.run.read_state()
        completed: list[str] = list(state.get("completed", []))
        if self.dist.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run.config)
            atomic_write_json(self.run.env, environment_info(self.cfg, argv))
        dist_utils.barrier()
        if self.cfg.train.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError(
                    "train.tensorboard is true but tensorboard is not installed; "
                    "pip install 'scaleprotoseg[tensorboard]'"
                ) from err
            self.tb = SummaryWriter(str(self.run.tensorboard))
        results = []
        in_memory = False  # does self.model hold the output of the stage before this one?
        for i, name in enumerate(names):
            if (only and name not in only) or (not only and name in completed):
                in_memory = False
                continue
            if not in_memory:
                earlier = [n for n in names[:i] if n in completed]
                if earlier:  # resuming, or --stages: start from the latest finished stage before this one
                    self.load_stage_checkpoint(earlier[-1])
            results.append(self._run_stage(i, name, self.cfg.train.stages[name]))
            completed = [n for n in completed if n != name] + [name]
            if self.dist.is_main:
                self.run.write_state({"completed": completed, "current": None})
            in_memory = True
            dist_utils.barrier()
        if results and self.dist.is_main:
            self.export_final(results[-1].name)
        dist_utils.barrier()
        if results and self.dist.is_main:  # after the last collective: the other ranks need not wait for it
            self._report_baselines(results)
        return results

    def _run_stage(self, index: int, name: str, stage: StageConfig) -> StageResult:
        torch.manual_seed(_stage_seed(self.cfg.train.seed, index))
        if self.dist.is_main:
            self.run.write_state({**self.run.read_state(), "current": {"stage": name, "kind": stage.kind}})
        if stage.kind == "train":
            metrics = self._train_stage(name, stage)
        elif stage.kind == "projection":
            metrics = self._projection_stage(name)
        elif stage.kind == "pruning":
            metrics = self._pruning_stage(name, stage)
        elif stage.kind == "threshold":
            metrics = self._threshold_stage(name, stage)
        else:  # pragma: no cover - the schema forbids it
            raise ValueError(f"unknown stage kind {stage.kind!r}")
        val = self.validate(name)
        metrics.update(val)
        if self.dist.is_main:
            self._save(self.run.stage_dir(name), name, stage.steps)
            discard_dir(self.run.partial_dir(name))
            self.run.log_metrics({"stage": name, "kind": stage.kind, "event": "stage_end", **metrics})
        return StageResult(name, stage.kind, metrics)

    # -- train stages ------------------------------------------------------------------------------------------
    def _uses_groups(self, stage: StageConfig) -> bool:
        return "groups" in stage.trainable or any(t in ("entropy", "l1_group") for t in stage.losses)

    def _train_stage(self, name: str, stage: StageConfig) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        head = model.head
        proto = prototype_head(model)
        if self._uses_groups(stage) and not (proto is not None and proto.grouped):
            if proto is None:
                raise ValueError(f"stage {name}: groups need a ScaleProtoSeg model, not {model.method}")
            proto.enable_groups()
        start_step, consumed, train_state = 0, 0, None
        if recover_dir(self.run.partial_dir(name)) is not None:
            train_state = self.load_stage_checkpoint(name, partial=True)
            start_step = int(train_state["step"])
            consumed = int(train_state["samples_consumed"])
        group_start = None  # the groups at the start of the stage (kept in the partial checkpoint to survive a resume)
        if "groups" in stage.trainable and proto is not None and proto.grouping is not None:
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
        if self.dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        model.train()
        bs = cfg.data.batch_size
        sampler = StreamSampler(len(self.train_dataset), cfg.train.seed, consumed, self.dist.rank, self.dist.world_size)
        loader = DataLoader(
            KeyedDataset(self.train_dataset),
            batch_size=bs,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        batches = iter(loader)
        terms = stage.losses or ["ce"]
        amp = cfg.train.amp and self.device.type == "cuda"
        bar = tqdm(
            total=stage.steps,
            initial=start_step,
            desc=f"{name}",
            disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        t0 = time.time()
        running: dict[str, float] = {}
        for step in range(start_step, stage.steps):
            optimizer.zero_grad(set_to_none=True)
            step_terms: dict[str, float] = {}
            for _ in range(stage.accumulation):
                batch = next(batches)
                consumed += bs
                x = batch["image"].to(self.device, non_blocking=True)
                y = batch["label"].to(self.device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
                    if cfg.data.msc_scales:
                        outs, fused = msc_forward(net, x, cfg.data.msc_scales, cfg.data.msc_fusion)
                        output, *extra = msc_loss_outputs(outs, fused, cfg.data.msc_scales, cfg.loss.msc_all_scales)
                    else:
                        output, extra = net(x), []
                losses = compute_losses(
                    output, y, head, cfg.loss, terms, ignore_index=self.ignore_index, extra_outputs=extra
                )
                total = losses["total"]
                if not torch.isfinite(total):
                    raise TrainingDiverged(
                        f"stage {name!r}, step {step}: the loss is {total.item()} "
                        f"(terms: { {k: round(float(v.detach()), 6) for k, v in losses.items()} }); stopped before the "
                        f"optimizer step, nothing was written; the last good checkpoint is {self._last_good(name)}"
                    )
                (total / stage.accumulation).backward()
                for k, v in losses.items():
                    step_terms[k] = step_terms.get(k, 0.0) + float(v.detach()) / stage.accumulation
            optimizer.step()
            scheduler.step()
            if group_start is not None:
                head.grouping.project_()  # projected gradient: rows back on the simplex after every step
            for k, v in step_terms.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            done = step + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()}, refresh=False)
            if done % max(cfg.train.log_every, 1) == 0 or done == stage.steps:
                reduced = dist_utils.all_reduce_mean(step_terms, self.device)  # collective: every rank calls it
                if self.dist.is_main:
                    rec = {
                        "stage": name,
                        "step": done,
                        "lr": scheduler.get_last_lr()[0],
                        **reduced,
                        "time": round(time.time() - t0, 3),
                    }
                    self.run.log_metrics(rec)
                    if self.tb is not None:
                        for k, v in reduced.items():
                            self.tb.add_scalar(f"{name}/{k}", v, done)
            if cfg.train.val_every and done % cfg.train.val_every == 0 and done != stage.steps:
                self.validate(name, step=done)
                model.train()
            at_stop = self.stop_at is not None and self.stop_at == (name, done)
            if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done != stage.steps) or (
                at_stop
            ):
                if self.dist.is_main:
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
                    self._save(self.run.partial_dir(name), name, done, train_state=state)
                    self.run.write_state({**self.run.read_state(), "current": {"stage": name, "step": done}})
                dist_utils.barrier()
            if at_stop:
                bar.close()
                raise StopRequested(f"stopped at stage {name} step {done} as requested")
        bar.close()
        del batches
        model.set_trainable([])
        metrics: dict[str, Any] = {"steps": stage.steps, "loss": {k: round(v, 6) for k, v in running.items()}}
        if group_start is not None:
            metrics["groups"] = group_change(group_start, head)
        return metrics

    def _last_good(self, stage: str) -> str:
        partial = recover_dir(self.run.partial_dir(stage))
        if partial is not None:
            return str(partial)
        done = self.run.read_state().get("completed", [])
        return str(self.run.stage_dir(done[-1])) if done else "none (no stage had finished)"

    # -- non-gradient stages -----------------------------------------------------------------------------------
    def _projection_stage(self, name: str) -> dict[str, Any]:
        from scaleprotoseg.prototypes import projection

        if prototype_head(self.model) is None:
            raise ValueError(f"stage {name}: projection needs a prototype model, not {self.model.method}")
        result = projection.project_prototypes(
            self.model,
            self._projection_dataset(),
            device=self.device,
            ignore_index=self.ignore_index,
            num_workers=self.cfg.data.num_workers,
            progress=self.progress and self.dist.is_main,
        )
        projection.apply_projection(self.model, result)
        before = self.model.head.num_prototypes
        report = projection.remove_duplicates(self.model)
        self.projection = result.select(report.kept)
        return {
            "prototypes_before": before,
            "prototypes_after": self.model.head.num_prototypes,
            "duplicates_removed": len(report.removed),
        }

    def _pruning_stage(self, name: str, stage: StageConfig) -> dict[str, Any]:
        from scaleprotoseg.prototypes import pruning

        before = self.model.head.num_prototypes
        report = pruning.prune_prototypes(
            self.model,
            self._projection_dataset(),
            k=stage.prune_k,
            threshold=stage.prune_threshold,
            device=self.device,
            ignore_index=self.ignore_index,
            progress=self.progress and self.dist.is_main,
        )
        if self.projection is not None:
            self.projection = self.projection.select(report.kept)
        return {
            "prototypes_before": before,
            "prototypes_after": self.model.head.num_prototypes,
            "pruned": len(report.pruned),
            "rescued": len(report.rescued),
        }

    def _threshold_stage(self, name: str, stage: StageConfig) -> dict[str, Any]:
        head = prototype_head(self.model)
        if head is None or head.grouping is None:
            raise ValueError(f"stage {name}: thresholding needs trained groups (run group stages first)")
        zeroed = head.grouping.threshold_(stage.alpha)
        return {
            "alpha": stage.alpha,
            "weights_zeroed": zeroed,
            "prototypes_used": int(head.grouping.used_prototypes().numel()),
        }

    # -- validation and export ---------------------------------------------------------------------------------
    def validate(self, stage: str, step: int | None = None) -> dict[str, Any]:
        """mIoU on whole validation images (never training crops)."""
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return {}
        from scaleprotoseg.evaluation.evaluate import evaluate

        d = self.cfg.data
        res = evaluate(
            self.model,
            self.val_dataset,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            device=self.device,
            mode=d.test_mode,
            crop_size=tuple(d.crop_size),
            test_size=d.test_size,
            msc_scales=tuple(d.msc_scales),
            msc_fusion=d.msc_fusion,
            progress=False,
        )
        out = {"val_miou": float(res["miou"]), "val_pixel_accuracy": float(res["pixel_accuracy"])}
        if self.dist.is_main:
            self.run.log_metrics({"stage": stage, "event": "validation", "step": step, **out})
            if self.tb is not None:
                self.tb.add_scalar(f"{stage}/val_miou", out["val_miou"], step or 0)
        return out

    def _report_baselines(self, results: list[StageResult]) -> None:
        """Print the validated model next to the trivial baselines; write ``baselines.json`` into the run root.
        ``load_raw`` reads whole images without the training crops, so the training dataset serves as it is."""
        from scaleprotoseg.data.base import SegmentationDataset
        from scaleprotoseg.evaluation.baselines import training_baseline_report

        try:
            own = isinstance(self.train_dataset, SegmentationDataset)
            train = self.train_dataset if own else self._projection_dataset()
            _, lines = training_baseline_report(
                train, self.val_dataset, results, self.run.baselines, split=self.cfg.data.val_split
            )
        except Exception as err:  # a convenience: it must not fail a finished run
            lines = [f"WARNING: baselines not computed ({type(err).__name__}: {err})"]
        for line in lines:
            print(line)
        warnings = [line for line in lines if line.startswith("WARNING")]
        if warnings:
            self.run.log_metrics({"event": "baseline_warning", "warnings": warnings})

    def export_final(self, stage: str) -> Path:
        """Write ``final/``: weights, meta, config, the projection and the prototype patches; enough to predict and
        explain with nothing else (the nearest training patches are a later step, ``explain.nearest``)."""
        from scaleprotoseg.prototypes.projection import save_prototype_patches

        def patches(final: CheckpointDir) -> None:
            if self.projection is None or prototype_head(self.model) is None:
                return
            try:
                save_prototype_patches(self.projection, self._projection_dataset(), final.prototypes)
            except Exception as err:  # patches are a convenience: a missing file must not lose the run
                final.error_note("prototypes").write_text(f"could not save prototype patches: {err}\n")

        self._save(self.run.final, stage, 0, config=self.cfg, extra=patches)
        return self.run.final
