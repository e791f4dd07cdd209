"""Projection and nearest patches under torch.distributed (2 CPU ranks, gloo) equal the single-process result."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scaleprotoseg.models.heads import ScaleProtoSegHead
from scaleprotoseg.models.segmenter import Segmenter
from scaleprotoseg.prototypes.nearest import nearest_patches
from scaleprotoseg.prototypes.projection import project_prototypes

IGNORE = 255
C = 3
SIZES = [(16, 20), (24, 16), (20, 20), (16, 16), (28, 12)]  # 5 images: uneven shards (3 and 2)


class TinyBackbone(nn.Module):
    out_channels = 8
    output_stride = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _model() -> Segmenter:
    torch.manual_seed(0)
    head = ScaleProtoSegHead(8, C, rates=(1, 2), dim=4, prototypes_per_class=2)
    with torch.no_grad():
        for conv in head.aspp.branches:
            conv.weight.normal_(0, 0.5)
    return Segmenter(TinyBackbone(), head).eval()


def _dataset() -> list[dict]:
    # seed 3: images 0 (and so its copy 3) and 1, 2, 4 all hold some prototype's nearest cell, so the tie between
    # the shards is exercised (with seed 1 and centre-aligned label sampling, image 0 won none)
    g = torch.Generator().manual_seed(3)
    items = []
    for i, (h, w) in enumerate(SIZES):
        label = torch.randint(0, C, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.2] = IGNORE
        items.append({"image": torch.randn(3, h, w, generator=g), "label": label, "name": f"s{i}", "index": i})
    items[3] = {**items[0], "name": "s3", "index": 3}  # a tie across the two shards (rank 1 holds index 3)
    return items


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, items = _model(), _dataset()
        ddp = project_prototypes(model, items, progress=False)
        single = project_prototypes(model, items, progress=False, distributed=False)
        near = nearest_patches(model, items, None, 3, progress=False)
        near_single = nearest_patches(model, items, None, 3, progress=False, distributed=False)
        torch.save(
            {
                "vectors": ddp.vectors,
                "sources": [s.to_dict() for s in ddp.sources],
                "same_vectors": torch.equal(ddp.vectors, single.vectors),
                "same_sources": ddp.sources == single.sources,
                "same_distances": torch.equal(ddp.distances, single.distances),
                "same_nearest": all(
                    torch.equal(getattr(near, f), getattr(near_single, f))
                    for f in ("distances", "labels", "dataset_indices", "cells", "boxes")
                )
                and near.names == near_single.names,
                "nearest_cells": near.cells,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_projection_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert r["same_vectors"] and r["same_sources"] and r["same_distances"] and r["same_nearest"]
    assert torch.equal(r0["vectors"], r1["vectors"]) and r0["sources"] == r1["sources"]
    assert torch.equal(r0["nearest_cells"], r1["nearest_cells"])
    assert {s["dataset_index"] for s in r0["sources"]} & {1, 3, 4}  # rank 1's shard won some prototypes
    winners = {s["dataset_index"] for s in r0["sources"]}
    assert 0 in winners and 3 not in winners  # index 3 copies index 0 on the other rank: ties go to index 0

    # and the same as a projection in this process
    torch.set_num_threads(1)
    local = project_prototypes(_model(), _dataset(), progress=False)
    assert [s.to_dict() for s in local.sources] == r0["sources"]
    assert torch.allclose(local.vectors, r0["vectors"])
