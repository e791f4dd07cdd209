"""evaluate(): equals a manual confusion computation, batching by size, shards, distributed sum (gloo)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from scaleprotoseg.evaluation.evaluate import evaluate, shard_indices
from scaleprotoseg.evaluation.inference import InferenceSettings
from scaleprotoseg.models.heads import ModelOutput

C = 4
IGNORE = 255


class StrideModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, stride=8, padding=1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.conv(x))


class FakeDataset(Dataset):
    """Variable-size images (two share a size) with random labels and ignore pixels."""

    sizes = [(20, 28), (33, 17), (20, 28), (16, 16), (41, 23)]

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i, (h, w) in enumerate(self.sizes):
            label = torch.randint(0, C, (h, w), generator=g)
            label[torch.rand(h, w, generator=g) < 0.15] = IGNORE
            self.items.append({"image": torch.randn(3, h, w, generator=g), "label": label, "name": f"s{i}", "index": i})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return StrideModel()


def _manual_matrix(model: nn.Module, ds: FakeDataset) -> np.ndarray:
    m = np.zeros((C, C), dtype=np.int64)
    with torch.no_grad():
        for item in ds.items:
            x = item["image"][None]
            logits = F.interpolate(model(x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0].numpy().ravel()
            gt = item["label"].numpy().ravel()
            keep = gt != IGNORE
            np.add.at(m, (gt[keep], pred[keep]), 1)
    return m


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_equals_manual(batch_size: int) -> None:
    model, ds = _model(), FakeDataset()
    model.train()
    r = evaluate(model, ds, num_classes=C, ignore_index=IGNORE, device="cpu", batch_size=batch_size, progress=False)
    assert model.training  # mode restored
    m = _manual_matrix(model, ds)
    np.testing.assert_array_equal(r["matrix"], m)
    tp, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    present = union > 0
    assert r["miou"] == pytest.approx(float(np.mean(tp[present] / union[present])))
    assert r["num_images"] == len(ds) and r["seconds"] >= 0 and r["mode"] == "whole"


def test_evaluate_max_samples_and_modes() -> None:
    model, ds = _model(), FakeDataset()
    sliding = InferenceSettings("sliding", (16, 16))
    r = evaluate(model, ds, num_classes=C, device="cpu", max_samples=2, progress=False, inference=sliding)
    assert r["num_images"] == 2
    assert r["matrix"].sum() == sum(int((ds[i]["label"] != IGNORE).sum()) for i in range(2))


def test_evaluate_rejects_bad_labels() -> None:
    ds = FakeDataset()
    ds.items[1]["label"][0, 0] = 9
    with pytest.raises(ValueError, match="label 9"):
        evaluate(_model(), ds, num_classes=C, progress=False)  # device taken from the model


def test_label_errors_name_the_files(synthetic_folder) -> None:
    """A dataset of 3 classes scored as 2: the error names the sample's files, not only "label 2"."""
    from scaleprotoseg.config import load_config
    from scaleprotoseg.data.registry import build_dataset

    ds = build_dataset(load_config(None, [f"data.root={synthetic_folder}"]).data, "val", train=False)
    model = _model()
    with pytest.raises(ValueError, match=r"images/img06.png / .*masks/img06.png: target contains label 2"):
        evaluate(model, ds, num_classes=2, progress=False)


def test_shard_indices() -> None:
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert shards[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="rank 3"):
        shard_indices(5, 3, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = evaluate(_model(), FakeDataset(), num_classes=C, ignore_index=IGNORE, device="cpu", progress=False)
        np.save(f"{out}/rank{rank}.npy", np.append(r["matrix"].ravel(), r["num_images"]))
    finally:
        dist.destroy_process_group()


def test_evaluate_distributed_gloo(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _manual_matrix(_model(), FakeDataset())
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_array_equal(got[:-1].reshape(C, C), expected)
        assert got[-1] == len(FakeDataset.sizes)
