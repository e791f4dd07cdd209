"""The run directory and its checkpoints, written atomically.

Layout (``runs/<name>/``): ``config.yaml``, ``env.json``, ``state.json``, ``metrics.jsonl``,
``checkpoints/<stage>/`` (``model.safetensors``, ``meta.json``, ``train_state.pt``; a mid-stage checkpoint lives in
``checkpoints/<stage>/partial/``), ``final/`` (self-describing: weights, config, class names, projection). Weights
are safetensors; the training state (optimizer, scheduler, RNG, sampler position) is a ``torch.save`` file made only
of tensors and plain containers, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and ``os.replace`` so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written ``tmp_dir`` into place; the old one survives until the new one is there."""
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(final_dir: Path) -> Path | None:
    """The directory to read after a crash in :func:`replace_dir`: the new one, else the surviving old one."""
    if final_dir.is_dir():
        return final_dir
    old = final_dir.with_name(final_dir.name + ".old")
    return old if old.is_dir() else None


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def write_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write weights (safetensors), ``meta.json`` and optionally ``train_state.pt`` into ``directory`` atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    try:
        save_file(state_dict_for_saving(model), str(tmp / "model.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read (weights, meta, train_state or None) from a checkpoint directory, with errors naming the file."""
    found = recover_dir(Path(directory))
    if found is None:
        raise FileNotFoundError(f"checkpoint {directory} does not exist")
    weights_path = found / "model.safetensors"
    meta_path = found / "meta.json"
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} is missing")
    try:
        weights = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    meta = json.loads(meta_path.read_text())
    state_path = found / "train_state.pt"
    train_state = torch.load(state_path, map_location="cpu", weights_only=True) if state_path.is_file() else None
    return weights, meta, train_state


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists what differs."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model; "
            f"missing keys: {missing[:10]}, unexpected keys: {unexpected[:10]}"
        )


class RunDir:
    """Paths and small files of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def partial_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "partial"

    def read_state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"completed": [], "current": None}
        return json.loads(self.state_file.read_text())

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_file, state)

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")
