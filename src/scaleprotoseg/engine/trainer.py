"""The multi-stage training procedure (section 3.3, supplement 6-8), resumable at any optimizer step.

ScaleProtoSeg: warmup -> joint -> projection (+ duplicate removal) [-> proto_finetune] -> group_warmup -> group_joint
-> threshold. ProtoSeg: warmup -> joint -> projection -> pruning -> finetune. DeepLabv2: one train stage. Stage lists,
steps and learning rates come from the config (:func:`scaleprotoseg.config.default_stages`); each stage kind is a
function of :mod:`scaleprotoseg.engine.stages`, the gradient steps are :mod:`scaleprotoseg.engine.loop`. The
``train`` command holds the run directory's lock (:meth:`scaleprotoseg.rundir.RunDir.lock`) around a trainer.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaleprotoseg.checkpoint import CheckpointMeta, load_model, write_checkpoint
from scaleprotoseg.config import GRADIENT_KINDS, Config, StageConfig, save_config
from scaleprotoseg.engine import distributed as dist_utils
from scaleprotoseg.engine.loop import StopRequested, TrainingDiverged
from scaleprotoseg.engine.stages import STAGE_FUNCTIONS
from scaleprotoseg.models.segmenter import Segmenter, build_model, prototype_head
from scaleprotoseg.prototypes.projection import ProjectionResult
from scaleprotoseg.rundir import CheckpointDir, RunDir, atomic_write_json, discard_dir, recover_dir

__all__ = ["StageResult", "StopRequested", "Trainer", "TrainingDiverged", "environment_info"]

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    kind: str
    metrics: dict[str, Any]


def _stage_seed(seed: int, stage_index: int) -> int:
    return int(seed) * 1000 + stage_index


def environment_info(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    """Versions, seed and the start of the run; ``argv`` (the command line of ``scaleprotoseg train``) is kept as a
    list beside the joined ``command``, with the working directory its relative paths are relative to."""
    import numpy

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "seed": cfg.train.seed,
        "command": " ".join(argv if argv is not None else sys.argv),
        **({"argv": [str(a) for a in argv]} if argv is not None else {}),
        "cwd": os.getcwd(),
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
        self._check_stop_at()
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
    def _check_stop_at(self) -> None:
        """``stop_at`` names a gradient stage of this run and a step inside it, or it is refused before anything."""
        if self.stop_at is None:
            return
        stage, step = self.stop_at
        valid = [n for n in self.stage_names() if self.cfg.train.stages[n].kind in GRADIENT_KINDS]
        if stage not in valid:
            raise ValueError(
                f"--stop-at {stage}:{step}: no gradient stage {stage!r} in this run; expected one of {', '.join(valid)}"
            )
        steps = self.cfg.train.stages[stage].steps
        if not 1 <= step <= steps:
            raise ValueError(f"--stop-at {stage}:{step}: step {step} is not valid; expected 1 to {steps}")

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

    def projection_dataset(self) -> Any:
        """Training images as the model sees them at test time (whole, no augmentation) for projection, pruning and
        the prototype patches; built once per trainer."""
        if self._proj_dataset is None:
            from scaleprotoseg.data.registry import build_dataset

            self._proj_dataset = build_dataset(self.cfg.data, self.cfg.data.train_split, train=False)
        return self._proj_dataset

    def save_checkpoint(self, directory: Path, stage: str, step: int, **files: Any) -> None:
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
        """Run all (or ``only`` the named) stages that are not completed yet, resuming a partial one, then export
        ``final/`` (also when a resume finds every stage done but the export unfinished)."""
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
        self.tb = self._tensorboard()
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
            results.append(self.run_stage(i, name, self.cfg.train.stages[name]))
            completed = [n for n in completed if n != name] + [name]
            if self.dist.is_main:
                self.run.write_state({**self.run.read_state(), "completed": completed, "current": None})
            in_memory = True
            dist_utils.barrier()
        export = results[-1].name if results else self._unfinished_export(names, completed, only)
        if export is not None and self.dist.is_main:
            if not results:  # a resume after a crash during the export: the last stage's model, as it was
                self.load_stage_checkpoint(export)
            self.export_final(export)
        dist_utils.barrier()
        if results and self.dist.is_main:  # after the last collective: the other ranks need not wait for it
            self._report_baselines(results)
        return results

    def _unfinished_export(self, names: list[str], completed: list[str], only: list[str] | None) -> str | None:
        """The stage to export when every stage is done but ``final/`` was not (fully) written, else None."""
        if only or not names or any(n not in completed for n in names):
            return None
        final = self.run.checkpoint().recovered()
        if self.run.read_state().get("final") and final is not None and final.weights.is_file():
            return None
        return names[-1]

    def _tensorboard(self) -> Any:
        if not (self.cfg.train.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError(
                "train.tensorboard is true but tensorboard is not installed; pip install 'scaleprotoseg[tensorboard]'"
            ) from err
        return SummaryWriter(str(self.run.tensorboard))

    def run_stage(self, index: int, name: str, stage: StageConfig) -> StageResult:
        """Run one stage (seeded by its index), validate it and write its checkpoint."""
        torch.manual_seed(_stage_seed(self.cfg.train.seed, index))
        if self.dist.is_main:
            steps = f", {stage.steps} steps" if stage.kind in GRADIENT_KINDS else ""
            logger.info("stage %s [%s]%s", name, stage.kind, steps)
            state = self.run.read_state()
            self.run.write_state({**state, "current": {"stage": name, "kind": stage.kind}, "final": None})
        metrics = STAGE_FUNCTIONS[stage.kind](self, name, stage)
        metrics.update(self.validate(name))
        if self.dist.is_main:
            self.save_checkpoint(self.run.stage_dir(name), name, stage.steps)
            discard_dir(self.run.partial_dir(name))
            self.run.log_metrics({"stage": name, "kind": stage.kind, "event": "stage_end", **metrics})
            miou = metrics.get("val_miou")
            logger.info("stage %s done%s", name, f", val mIoU {100 * miou:.2f}" if miou is not None else "")
        return StageResult(name, stage.kind, metrics)

    def last_good(self, stage: str) -> str:
        """The checkpoint a failure in ``stage`` falls back to (for error messages)."""
        partial = recover_dir(self.run.partial_dir(stage))
        if partial is not None:
            return str(partial)
        done = self.run.read_state().get("completed", [])
        return str(self.run.stage_dir(done[-1])) if done else "none (no stage had finished)"

    # -- validation and export ---------------------------------------------------------------------------------
    def validate(self, stage: str, step: int | None = None) -> dict[str, Any]:
        """mIoU on whole validation images (never training crops)."""
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return {}
        from scaleprotoseg.evaluation.evaluate import evaluate
        from scaleprotoseg.evaluation.inference import InferenceSettings

        res = evaluate(
            self.model,
            self.val_dataset,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            device=self.device,
            inference=InferenceSettings.from_config(self.cfg.data),
            progress=False,
        )
        out = {"val_miou": float(res["miou"]), "val_pixel_accuracy": float(res["pixel_accuracy"])}
        if self.dist.is_main:
            self.run.log_metrics({"stage": stage, "event": "validation", "step": step, **out})
            if self.tb is not None:
                self.tb.add_scalar(f"{stage}/val_miou", out["val_miou"], step or 0)
        return out

    def _report_baselines(self, results: list[StageResult]) -> None:
        """Log the validated model next to the trivial baselines; write ``baselines.json`` into the run root.
        ``load_raw`` reads whole images without the training crops, so the training dataset serves as it is."""
        from scaleprotoseg.data.base import SegmentationDataset
        from scaleprotoseg.evaluation.baselines import training_baseline_report

        try:
            own = isinstance(self.train_dataset, SegmentationDataset)
            train = self.train_dataset if own else self.projection_dataset()
            _, lines = training_baseline_report(
                train, self.val_dataset, results, self.run.baselines, split=self.cfg.data.val_split
            )
        except Exception as err:  # a convenience: it must not fail a finished run
            lines = [f"WARNING: baselines not computed ({type(err).__name__}: {err})"]
        for line in lines:
            if line.startswith("WARNING"):
                logger.warning("%s", line.removeprefix("WARNING").lstrip(": "))
            else:
                logger.info("%s", line)
        warnings = [line for line in lines if line.startswith("WARNING")]
        if warnings:
            self.run.log_metrics({"event": "baseline_warning", "warnings": warnings})

    def export_final(self, stage: str) -> Path:
        """Write ``final/`` (aside, then swapped in whole): weights, meta, config, the projection and the prototype
        patches; enough to predict and explain with nothing else (the nearest training patches are a later step,
        ``explain.nearest``). ``state.json`` then says ``final: model``."""
        from scaleprotoseg.prototypes.projection import save_prototype_patches

        def patches(final: CheckpointDir) -> None:
            if self.projection is None or prototype_head(self.model) is None:
                return
            try:
                save_prototype_patches(self.projection, self.projection_dataset(), final.prototypes)
            except Exception as err:  # patches are a convenience: a missing file must not lose the run
                final.error_note("prototypes").write_text(f"could not save prototype patches: {err}\n")

        self.save_checkpoint(self.run.final, stage, 0, config=self.cfg, extra=patches)
        self.run.write_state({**self.run.read_state(), "final": "model"})
        logger.info("final model of stage %s written to %s", stage, self.run.final)
        return self.run.final
