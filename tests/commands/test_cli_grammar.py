"""One grammar for the verbs: --set/--print-config, the shared inference options of evaluate/predict/explain, explain
over folders, paths recorded absolute so that a run is usable from any directory, -v/-q and the run's train.log."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from scaleprotoseg import cli
from scaleprotoseg.commands.options import inference_changes, inference_settings
from scaleprotoseg.config import load_config, save_config
from scaleprotoseg.rundir import RunDir


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def write_images(folder: Path, names: list[str], size: int = 20) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((size, size + 4, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def copied_config(synthetic_folder, tiny_config, tmp_path) -> Path:
    """A config copied away from its dataset's parent: ``base:`` and ``data.root`` relative to the config file."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.move(str(synthetic_folder), project / "data" / "synthetic")
    cfg = tiny_config(project / "data" / "synthetic", "deeplabv2")
    cfg.data.root = "../data/synthetic"
    (project / "configs").mkdir()
    save_config(cfg, project / "configs" / "_base.yaml")
    (project / "configs" / "tiny.yaml").write_text("base: _base.yaml\nname: tiny\ntrain: {seed: 4}\n")
    return project / "configs" / "tiny.yaml"


def test_a_run_records_absolute_paths_and_evaluates_from_anywhere(copied_config, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the config's folder nor the dataset's
    run = RunDir(tmp_path / "run")
    assert cli.main(["train", "-c", str(copied_config), "--run-dir", str(run.root), "--no-progress"]) == 0
    recorded = yaml.safe_load(run.config.read_text())["data"]["root"]
    assert recorded == str(copied_config.parents[1] / "data" / "synthetic") and Path(recorded).is_absolute()
    assert yaml.safe_load(run.config.read_text())["train"]["seed"] == 4  # the copied file's own value over its base
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run.root), "--no-progress", "--no-baselines"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert json.loads((run.eval_dir(None, "val") / "summary.json").read_text())["num_images"] == 2


