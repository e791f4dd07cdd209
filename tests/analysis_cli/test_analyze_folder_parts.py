"""The ``folder_parts`` dataset that feeds consistency/stability on users' own part annotations."""

import numpy as np
import pytest

from scaleprotoseg.config import DataConfig
from scaleprotoseg.data.folder_parts import FolderPartsDataset
from scaleprotoseg.data.registry import build_dataset


def test_folder_parts_items(tiny_runs):
    root, parts = tiny_runs["root"], tiny_runs["parts"]
    cfg = DataConfig(name="folder_parts", root=str(root), options={"parts_root": str(parts)})
    ds = build_dataset(cfg, "val", train=False)
    assert isinstance(ds, FolderPartsDataset) and len(ds) == 2
    assert ds.part_names == {1: ["top", "bottom"], 2: ["left", "right"]}
    item = ds[0]
    label, part_map = item["label"].numpy(), item["parts"].numpy()
    assert part_map.shape == label.shape == tuple(item["image"].shape[1:])
    assert set(np.unique(part_map[label == 1])) == {1, 2} and (part_map[label == 0] == 0).all()


def test_folder_parts_errors(tiny_runs, tmp_path):
    root = tiny_runs["root"]
    with pytest.raises(FileNotFoundError, match="part annotation folder"):
        FolderPartsDataset(root, "val", parts_root=tmp_path / "missing")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "part_names.yaml").write_text("wheel: [rim]\n")
    with pytest.raises(ValueError, match="'wheel' is not a class"):
        FolderPartsDataset(root, "val", parts_root=tmp_path / "p")
