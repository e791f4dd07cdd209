"""The run directory: every path of a run, and its small files, spelled in one place.

Layout (``runs/<name>/``)::

    config.yaml  env.json  state.json  metrics.jsonl  history.jsonl  train.log  baselines.json  tensorboard/  .lock
    checkpoints/<stage>/           a finished stage: model.safetensors, meta.json, projection.json[, train_state.pt]
    checkpoints/<stage>/partial/   a mid-stage checkpoint (the same files, with train_state.pt)
    final/                         the run's model: the files of a checkpoint, config.yaml, prototypes/, nearest/
    eval/<stage>-<split>/  analysis/  report/

A checkpoint's ``projection.json`` describes the prototypes of that checkpoint (their source patches), so it always
has the numbering of the weights beside it. Runs written before that kept one ``projection.json`` at the run root
(:attr:`RunDir.legacy_projection`). Directories are replaced atomically (:func:`replace_dir`, :func:`recover_dir`).
One process at a time works in a run directory (:meth:`RunDir.lock`, an OS lock on ``.lock`` that a killed process
drops with its file descriptors); ``history.jsonl`` records each start and resume and the config changes a resume
was allowed to make.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FINAL = "final"
BASELINES = "baselines.json"  # the baselines beside a model's scores: in the run root and in each eval/ folder


class RunDirError(ValueError):
    """A file of the run directory is unreadable or not what was expected; the message names it."""


class RunLockedError(RuntimeError):
    """Another process works in the run directory; the message names its pid and host."""


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, empty, uniquely named directory in ``parent`` with the permissions the umask gives (``mkdtemp`` would
    make it 0700, and a directory swapped in from it, such as ``final/``, would keep that)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    path.chmod(0o777 & ~_umask())
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and ``os.replace`` so a reader never sees half of it; the file gets
    the permissions the umask gives, as a plain ``open`` would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """:func:`atomic_write_text` of ``data`` as indented JSON."""
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


def discard_dir(final_dir: Path) -> None:
    """Remove a directory and the old copy :func:`replace_dir` may have left beside it."""
    shutil.rmtree(final_dir, ignore_errors=True)
    shutil.rmtree(final_dir.with_name(final_dir.name + ".old"), ignore_errors=True)


class CheckpointDir:
    """The files of one checkpoint directory (``final/``, ``checkpoints/<stage>/`` or its ``partial/``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CheckpointDir({str(self.path)!r})"

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def train_state(self) -> Path:
        return self.path / "train_state.pt"

    @property
    def projection(self) -> Path:
        return self.path / "projection.json"

    @property
    def config(self) -> Path:
        """The config copy (``final/`` only; stage checkpoints use the run's)."""
        return self.path / "config.yaml"

    @property
    def prototypes(self) -> Path:
        """Projected prototype patches (``final/`` only)."""
        return self.path / "prototypes"

    @property
    def nearest(self) -> Path:
        """Nearest training patches of the prototypes (``final/`` only)."""
        return self.path / "nearest"

    def error_note(self, what: str) -> Path:
        """``<what>_error.txt``: why an optional export (``prototypes``, ``nearest``) is missing."""
        return self.path / f"{what}_error.txt"

    def recovered(self) -> CheckpointDir | None:
        """This checkpoint as it is on disk after a crash while it was replaced, or ``None`` if there is none."""
        found = recover_dir(self.path)
        return None if found is None else CheckpointDir(found)


class RunDir:
    """Paths and small files of one run directory (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

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
    def baselines(self) -> Path:
        return self.root / BASELINES

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def legacy_projection(self) -> Path:
        """Where runs written before per-checkpoint projections kept theirs (read only, to resume such runs)."""
        return self.root / "projection.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / FINAL

    def stage_dir(self, stage: str) -> Path:
        return self.checkpoints / stage

    def partial_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "partial"

    def checkpoint(self, stage: str | None = None, *, partial: bool = False) -> CheckpointDir:
        """``final/`` (``stage`` None or ``"final"``), ``checkpoints/<stage>/`` or its ``partial/``."""
        if stage is None or stage == FINAL:
            return CheckpointDir(self.final)
        return CheckpointDir(self.partial_dir(stage) if partial else self.stage_dir(stage))

    def stages_with_checkpoints(self) -> list[str]:
        """Names of the stages that have a checkpoint directory, sorted."""
        return sorted(p.name for p in self.checkpoints.glob("*") if p.is_dir() and not p.name.startswith("."))

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_dir(self, stage: str | None, split: str) -> Path:
        """``eval/<stage>-<split>/`` (``final`` when ``stage`` is None)."""
        return self.eval / f"{stage or FINAL}-{split}"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def train_log(self) -> Path:
        """The messages of ``scaleprotoseg train`` (appended by each start and resume)."""
        return self.root / "train.log"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def read_state(self) -> dict[str, Any]:
        """``state.json`` (completed stages, the current one, ``final``: whether ``final/`` is written); an empty
        state before the first stage."""
        if not self.state_file.is_file():
            return {"completed": [], "current": None}
        try:
            state = json.loads(self.state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{self.state_file}: not valid JSON ({err}); expected the run's state") from None
        if not isinstance(state, dict) or not isinstance(state.get("completed", []), list):
            raise RunDirError(f"{self.state_file}: expected a mapping with a 'completed' list, got {state!r:.80}")
        return state

    def has_progress(self) -> bool:
        """Whether anything of the run would be lost by starting it over: a finished stage or a checkpoint."""
        return bool(self.read_state().get("completed")) or bool(self.stages_with_checkpoints())

    def append_history(self, event: str, **fields: Any) -> None:
        """Append one record (``event``, time, pid, host and ``fields``) to ``history.jsonl``."""
        record = {"event": event, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid()}
        record.update(host=socket.gethostname(), **fields)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.history, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history.is_file():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process (``fcntl.flock`` on ``.lock``; the OS drops it when the process
        ends, so a killed run leaves no stale lock). A second holder is refused with :class:`RunLockedError`."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise RunLockedError(
                    f"run directory {self.root} is in use by {holder} (lock {self.lock_file}); "
                    "wait for that process to end or use another run directory"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_file, state)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl``."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")