def test_train_log_holds_the_messages_and_steps_and_q_v_choose_the_console(copied_config, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert cli.main(["-q", "train", "-c", str(copied_config), "--run-dir", str(run.root), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "run directory:" not in printed.out and "stage train" not in printed.out  # -q: results only
    assert "  train [train]  val mIoU" in printed.out
    log = run.train_log.read_text()
    assert "INFO scaleprotoseg.commands.train: start of run" in log
    assert "INFO scaleprotoseg.engine.trainer: stage train [train], 2 steps" in log
    assert "DEBUG scaleprotoseg.engine.loop: train step 1: ce " in log and "train step 2: ce " in log
    assert f"run directory: {run.root}" in log
    # a refused start is recorded too; -v shows the debug messages on the console
    assert cli.main(["train", "-v", "-c", str(copied_config), "--run-dir", str(run.root)]) == 1
    assert "already holds a run" in one_error(capsys)
    last = run.train_log.read_text().splitlines()[-1]
    assert "ERROR scaleprotoseg.commands.train: stopped by ValueError: run directory" in last
    assert cli.main(["train", "-v", "--resume", str(run.root), "--stages", "train", "--no-progress"]) == 0
    assert "train step 2: ce " in capsys.readouterr().out


def test_cli_log_levels_and_the_handler_is_removed_after_the_command(capsys):
    assert cli.log_level(0, 0) == logging.INFO
    assert (cli.log_level(1, 0), cli.log_level(2, 0), cli.log_level(0, 1), cli.log_level(0, 3)) == (10, 10, 30, 50)
    log = logging.getLogger("scaleprotoseg.commands.x")
    with cli.console_logging(logging.INFO):
        log.debug("hidden")
        log.info("shown on stdout")
        log.warning("careful")
    out, err = capsys.readouterr()
    assert out == "shown on stdout\n" and err == "warning: careful\n"
    assert not any(isinstance(h, cli.ConsoleHandler) for h in logging.getLogger("scaleprotoseg").handlers)


def test_stdout_redirected_to_a_file_fills_while_the_command_runs(synthetic_folder, tmp_path, monkeypatch):
    path = tmp_path / "out.log"
    with open(path, "w", buffering=1 << 16) as fh:  # a block-buffered file, as a shell redirection gives
        monkeypatch.setattr("sys.stdout", fh)
        assert cli.main(["data", "init", str(synthetic_folder), "--overwrite", "--no-check"]) == 0
        assert fh.line_buffering
        assert "3 classes" in path.read_text()  # on disk before the file is closed


def test_print_config_shows_the_resolved_config_and_does_nothing_else(copied_config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "-c", str(copied_config), "--set", "train.stages.train.lr.aspp=1e-4", "--print-config"]
    assert cli.main(args) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["stages"]["train"]["lr"]["aspp"] == pytest.approx(1e-4)
    assert cfg["data"]["root"] == str(copied_config.parents[1] / "data" / "synthetic")
    assert not (tmp_path / "runs").exists()
    assert cli.main(["data", "check", str(copied_config), "--set", "data.crop_size=[8, 8]", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["crop_size"] == [8, 8]


def test_run_verbs_take_data_overrides_only(tiny_run, tmp_path, capsys):
    run = tiny_run(tmp_path / "run", "scaleprotoseg")
    args = ["evaluate", str(run), "--set", "data.test_mode=sliding", "--set", "data.root=here", "--print-config"]
    assert cli.main(args) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["test_mode"] == "sliding" and data["root"] == str(Path.cwd() / "here")  # typed: the current directory
    for verb in ("predict", "explain", "analyze"):
        extra = ["all"] if verb == "analyze" else []
        assert cli.main([verb, str(run), *extra, "--set", "model.backbone=resnet18"]) == 1
        assert "--set 'model.backbone=resnet18': a trained run's model and training are fixed" in one_error(capsys)
    for verb in ("report", "export", "explore"):
        assert cli.main([verb, str(run), "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["model"]["backbone"] == "unet"


def test_inference_options_are_checked_and_build_one_settings_record(tiny_run, tmp_path):
    import argparse

    from scaleprotoseg.commands.options import add_inference_options

    parser = argparse.ArgumentParser()
    add_inference_options(parser)
    cfg = load_config(None, ["data.test_mode=short_side", "data.test_size=64", "data.msc_scales=[1.0]"])
    settings = inference_settings(parser.parse_args(["--msc", "0.5,1", "--flip"]), cfg.data)
    got = (settings.mode, settings.test_size, settings.msc_scales, settings.flip)
    assert got == ("short_side", 64, (0.5, 1.0), True)
    settings = inference_settings(parser.parse_args(["--mode", "sliding", "--test-size", "24"]), cfg.data)
    assert (settings.mode, settings.test_size, settings.msc_scales, settings.flip) == ("sliding", 24, (1.0,), False)
    for bad, message in [
        (["--msc", "0.5,x"], "--msc '0.5,x': expected comma-separated positive scales"),
        (["--msc", "0,1"], "--msc '0,1': expected comma-separated positive scales"),
        (["--test-size", "0"], "--test-size 0: expected a positive size"),
    ]:
        with pytest.raises(ValueError, match=message):
            inference_changes(parser.parse_args(bad))
    with pytest.raises(ValueError, match="--mode fixed: the run's data.test_size is 0; expected --test-size N"):
        inference_settings(parser.parse_args(["--mode", "fixed"]), load_config(None).data)


def test_predict_takes_evaluates_inference_options(tiny_run, tmp_path, capsys):
    from scaleprotoseg.data.io import read_image
    from scaleprotoseg.evaluation.inference import InferenceSettings
    from scaleprotoseg.predict import Predictor

    run = tiny_run(tmp_path / "run", "scaleprotoseg")
    (image,) = write_images(tmp_path / "in", ["a.png"], size=24)
    out = tmp_path / "out"
    opts = ["--mode", "fixed", "--test-size", "16", "--msc", "0.5,1", "--msc-fusion", "logits", "--flip"]
    assert cli.main(["predict", str(run), "--input", str(image), "--output", str(out), *opts, "--no-color"]) == 0
    assert "wrote 1 prediction(s)" in capsys.readouterr().out
    written = np.asarray(Image.open(out / "a.png"))
    predictor = Predictor.from_run(run)
    settings = InferenceSettings.from_config(
        predictor.cfg.data, mode="fixed", test_size=16, msc_scales=(0.5, 1.0), msc_fusion="logits", flip=True
    )
    predictor.inference = settings
    expected = predictor.predict(read_image(image))
    np.testing.assert_array_equal(written, expected)
    calls = []
    original = InferenceSettings.logits

    def spy(self, model, x):
        calls.append(self)
        return original(self, model, x)

    InferenceSettings.logits = spy
    try:
        assert cli.main(["predict", str(run), "--input", str(image), "--output", str(tmp_path / "o2"), *opts]) == 0
    finally:
        InferenceSettings.logits = original
    assert calls == [settings]
    assert cli.main(["predict", str(run), "--output", str(out)]) == 1
    assert "predict: --input missing; expected --input IMAGE|DIR --output DIR" in one_error(capsys)


def test_predictor_chooses_the_device_as_the_command_line_does(tiny_run, tmp_path, monkeypatch):
    import scaleprotoseg.predict as predict_module

    seen = []
    real = predict_module.resolve_device
    monkeypatch.setattr(predict_module, "resolve_device", lambda name: seen.append(name) or real("cpu"))
    predict_module.Predictor.from_run(tiny_run(tmp_path / "run", "deeplabv2"))
    assert seen == ["auto"]


def test_explain_takes_a_folder_with_a_folder_of_masks(tiny_run, tmp_path, capsys):
    run = tiny_run(tmp_path / "run", "scaleprotoseg")
    images = tmp_path / "images"
    write_images(images, ["a.png", "sub/b.png"])
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.ones((20, 24), np.uint8)).save(masks / "a.png")
    out = tmp_path / "out"
    args = ["explain", str(run), "--input", str(images), "--output", str(out), "--label", str(masks)]
    assert cli.main([*args, "--views", "group_maps", "--mode", "whole"]) == 0
    printed = capsys.readouterr().out
    assert "a: explained" in printed and "sub/b: explained" in printed and "manifests: 2 in" in printed
    a = json.loads((out / "a" / "manifest.json").read_text())
    b = json.loads((out / "sub" / "b" / "manifest.json").read_text())
    assert a["failure"] is not None and b["failure"] is None  # only a.png has a mask
    args[-1] = str(masks / "a.png")
    assert cli.main(args) == 1
    assert "expected a folder of masks <name>.png" in one_error(capsys)
