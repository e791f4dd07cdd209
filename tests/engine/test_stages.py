"""The stage kinds as registered functions; the proto_finetune stage (h_proto after projection)."""

import pytest
import torch
from safetensors.torch import load_file

from scaleprotoseg.config import STAGE_KINDS
from scaleprotoseg.engine.stages import STAGE_FUNCTIONS
from scaleprotoseg.engine.trainer import Trainer


def test_every_stage_kind_has_one_function():
    assert set(STAGE_FUNCTIONS) == set(STAGE_KINDS)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_proto_finetune_changes_only_h_proto(synthetic_folder, tmp_path, tiny_config, freeze_bn):
    """After projection, the stage trains h_proto and nothing else; with batch norm not frozen (ISBI EM) its
    training-mode passes refresh the batch-norm statistics too, as the release does before the group stages."""
    sets = {
        "train.stages.warmup.steps": 1,
        "train.stages.joint.steps": 1,
        "train.stages.proto_finetune.enabled": True,
        "train.stages.proto_finetune.steps": 2,
        "train.stages.proto_finetune.accumulation": 1,
        "train.stages.proto_finetune.lr.last_layer": 0.01,
        "train.stages.group_warmup.enabled": False,
        "train.stages.group_joint.enabled": False,
        "train.stages.threshold.enabled": False,
        "model.freeze_bn": freeze_bn,
    }
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(synthetic_folder, "scaleprotoseg", **sets), run, device="cpu", progress=False)
    assert [r.name for r in trainer.run_stages()] == ["warmup", "joint", "projection", "proto_finetune"]
    before = load_file(str(run / "checkpoints" / "projection" / "model.safetensors"))
    after = load_file(str(run / "checkpoints" / "proto_finetune" / "model.safetensors"))
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    bn_stats = {k for k in moved if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert "head.h_proto" in moved and moved - bn_stats == {"head.h_proto"}
    assert bool(bn_stats) == (not freeze_bn)
