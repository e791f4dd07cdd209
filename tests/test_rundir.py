"""RunDir and CheckpointDir: every path of a run in one place; state, metrics and atomic directory swaps."""

import json
import os
import socket
import stat

import pytest

from scaleprotoseg.rundir import (
    CheckpointDir,
    RunDir,
    RunDirError,
    RunLockedError,
    atomic_write_json,
    discard_dir,
    recover_dir,
    replace_dir,
)


def test_run_paths(tmp_path):
    run = RunDir(tmp_path / "r")
    root = tmp_path / "r"
    assert run.root == root
    assert run.config == root / "config.yaml"
    assert run.env == root / "env.json"
    assert run.state_file == root / "state.json"
    assert run.metrics == root / "metrics.jsonl"
    assert run.train_log == root / "train.log"
    assert run.baselines == root / "baselines.json"
    assert run.tensorboard == root / "tensorboard"
    assert run.legacy_projection == root / "projection.json"
    assert run.checkpoints == root / "checkpoints"
    assert run.final == root / "final"
    assert run.stage_dir("joint") == root / "checkpoints" / "joint"
    assert run.partial_dir("joint") == root / "checkpoints" / "joint" / "partial"
    assert run.eval == root / "eval"
    assert run.eval_dir(None, "val") == root / "eval" / "final-val"
    assert run.eval_dir("joint", "train") == root / "eval" / "joint-train"
    assert run.analysis == root / "analysis"
    assert run.report == root / "report"


def test_checkpoint_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint().path == run.checkpoint("final").path == tmp_path / "final"
    assert run.checkpoint("joint").path == tmp_path / "checkpoints" / "joint"
    assert run.checkpoint("joint", partial=True).path == tmp_path / "checkpoints" / "joint" / "partial"
    ckpt = CheckpointDir(tmp_path / "c")
    assert ckpt.weights == tmp_path / "c" / "model.safetensors"
    assert ckpt.meta == tmp_path / "c" / "meta.json"
    assert ckpt.train_state == tmp_path / "c" / "train_state.pt"
    assert ckpt.projection == tmp_path / "c" / "projection.json"
    assert ckpt.config == tmp_path / "c" / "config.yaml"
    assert ckpt.prototypes == tmp_path / "c" / "prototypes"
    assert ckpt.nearest == tmp_path / "c" / "nearest"
    assert ckpt.error_note("nearest") == tmp_path / "c" / "nearest_error.txt"


def test_stages_with_checkpoints_skips_files_and_temporary_dirs(tmp_path):
    run = RunDir(tmp_path)
    assert run.stages_with_checkpoints() == []
    for name in ("warmup", "joint", ".joint.tmp123"):
        (run.checkpoints / name).mkdir(parents=True)
    (run.checkpoints / "notes.txt").write_text("x")
    assert run.stages_with_checkpoints() == ["joint", "warmup"]


def test_state_and_metrics(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.read_state() == {"completed": [], "current": None}
    run.write_state({"completed": ["warmup"], "current": None})
    assert run.read_state()["completed"] == ["warmup"]
    run.log_metrics({"a": 1})
    run.log_metrics({"b": 2})
    assert [json.loads(line) for line in run.metrics.read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_replace_recover_and_discard_dirs(tmp_path):
    target = tmp_path / "final"
    assert recover_dir(target) is None and CheckpointDir(target).recovered() is None
    for content in ("one", "two"):
        tmp = tmp_path / f".tmp_{content}"
        atomic_write_json(tmp / "x.json", content)
        replace_dir(tmp, target)
        assert json.loads((target / "x.json").read_text()) == content and not tmp.exists()
    assert not (tmp_path / "final.old").exists()
    target.rename(tmp_path / "final.old")  # a crash between the two renames of replace_dir
    assert recover_dir(target) == tmp_path / "final.old"
    assert CheckpointDir(target).recovered().path == tmp_path / "final.old"
    discard_dir(target)
    assert recover_dir(target) is None


def test_lock_refuses_a_second_holder_naming_it_and_is_released(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock():
        with pytest.raises(RunLockedError) as err, run.lock():
            pass
        msg = str(err.value)
        assert "\n" not in msg and str(run.root) in msg
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg
    with run.lock():  # released when the holder is done
        pass
    # a lock file left by a killed process holds no lock (the OS drops it with the process): no stale lock
    run.lock_file.write_text("pid 99999999 on elsewhere\n")
    with run.lock():
        assert run.lock_file.read_text().startswith(f"pid {os.getpid()}")


def test_history_and_broken_state(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.read_history() == [] and not run.has_progress()
    run.append_history("start", command="train -c x.yaml")
    run.append_history("resume", changes={"train.seed": [0, 1]})
    events = run.read_history()
    assert [e["event"] for e in events] == ["start", "resume"] and events[1]["changes"] == {"train.seed": [0, 1]}
    assert {"time", "pid", "host"} <= set(events[0])
    run.write_state({"completed": [], "current": {"stage": "warmup"}})
    assert not run.has_progress()  # a failure while the first stage started loses nothing
    (run.checkpoints / "warmup" / "partial").mkdir(parents=True)
    assert run.has_progress()
    run.state_file.write_text('{"completed": ["warm')
    with pytest.raises(RunDirError) as err:
        run.read_state()
    assert str(err.value).startswith(f"{run.state_file}: not valid JSON") and "\n" not in str(err.value)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_and_swapped_dirs_follow_the_umask(tmp_path, umask):
    """``mkstemp``/``mkdtemp`` make 0600/0700; what the run keeps (``final/``, JSON files) gets what the umask gives."""
    from scaleprotoseg.rundir import fresh_dir

    old = os.umask(umask)
    try:
        tmp = fresh_dir(tmp_path, ".final.tmp")
        atomic_write_json(tmp / "meta.json", {"a": 1})
        replace_dir(tmp, tmp_path / "final")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "final").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "final" / "meta.json").stat().st_mode) == 0o666 & ~umask
    assert os.umask(old) == old  # the helpers left the process umask as it was
