"""CheckpointMeta (round trip, format check), write_checkpoint and load_model on tiny trained runs."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scaleprotoseg.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMeta,
    CheckpointWriteError,
    file_sha256,
    load_model,
    write_checkpoint,
)
from scaleprotoseg.config import load_config
from scaleprotoseg.models.segmenter import build_model
from scaleprotoseg.rundir import RunDir

INFO = SimpleNamespace(
    class_names=["background", "square", "disc"],
    palette=np.array([[0, 0, 0], [200, 30, 30], [30, 30, 210]], np.uint8),
    ignore_index=255,
)


def _model(method: str = "protoseg"):
    cfg = load_config(None, [f"model.method={method}", "model.backbone=resnet18", "model.aspp_rates=[1, 2]"])
    return build_model(cfg.model, 3)


def test_meta_round_trip():
    model = _model()
    meta = CheckpointMeta.of_model(model, stage="joint", step=7, info=INFO, normalization="imagenet")
    d = meta.to_dict()
    assert list(d) == [
        "format",
        "method",
        "stage",
        "step",
        "num_classes",
        "class_names",
        "palette",
        "ignore_index",
        "normalization",
        "output_stride",
        "structure",
        "checksums",
    ]
    assert d["format"] == CHECKPOINT_FORMAT == "scaleprotoseg-checkpoint/1"
    assert d["num_classes"] == 3 and d["palette"][1] == [200, 30, 30]
    back = CheckpointMeta.from_dict(json.loads(json.dumps(d)))
    assert back.palette.dtype == np.uint8 and np.array_equal(back.palette, INFO.palette)
    assert back.to_dict() == d
    assert (back.method, back.stage, back.step, back.output_stride) == ("protoseg", "joint", 7, model.output_stride)
    assert back.structure == model.structure()


@pytest.mark.parametrize("found", ["scaleprotoseg-checkpoint/2", "other/1", None])
def test_format_is_checked_with_a_one_line_error(tmp_path, found):
    d = CheckpointMeta.of_model(_model(), stage="s", step=0, info=INFO, normalization="imagenet").to_dict()
    if found is None:
        del d["format"]
    else:
        d["format"] = found
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as err:
        CheckpointMeta.read(path)
    assert str(err.value) == f"{path}: checkpoint format {found!r}; expected 'scaleprotoseg-checkpoint/1'"
    assert "\n" not in str(err.value)


def test_missing_fields_and_files_are_named(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "method": "protoseg"}))
    with pytest.raises(ValueError, match=f"{path}: checkpoint metadata has no 'class_names'"):
        CheckpointMeta.read(path)
    with pytest.raises(FileNotFoundError, match="nope.json is missing"):
        CheckpointMeta.read(tmp_path / "nope.json")


def test_write_checkpoint_is_all_or_nothing(tmp_path):
    model = _model("deeplabv2")
    meta = CheckpointMeta.of_model(model, stage="train", step=1, info=INFO, normalization="imagenet")
    target = tmp_path / "checkpoints" / "train"
    write_checkpoint(target, model, meta, train_state={"step": 1})
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "model.safetensors", "train_state.pt"]

    def fail(ckpt):
        (ckpt.path / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(target, model, meta, extra=fail)
    assert sorted(p.name for p in target.parent.iterdir()) == ["train"]  # no temporary directory left behind
    assert not (target / "half.txt").exists() and (target / "train_state.pt").is_file()


def test_load_model_on_tiny_runs(trained_runs):
    run = trained_runs["protoseg"]
    final = load_model(run)
    assert not final.model.training and final.directory == run / "final"
    assert final.meta.stage == "finetune" and final.meta.class_names == INFO.class_names
    assert final.config.model.method == "protoseg" and final.config.model.pretrained is None
    assert final.train_state is None
    last = load_model(run, "finetune")
    for k, v in last.model.state_dict().items():
        assert torch.equal(v, final.model.state_dict()[k]), k
    # the projection travels with the checkpoints whose prototypes it describes
    assert load_model(run, "joint").projection is None
    projected, pruned = load_model(run, "projection"), load_model(run, "pruning")
    for loaded in (projected, pruned, final):
        head = loaded.model.head
        assert torch.equal(loaded.projection.prototype_class, head.prototype_class)
        assert torch.equal(loaded.projection.prototype_scale, head.prototype_scale)
    assert pruned.projection.to_dict() == final.projection.to_dict()
    names = [s.name for s in projected.projection.sources]
    assert {s.name for s in pruned.projection.sources} <= set(names)
    assert not RunDir(run).legacy_projection.exists()


def test_load_model_into_an_existing_model(trained_runs):
    run = trained_runs["scaleprotoseg"]
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model, 3).train()
    loaded = load_model(run, "group_joint", into=model)
    assert loaded.model is model and model.training and model.head.grouping is not None
    reference = load_model(run, "group_joint").model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_load_model_errors(trained_runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .* does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has training finished"):
        load_model(tmp_path / "empty")
    run = trained_runs["protoseg"]
    with pytest.raises(FileNotFoundError, match="no checkpoint for stage 'nope'; it has: finetune, joint, projection"):
        load_model(run, "nope")
    with pytest.raises(FileNotFoundError, match="no partial checkpoint for stage 'joint'"):
        load_model(run, "joint", partial=True)
    copy = tmp_path / "copy"
    shutil.copytree(run / "final", copy / "final")
    meta = copy / "final" / "meta.json"
    meta.write_text(meta.read_text().replace(CHECKPOINT_FORMAT, "scaleprotoseg-checkpoint/9"))
    with pytest.raises(ValueError, match="meta.json: checkpoint format 'scaleprotoseg-checkpoint/9'; expected"):
        load_model(copy)


def test_old_layout_projection_at_the_run_root(trained_runs, tmp_path):
    """Runs written before per-checkpoint projections kept one projection.json at the root (the latest numbering)."""
    old = tmp_path / "old"
    shutil.copytree(trained_runs["protoseg"], old)
    run = RunDir(old)
    expected = load_model(old, "finetune").projection.to_dict()
    run.checkpoint("finetune").projection.rename(run.legacy_projection)
    for stage in run.stages_with_checkpoints():
        run.checkpoint(stage).projection.unlink(missing_ok=True)
        meta = json.loads(run.checkpoint(stage).meta.read_text())
        del meta["checksums"]  # that layout predates checksums
        run.checkpoint(stage).meta.write_text(json.dumps(meta))
    assert load_model(old, "finetune").projection.to_dict() == expected
    with pytest.warns(UserWarning, match="another prototype numbering"):
        assert load_model(old, "joint").projection is None  # before duplicate removal: more prototypes


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_checksums_are_written_and_a_damaged_file_is_named(trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["protoseg"], run)
    final = RunDir(run).checkpoint()
    meta = json.loads(final.meta.read_text())
    assert meta["checksums"] == {
        "model.safetensors": file_sha256(final.weights),
        "projection.json": file_sha256(final.projection),
    }
    load_model(run)
    data = bytearray(final.weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: loadable, but not the weights written
    final.weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_model(run)
    assert f"{final.weights}: corrupted" in _one_line(err)
    final.projection.unlink()
    meta["checksums"]["model.safetensors"] = file_sha256(final.weights)
    final.meta.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"projection.json: missing; .*meta.json lists it"):
        load_model(run)
    final.meta.write_text('{"format": "scaleprot')
    with pytest.raises(CheckpointError) as err:
        load_model(run)
    assert f"{final.meta}: not valid JSON" in _one_line(err)


@pytest.mark.parametrize("damage", ["missing", "pickled", "truncated", "not_a_state"])
def test_broken_train_state_is_named(tmp_path, damage):
    """A mid-stage checkpoint whose train_state.pt is missing, holds pickled objects, is cut short or is not a
    training state: a one-line error naming the file (the checksum is dropped to reach the reader itself)."""
    from scaleprotoseg.config import save_config

    model = _model("deeplabv2")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    sets = ["model.method=deeplabv2", "model.backbone=resnet18", "model.aspp_rates=[1, 2]"]
    save_config(load_config(None, sets), run.config)
    meta = CheckpointMeta.of_model(model, stage="train", step=1, info=INFO, normalization="imagenet")
    state = {"step": 1, "samples_consumed": 2, "optimizer": {}, "scheduler": {}, "rng": torch.get_rng_state()}
    write_checkpoint(run.partial_dir("train"), model, meta, train_state=state)
    assert load_model(run, "train", partial=True).train_state["samples_consumed"] == 2
    ckpt = run.checkpoint("train", partial=True)
    on_disk = json.loads(ckpt.meta.read_text())
    del on_disk["checksums"]["train_state.pt"]
    ckpt.meta.write_text(json.dumps(on_disk))
    if damage == "missing":
        ckpt.train_state.unlink()
    elif damage == "pickled":
        torch.save({"step": 1, "obj": SimpleNamespace(a=1)}, ckpt.train_state)
    elif damage == "truncated":
        ckpt.train_state.write_bytes(ckpt.train_state.read_bytes()[:100])
    else:
        torch.save({"step": 1}, ckpt.train_state)
    with pytest.raises(CheckpointError) as err:
        load_model(run, "train", partial=True)
    assert str(ckpt.train_state) in _one_line(err)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import scaleprotoseg.checkpoint as ckpt_mod

    model = _model("deeplabv2")
    meta = CheckpointMeta.of_model(model, stage="train", step=1, info=INFO, normalization="imagenet")
    target = tmp_path / "checkpoints" / "train"
    write_checkpoint(target, model, meta)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", no_space)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(CheckpointWriteError) as err:
        write_checkpoint(target, model, meta)
    assert f"could not write checkpoint {target}" in _one_line(err) and "No space left" in str(err.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["train"]
