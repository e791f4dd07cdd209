"""Checkpoints: the typed, versioned metadata record, atomic writing, and :func:`load_model`, the one way to get a
model back from a run (training resumes with it, prediction, evaluation and the analyses load with it).

A checkpoint directory (see :mod:`scaleprotoseg.rundir`) holds weights as safetensors, ``meta.json``
(:class:`CheckpointMeta`), the projection of its prototypes (``projection.json``, prototype models after projection)
and, mid-stage, ``train_state.pt``: optimizer, scheduler, RNG and sampler position, made only of tensors and plain
containers (loadable with ``weights_only=True``). ``meta.json`` carries the sha256 of each of those files, checked
when the checkpoint is loaded, so a damaged file is reported as such (naming it) instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scaleprotoseg.config import Config, load_config
from scaleprotoseg.models.heads import PrototypeHead
from scaleprotoseg.models.segmenter import Segmenter, build_model
from scaleprotoseg.prototypes.projection import ProjectionResult
from scaleprotoseg.rundir import FINAL, CheckpointDir, RunDir, fresh_dir, replace_dir

CHECKPOINT_VERSION = 1
CHECKPOINT_FORMAT = f"scaleprotoseg-checkpoint/{CHECKPOINT_VERSION}"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or not what was expected; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the previous one at that place is unchanged."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself (``meta.json``): enough to rebuild the model and show its output.

    ``palette`` is (C, 3) uint8; ``structure`` is the head's :meth:`Segmenter.structure` (prototype classes and
    scales, groups); ``step`` is the optimizer step of the stage when the checkpoint was written (0 for ``final/``);
    ``checksums`` maps file names of the checkpoint to their sha256 (filled in by :func:`write_checkpoint`; empty in
    checkpoints written before checksums existed, which are then loaded unchecked).
    """

    method: str
    stage: str
    class_names: list[str]
    palette: np.ndarray
    ignore_index: int
    normalization: str
    output_stride: int
    structure: dict[str, Any]
    step: int = 0
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def of_model(cls, model: Segmenter, *, stage: str, step: int, info: Any, normalization: str) -> CheckpointMeta:
        """The record of ``model`` for a dataset ``info`` (``DatasetInfo``: class names, palette, ignore index)."""
        return cls(
            method=model.method,
            stage=stage,
            class_names=list(info.class_names),
            palette=np.asarray(info.palette, dtype=np.uint8).reshape(-1, 3),
            ignore_index=int(info.ignore_index),
            normalization=normalization,
            output_stride=int(model.output_stride),
            structure=model.structure(),
            step=int(step),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.method,
            "stage": self.stage,
            "step": self.step,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "palette": [list(map(int, c)) for c in self.palette],
            "ignore_index": int(self.ignore_index),
            "normalization": self.normalization,
            "output_stride": self.output_stride,
            "structure": self.structure,
            "checksums": dict(self.checksums),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "meta.json") -> CheckpointMeta:
        """Parse a ``meta.json`` dict; ``source`` (the file) names it in errors. The format must be this version's."""
        found = d.get("format") if isinstance(d, dict) else None
        if found != CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: checkpoint format {found!r}; expected {CHECKPOINT_FORMAT!r}")
        try:
            return cls(
                method=str(d["method"]),
                stage=str(d.get("stage", "")),
                class_names=[str(n) for n in d["class_names"]],
                palette=np.asarray(d["palette"], dtype=np.uint8).reshape(-1, 3),
                ignore_index=int(d["ignore_index"]),
                normalization=str(d.get("normalization", "imagenet")),
                output_stride=int(d.get("output_stride", 8)),
                structure=dict(d["structure"]),
                step=int(d.get("step", 0)),
                checksums={str(k): str(v) for k, v in dict(d.get("checksums", {})).items()},
            )
        except KeyError as err:
            raise ValueError(f"{source}: checkpoint metadata has no {err.args[0]!r}; expected a meta.json") from err

    @classmethod
    def read(cls, path: str | Path) -> CheckpointMeta:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} is missing")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err}); expected a checkpoint's meta.json") from None
        return cls.from_dict(data, path)

    def verify(self, directory: str | Path) -> None:
        """Check the files of the checkpoint in ``directory`` against :attr:`checksums`; a missing or changed file is
        a :class:`CheckpointError` naming it."""
        for name, want in self.checksums.items():
            path = Path(directory) / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing; {Path(directory) / 'meta.json'} lists it")
            got = file_sha256(path)
            if got != want:
                raise CheckpointError(
                    f"{path}: corrupted (sha256 {got[:16]}..., written as {want[:16]}...); "
                    "restore it or re-run the stage that wrote it"
                )


def write_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    meta: CheckpointMeta,
    *,
    train_state: dict[str, Any] | None = None,
    projection: ProjectionResult | None = None,
    config: Config | None = None,
    extra: Callable[[CheckpointDir], None] | None = None,
) -> None:
    """Write a checkpoint into ``directory`` atomically: weights, ``meta.json`` (with the sha256 of the weights, the
    training state and the projection) and, when given, ``train_state.pt``, ``projection.json``, ``config.yaml``;
    ``extra(ckpt)`` adds more files before the directory is swapped in. Nothing replaces the previous checkpoint
    until every file is written: a failure to write (a full disk) is a :class:`CheckpointWriteError` and leaves it.
    Temporary directories of an earlier write that was killed are removed first (one process per run directory)."""
    from scaleprotoseg.config import save_config

    directory = Path(directory)
    tmp: Path | None = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        for stale in directory.parent.glob(f".{directory.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = fresh_dir(directory.parent, f".{directory.name}.tmp")
        ckpt = CheckpointDir(tmp)
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(ckpt.weights))
        checked = [ckpt.weights]
        if train_state is not None:
            torch.save(train_state, ckpt.train_state)
            checked.append(ckpt.train_state)
        if projection is not None:
            ckpt.projection.write_text(json.dumps(projection.to_dict(), indent=2) + "\n")
            checked.append(ckpt.projection)
        meta = replace(meta, checksums={p.name: file_sha256(p) for p in checked})
        ckpt.meta.write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
        if config is not None:
            save_config(config, ckpt.config)
        if extra is not None:
            extra(ckpt)
        replace_dir(tmp, directory)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError | SafetensorError):
            raise CheckpointWriteError(
                f"could not write checkpoint {directory}: {err}; the previous checkpoint there (if any) is unchanged"
            ) from err
        raise


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists what differs."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model; "
            f"missing keys: {missing[:10]}, unexpected keys: {unexpected[:10]}"
        )


