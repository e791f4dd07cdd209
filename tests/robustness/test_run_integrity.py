"""The run directory under abuse: ``kill -9`` anywhere (the final export included) then ``train --resume`` gives the
weights of an uninterrupted run bit for bit; a second trainer on a run directory is refused by its lock; a full disk
while a checkpoint is written leaves the last good checkpoint intact.

Trainers run as subprocesses (``python -m scaleprotoseg train``) so that a kill is a real SIGKILL. The many-kill
version is slow; one kill during the final export stays in the fast suite."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleprotoseg.config import save_config
from scaleprotoseg.rundir import RunDir

SRC = str(Path(__file__).resolve().parents[2] / "src")
# Kill this process (SIGKILL, no cleanup) just before final/ is swapped in: every file of the export is written aside.
KILL_IN_EXPORT = """
import os, signal, sys
import scaleprotoseg.checkpoint as checkpoint
real = checkpoint.replace_dir
def replace_dir(tmp, final):
    if final.name == "final":
        os.kill(os.getpid(), signal.SIGKILL)
    real(tmp, final)
checkpoint.replace_dir = replace_dir
from scaleprotoseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _command(*args: object, script: str | None = None) -> list[str]:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "scaleprotoseg"]
    return [*head, "train", "--no-progress", "--device", "cpu", *map(str, args)]


def _train(*args: object, script: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args, script=script), capture_output=True, text=True, env=_env(), timeout=timeout)


def _config(tmp_path: Path, tiny_config, root: Path, method: str, **extra) -> Path:
    path = tmp_path / f"{method}.yaml"
    save_config(tiny_config(root, method, **{"train.checkpoint_every": 1, **extra}), path)
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


def _finish(run: RunDir, cfg: Path) -> subprocess.CompletedProcess:
    """Continue a killed run the way a user would: resume it, or start it again if it had not written its config."""
    if run.config.is_file():
        return _train("--resume", run.root)
    return _train("-c", cfg, "--run-dir", run.root)


def test_kill_during_final_export_then_resume(synthetic_folder, tmp_path, tiny_config):
    """Fast representative case: SIGKILL with final/ written aside but not swapped in; the stages are all done, so
    before the fix a resume reported success and the run had no final model."""
    cfg = _config(tmp_path, tiny_config, synthetic_folder, "deeplabv2")
    run = RunDir(tmp_path / "run")
    killed = _train("-c", cfg, "--run-dir", run.root, script=KILL_IN_EXPORT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert run.read_state()["completed"] == ["train"] and not (run.final / "model.safetensors").exists()
    resumed = _train("--resume", run.root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(_weights(run.final), _weights(run.stage_dir("train")), "final vs last stage")
    assert run.read_state()["final"] == "done"
    assert not list(run.root.glob(".final.tmp*"))  # what the killed export had written aside is gone


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_random_kills_then_resume_give_the_uninterrupted_weights(synthetic_folder, tmp_path, tiny_config, seed):
    """SIGKILL at random moments of a ScaleProtoSeg run (checkpoint every step) and once during the final export,
    each followed by a resume: every stage checkpoint and final/ equal an uninterrupted run bit for bit."""
    extra = {"train.stages.joint.steps": 4, "train.stages.group_joint.steps": 3}
    cfg = _config(tmp_path, tiny_config, synthetic_folder, "scaleprotoseg", **extra)
    ref = RunDir(tmp_path / "ref")
    start = time.monotonic()
    done = _train("-c", cfg, "--run-dir", ref.root)
    assert done.returncode == 0, done.stderr[-2000:]
    duration = time.monotonic() - start  # the kill times scale with it, so a fast or a busy machine still kills
    rng = random.Random(seed)
    run = RunDir(tmp_path / "run")
    kills = 0
    for _ in range(6):
        cmd = _command("--resume", run.root) if run.config.is_file() else _command("-c", cfg, "--run-dir", run.root)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        try:
            proc.wait(timeout=rng.uniform(0.3, 0.8) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        if proc.returncode == 0:
            break
    if run.read_state().get("final") != "done":  # one more kill, inside the export, if the run got that far
        killed = _train("--resume", run.root, script=KILL_IN_EXPORT)
        kills += killed.returncode == -signal.SIGKILL
    resumed = _finish(run, cfg)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert kills > 0
    for stage in RunDir(ref.root).stages_with_checkpoints():
        _assert_same(_weights(ref.stage_dir(stage)), _weights(run.stage_dir(stage)), stage)
    _assert_same(_weights(ref.final), _weights(run.final), "final")
    assert (run.final / "nearest" / "manifest.json").is_file()


def test_a_second_trainer_is_refused_by_the_lock(synthetic_folder, tmp_path, tiny_config):
    """While one trainer works in a run directory, `train --resume RUN --set train.seed=1` and another `train -c`
    into it both exit with the lock's one-line message naming the first one's pid."""
    cfg = _config(tmp_path, tiny_config, synthetic_folder, "deeplabv2", **{"train.stages.train.steps": 2000})
    run = RunDir(tmp_path / "run")
    first = subprocess.Popen(
        _command("-c", cfg, "--run-dir", run.root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
    )
    try:
        deadline = time.time() + 120
        while not (run.config.is_file() and run.lock_file.is_file()):
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start"
            time.sleep(0.2)
        for args in (("--resume", run.root, "--set", "train.seed=1"), ("-c", cfg, "--run-dir", run.root)):
            second = _train(*args, timeout=300)
            assert second.returncode == 1, second.stderr[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and f"is in use by pid {first.pid} on " in lines[0], second.stderr
        assert first.poll() is None  # the first trainer was not disturbed
    finally:
        first.kill()
        first.wait()


def test_full_disk_keeps_the_last_good_checkpoint(synthetic_folder, tmp_path, tiny_config, monkeypatch):
    """ENOSPC while the step-3 checkpoint is written: a one-line error, the step-2 checkpoint intact and loadable,
    and a resume once there is space again gives the uninterrupted weights."""
    import scaleprotoseg.checkpoint as checkpoint
    from scaleprotoseg.checkpoint import CheckpointWriteError, load_model
    from scaleprotoseg.engine.trainer import Trainer

    cfg = tiny_config(synthetic_folder, "deeplabv2", **{"train.stages.train.steps": 4, "train.checkpoint_every": 1})
    ref = tmp_path / "ref"
    Trainer(cfg, ref, device="cpu", progress=False).run_stages()
    real, calls = checkpoint.save_file, {"n": 0}

    def filling_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", filling_disk)
    run = RunDir(tmp_path / "run")
    with pytest.raises(CheckpointWriteError) as err:
        Trainer(cfg, run.root, device="cpu", progress=False).run_stages()
    assert "\n" not in str(err.value) and "No space left" in str(err.value)
    last = load_model(run, "train", partial=True)  # checksums verified
    assert last.train_state["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    Trainer(cfg, run.root, device="cpu", progress=False).run_stages()
    _assert_same(_weights(ref / "final"), _weights(run.final), "final")
