"""``scaleprotoseg train`` on a tiny run: the run directory's lock, refused config changes on resume, an unfinished
export finished by a resume, an unknown --stop-at stage, and a failure at a stage's start that must not block
re-running the command."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from scaleprotoseg.cli import main
from scaleprotoseg.config import save_config
from scaleprotoseg.rundir import RunDir


@pytest.fixture
def tiny_yaml(synthetic_folder, tmp_path, tiny_config):
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config(synthetic_folder, "deeplabv2"), path)
    return path


def train(*args: str) -> int:
    return main(["train", "--no-progress", "--device", "cpu", *map(str, args)])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_resume_finishes_an_unfinished_export_and_refuses_changes(tiny_yaml, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert train("-c", tiny_yaml, "--run-dir", run.root) == 0
    state = run.read_state()
    assert state["completed"] == ["train"] and state["final"] == "done"
    written = load_file(str(run.final / "model.safetensors"))
    # a kill during the export: every stage is done but final/ is not there; a resume writes it again
    shutil.rmtree(run.final)
    assert train("--resume", run.root) == 0
    again = load_file(str(run.final / "model.safetensors"))
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)
    # a resume that would change the config is refused, the config is left as it was
    capsys.readouterr()  # the runs' messages so far (a baseline warning of this tiny model may be among them)
    before = run.config.read_text()
    assert train("--resume", run.root, "--set", "train.seed=1") == 1
    err = error_line(capsys)
    assert "config.yaml: this would change the run's config (train.seed: 3 -> 1)" in err and "--allow-changes" in err
    assert run.config.read_text() == before
    assert train("--resume", run.root, "--set", "train.seed=1", "--allow-changes") == 0
    history = run.read_history()
    assert [h["event"] for h in history] == ["start", "resume", "resume"]
    assert history[-1]["changes"] == {"train.seed": [3, 1]}
    # a second `train -c` into the same directory is still refused (the run has finished stages)
    assert train("-c", tiny_yaml, "--run-dir", run.root) == 1
    assert "already holds a run" in error_line(capsys)


def test_a_locked_run_directory_is_refused(tiny_yaml, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    with run.lock():  # another process at work in the directory
        assert train("-c", tiny_yaml, "--run-dir", run.root) == 1
        assert "is in use by pid" in error_line(capsys)
    assert not run.state_file.exists()


def test_unknown_stop_at_stage_is_refused_before_anything(tiny_yaml, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert train("-c", tiny_yaml, "--run-dir", run.root, "--stop-at", "joint:1") == 1
    err = error_line(capsys)
    assert "--stop-at joint:1" in err and "expected one of train" in err
    assert train("-c", tiny_yaml, "--run-dir", run.root, "--stop-at", "train:9") == 1
    assert "expected 1 to 2" in error_line(capsys)
    assert not run.state_file.exists()


def test_a_failure_at_a_stage_start_does_not_block_the_rerun(tiny_yaml, tmp_path, capsys, monkeypatch):
    import scaleprotoseg.engine.loop as loop

    real = loop.build_optimizer

    def broken(*args, **kwargs):
        raise ValueError("optimizer: bad setting")

    monkeypatch.setattr(loop, "build_optimizer", broken)
    run = RunDir(tmp_path / "run")
    assert train("-c", tiny_yaml, "--run-dir", run.root) == 1
    assert "bad setting" in error_line(capsys)
    assert run.state_file.is_file()  # the stage had started
    monkeypatch.setattr(loop, "build_optimizer", real)
    assert train("-c", tiny_yaml, "--run-dir", run.root) == 0
    assert json.loads(run.state_file.read_text())["completed"] == ["train"]
