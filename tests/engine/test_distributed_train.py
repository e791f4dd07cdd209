"""Multi-process training through torchrun (gloo on CPU): every stage runs, rank 0 writes the run directory."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_train_all_stages(synthetic_folder, tmp_path):
    run = tmp_path / "run"
    sets = [
        f"data.root={synthetic_folder}",
        "data.crop_size=[32, 32]",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.backbone=resnet18",
        "model.aspp_rates=[1, 2]",
        "model.aspp_channels=8",
        "model.prototypes_per_class=2",
        "model.groups_per_class=2",
        "train.checkpoint_every=0",
        "train.device=cpu",
    ]
    for s in ["warmup", "joint", "group_warmup", "group_joint"]:
        sets += [f"train.stages.{s}.steps=2", f"train.stages.{s}.accumulation=1"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: ddp\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "scaleprotoseg",
        "train",
        "-c",
        str(cfg),
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == ["warmup", "joint", "projection", "group_warmup", "group_joint", "threshold"]
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "final" / "nearest" / "manifest.json").is_file()  # the step after training, on rank 0
