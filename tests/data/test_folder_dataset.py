import numpy as np
import pytest
import torch

from scaleprotoseg.config import DataConfig
from scaleprotoseg.data import available_datasets, build_dataset, register_dataset
from scaleprotoseg.data.folder import (
    FolderDataset,
    read_folder_spec,
    write_classes_yaml,
    write_sample,
    write_split,
)
from scaleprotoseg.data.io import read_label


def _write(root, n=4, size=(10, 12)):
    rng = np.random.default_rng(1)
    names = ["bg", "a", "b"]
    write_classes_yaml(root, names, [(0, 0, 0), (255, 0, 0), (0, 0, 255)], name="toy")
    stems, data = [], {}
    for i in range(n):
        img = rng.integers(0, 255, (*size, 3)).astype(np.uint8)
        lab = rng.integers(0, 3, size)
        lab[0, :] = 255
        stem = f"s{i}"
        write_sample(root, stem, img, lab, [(0, 0, 0), (255, 0, 0), (0, 0, 255)])
        stems.append(stem)
        data[stem] = (img, lab)
    write_split(root, "train", stems[:3])
    write_split(root, "val", stems[3:])
    return data


def test_round_trip(tmp_path):
    data = _write(tmp_path)
    spec = read_folder_spec(tmp_path)
    assert spec.name == "toy" and spec.class_names == ["bg", "a", "b"] and spec.ignore_index == 255
    assert sorted(spec.splits) == ["train", "val"]
    ds = FolderDataset(tmp_path, "train")
    assert len(ds) == 3 and ds.info.num_classes == 3
    for i in range(3):
        img, lab, name = ds.load_raw(i)
        assert (img == data[name][0]).all() and (lab == data[name][1]).all()
        assert lab.dtype == np.int64
    item = ds[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 10, 12)
    assert item["label"].dtype == torch.int64 and item["name"] == "s1" and item["index"] == 1
    assert len(FolderDataset(tmp_path, "all")) == 4


def test_inline_splits_and_colour_defaults(tmp_path):
    _write(tmp_path)
    (tmp_path / "classes.yaml").write_text(
        "classes: [bg, a, b]\nsplits:\n  mine: [s2, s0]\n  fromfile: splits/val.txt\n"
    )
    spec = read_folder_spec(tmp_path)
    assert spec.palette.shape == (3, 3) and spec.palette[1].tolist() == [128, 0, 0]
    assert [ds.sample_name(i) for ds in [FolderDataset(tmp_path, "mine")] for i in range(2)] == ["s2", "s0"]
    assert len(FolderDataset(tmp_path, "fromfile")) == 1
    with pytest.raises(ValueError, match="split 'train' is not defined"):
        FolderDataset(tmp_path, "train")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("classes: []\n", "non-empty list"),
        ("classes: [a, a]\n", "more than once"),
        ("classes: [a, b]\nignore_index: 1\n", "outside the class indices"),
        ("classes: [{name: a, color: [1, 2]}]\n", "color"),
        ("classes: [a]\nfoo: 1\n", "unknown key"),
        ("classes: [a\n", "not valid YAML"),
    ],
)
def test_classes_yaml_errors_name_file(tmp_path, text, match):
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_folder_spec(tmp_path)
    assert "classes.yaml" in str(err.value)


def test_missing_mask_is_named(tmp_path):
    _write(tmp_path)
    (tmp_path / "masks" / "s1.png").unlink()
    with pytest.raises(FileNotFoundError, match="s1"):
        FolderDataset(tmp_path, "train")


def test_build_dataset_registry_limits_and_ignore_remap(tmp_path):
    _write(tmp_path)
    cfg = DataConfig(name="folder", root=str(tmp_path), crop_size=[8, 8], max_train_samples=2, max_val_samples=0)
    train = build_dataset(cfg, "train", train=True)
    assert len(train) == 2 and train[0]["image"].shape == (3, 8, 8)
    val = build_dataset(cfg, "val", train=False)
    assert len(val) == 1 and val[0]["image"].shape == (3, 10, 12)
    remapped = build_dataset(DataConfig(name="folder", root=str(tmp_path), ignore_index=-1), "val", train=False)
    assert remapped.info.ignore_index == -1
    _, lab, _ = remapped.load_raw(0)
    assert (lab[0] == -1).all() and lab.min() == -1 and lab.max() <= 2
    with pytest.raises(ValueError, match="num_classes: 5 does not match"):
        build_dataset(DataConfig(name="folder", root=str(tmp_path), num_classes=5), "val", train=False)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'bogus'.*valid options: intensity"):
        build_dataset(DataConfig(name="folder", root=str(tmp_path), options={"bogus": 1}), "val", train=False)
    with pytest.raises(ValueError, match="data.root is empty"):
        build_dataset(DataConfig(name="folder", root=""), "val", train=False)


def test_unknown_dataset_lists_valid_names():
    names = available_datasets()
    for n in (
        "folder",
        "pascal_voc",
        "cityscapes",
        "ade20k",
        "coco_stuff",
        "isbi_em",
        "cityscapes_panoptic_parts",
        "pascal_panoptic_parts",
    ):
        assert n in names
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; expected one of .*folder.*pascal_voc"):
        build_dataset(DataConfig(name="nope", root="x"), "train", train=True)


def test_register_custom_factory(tmp_path):
    _write(tmp_path)

    @register_dataset("test_custom_folder")
    def factory(data_cfg, split):
        return FolderDataset(data_cfg.root, split)

    ds = build_dataset(DataConfig(name="test_custom_folder", root=str(tmp_path)), "val", train=False)
    assert len(ds) == 1 and "test_custom_folder" in available_datasets()


def test_invalid_label_values_named_on_load(tmp_path):
    _write(tmp_path)
    lab = read_label(tmp_path / "masks" / "s0.png")
    lab[2, 2] = 9
    from scaleprotoseg.data.io import write_index_png

    write_index_png(tmp_path / "masks" / "s0.png", lab)
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(ValueError, match=r"s0.png: label values 9 are outside the classes 0..2"):
        ds.load_raw(0)


def test_shared_synthetic_fixture_loads(synthetic_folder):
    ds = FolderDataset(synthetic_folder, "train")
    img, lab, _ = ds.load_raw(0)
    assert img.shape == (40, 40, 3) and set(np.unique(lab)) <= {0, 1, 2, 255}
