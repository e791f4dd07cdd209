"""save_pretrained / from_pretrained: a run's model in the Hub layout, loaded back offline with the same logits."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scaleprotoseg.checkpoint import load_model
from scaleprotoseg.pretrained import CITATION, from_pretrained, save_pretrained
from scaleprotoseg.rundir import RunDir


def _decorate(run_root):
    """The eval results and prototype gallery a trained run would have."""
    run = RunDir(run_root)
    (run.eval_dir(None, "val")).mkdir(parents=True)
    (run.eval_dir(None, "val") / "metrics.json").write_text(
        json.dumps({"miou": 0.6123, "pixel_accuracy": 0.9, "mean_accuracy": 0.7})
    )
    gallery = run.final / "prototypes"
    gallery.mkdir()
    for i in range(2):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(gallery / f"proto_{i:04d}.png")
    (gallery / "manifest.json").write_text("{}")


@pytest.mark.parametrize("method,grouped", [("scaleprotoseg", True), ("deeplabv2", False)])
def test_run_save_load_gives_identical_logits(tmp_path, tiny_run, method, grouped):
    run = tiny_run(tmp_path / "run", method, grouped=grouped)
    out = save_pretrained(run, tmp_path / "shared")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    loaded = from_pretrained(out)
    original = load_model(run).model
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model.logits(x), original.logits(x))  # the inference path (layout refreshed)
        assert torch.equal(loaded.model(x).logits, original(x).logits)
    assert loaded.meta.class_names == ["background", "square", "disc"] and not loaded.model.training
    assert loaded.model.structure() == original.structure()


def test_model_card_has_classes_results_gallery_and_citation(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run", "scaleprotoseg", grouped=True)
    _decorate(run)
    out = save_pretrained(run, tmp_path / "shared")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: scaleprotoseg\n")
    assert "| 1 | square | rgb(200, 30, 30) |" in card
    assert "| val | 61.23 | 90.00 | 70.00 |" in card
    assert "unet" in card and "| groups | 6 |" in card and "| prototypes | 11 |" in card
    assert "![proto_0001](prototypes/proto_0001.png)" in card and (out / "prototypes" / "proto_0001.png").is_file()
    assert CITATION in card
    card_without = (save_pretrained(tiny_run(tmp_path / "bare", "protoseg"), tmp_path / "s2") / "README.md").read_text()
    assert "No evaluation results" in card_without and "## Prototypes" not in card_without


def test_loading_never_downloads_a_local_directory(tmp_path, tiny_run, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(hub, "snapshot_download", no_network)
    out = save_pretrained(tiny_run(tmp_path / "run", "protoseg"), tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    assert from_pretrained("owner/name").directory.resolve() == out.resolve()  # exists: a local path, not a repo id


def test_repo_ids_go_through_huggingface_hub_only_when_installed(tmp_path, tiny_run, monkeypatch):
    out = save_pretrained(tiny_run(tmp_path / "run", "protoseg"), tmp_path / "shared")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match=r"not a local directory.*scaleprotoseg\[hub\]"):
        from_pretrained("someone/model")
    fake = type(sys)("huggingface_hub")
    calls = []
    fake.snapshot_download = lambda repo_id: calls.append(repo_id) or str(out)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert from_pretrained("someone/model").directory == out and calls == ["someone/model"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained("missing/dir/below")  # not a repo id: never looked up


def test_errors_name_the_file(tmp_path, tiny_run):
    out = save_pretrained(tiny_run(tmp_path / "run", "protoseg"), tmp_path / "shared")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format": "other/1"}))
    with pytest.raises(ValueError, match=r"config.json: format 'other/1'; expected 'scaleprotoseg-pretrained/1'"):
        from_pretrained(out)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        from_pretrained(out)