@dataclass
class LoadedCheckpoint:
    """What :func:`load_model` returns: the model with its config and metadata, the directory it came from, the
    training state (mid-stage checkpoints) and the projection of its prototypes (``None`` when there is none)."""

    model: Segmenter
    config: Config
    meta: CheckpointMeta
    directory: Path
    train_state: dict[str, Any] | None
    projection: ProjectionResult | None


def find_checkpoint(run: RunDir, stage: str | None = None, *, partial: bool = False) -> CheckpointDir:
    """The checkpoint directory of ``stage`` (``final/`` by default) as it is on disk, or a clear error."""
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    wanted = run.checkpoint(stage, partial=partial)
    found = wanted.recovered()
    if found is not None and found.weights.is_file():
        return found
    if stage in (None, FINAL):
        raise FileNotFoundError(f"{run.final} has no model.safetensors; has training finished? (try --stage NAME)")
    if found is None:
        have = run.stages_with_checkpoints()
        what = f"partial checkpoint for stage {stage!r}" if partial else f"checkpoint for stage {stage!r}"
        raise FileNotFoundError(f"{run.root} has no {what}; it has: {', '.join(have) or 'none'}")
    raise FileNotFoundError(f"checkpoint file {found.weights} is missing")


def _read_projection(run: RunDir, ckpt: CheckpointDir, model: Segmenter) -> ProjectionResult | None:
    """The checkpoint's ``projection.json``; for a run of the old layout, the run root's when its prototype layout
    is the model's (as the old trainer used it); else ``None``."""
    if ckpt.projection.is_file():
        return ProjectionResult.load(ckpt.projection)
    head = model.head
    if not run.legacy_projection.is_file() or not isinstance(head, PrototypeHead):
        return None
    legacy = ProjectionResult.load(run.legacy_projection)
    same = torch.equal(legacy.prototype_class, head.prototype_class.cpu()) and torch.equal(
        legacy.prototype_scale, head.prototype_scale.cpu()
    )
    if not same:
        warnings.warn(
            f"{run.legacy_projection} (old run layout) has another prototype numbering than {ckpt.path}; not used",
            stacklevel=3,
        )
    return legacy if same else None


def _read_train_state(path: Path) -> dict[str, Any]:
    """``train_state.pt`` loaded with ``weights_only=True`` (tensors and plain containers, never arbitrary objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers ({first}); "
            "expected a training state written by scaleprotoseg"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable training state ({type(err).__name__}: {err})") from None
    missing = [k for k in ("step", "samples_consumed", "optimizer", "scheduler", "rng") if k not in (state or {})]
    if not isinstance(state, dict) or missing:
        raise CheckpointError(f"{path}: not a training state (missing {', '.join(missing) or 'everything'})")
    return state


def load_model(
    run: str | Path | RunDir,
    stage: str | None = None,
    device: torch.device | str = "cpu",
    *,
    partial: bool = False,
    into: Segmenter | None = None,
) -> LoadedCheckpoint:
    """Load the model of ``final/`` (or of ``stage``'s checkpoint, or its mid-stage ``partial`` one) of a run.

    The model is built from the checkpoint's config (``final/config.yaml``, else the run's ``config.yaml``) without
    pretrained backbone files (the weights are stored), its head takes the stored structure, and it is moved to
    ``device`` (a ``torch.device`` or a name torch knows; resolve ``auto`` with
    :func:`scaleprotoseg.engine.distributed.resolve_device`) in eval mode. With ``into`` (training resumes), that
    model takes the structure and weights instead and keeps its mode. Errors name the file and what was expected.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    ckpt = find_checkpoint(run, stage, partial=partial)
    cfg = load_config(ckpt.config if ckpt.config.is_file() else run.config)
    cfg.model.pretrained = None
    meta = CheckpointMeta.read(ckpt.meta)
    meta.verify(ckpt.path)
    if partial and not ckpt.train_state.is_file():
        raise CheckpointError(f"{ckpt.train_state}: missing; a mid-stage checkpoint needs its training state")
    try:
        weights = load_file(str(ckpt.weights))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{ckpt.weights}: not a readable safetensors file ({err})") from err
    model = into if into is not None else build_model(cfg.model, meta.num_classes)
    model.apply_structure(meta.structure)
    load_weights(model, weights, str(ckpt.path))
    model.refresh_layout()  # the inference layout depends on the loaded group weights
    model.to(torch.device(device))
    if into is None:
        model.eval()
    train_state = _read_train_state(ckpt.train_state) if ckpt.train_state.is_file() else None
    return LoadedCheckpoint(model, cfg, meta, ckpt.path, train_state, _read_projection(run, ckpt, model))
