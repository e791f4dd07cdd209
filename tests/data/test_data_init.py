"""``scaleprotoseg data init``: classes.yaml and splits for a folder of images and masks."""

import numpy as np
import pytest

from scaleprotoseg import cli
from scaleprotoseg.config import DataConfig
from scaleprotoseg.data import build_dataset
from scaleprotoseg.data.folder import read_folder_spec, read_split_file
from scaleprotoseg.data.init import init_folder, split_stems_randomly
from scaleprotoseg.data.io import write_image, write_index_png


def _folder(root, n=5, largest=2, size=(8, 10)):
    """``n`` image/mask pairs whose masks use the values 0..largest and a void row of 255."""
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(root / "images" / f"img{i}.png", rng.integers(0, 255, (*size, 3)).astype(np.uint8))
        label = rng.integers(0, largest + 1, size)
        label[0, 0] = largest  # every mask holds the largest value once
        label[-1, :] = 255
        write_index_png(root / "masks" / f"img{i}.png", label)
    return root


def test_classes_from_masks_and_a_seeded_split(tmp_path):
    root = _folder(tmp_path / "cells", n=5, largest=2)
    result = init_folder(root, val_fraction=0.4, seed=3)
    spec = read_folder_spec(root)
    assert spec.class_names == ["class_0", "class_1", "class_2"] and result.classes_from == "masks"
    assert spec.name == "cells" and spec.ignore_index == 255 and spec.palette.shape == (3, 3)
    train, val = read_split_file(root / "splits/train.txt"), read_split_file(root / "splits/val.txt")
    assert len(val) == 2 and len(train) == 3 and sorted(train + val) == [f"img{i}" for i in range(5)]
    assert (train, val) == (result.train, result.val)
    # the same seed gives the same split; the folder loads as a dataset
    assert split_stems_randomly([f"img{i}" for i in range(5)], 0.4, 3) == (train, val)
    ds = build_dataset(DataConfig(name="folder", root=str(root)), "val", train=False)
    assert len(ds) == 2 and ds.info.class_names == spec.class_names


def test_classes_txt_names_the_classes(tmp_path):
    root = _folder(tmp_path, n=3, largest=1)
    (root / "classes.txt").write_text("# one name per line\nbackground\n\nnucleus\n")
    result = init_folder(root)
    assert read_folder_spec(root).class_names == ["background", "nucleus"] and result.classes_from == "classes.txt"
    assert len(result.val) == 1 and len(result.train) == 2  # round(0.2 * 3) = 1: at least one on each side


def test_mask_values_outside_classes_txt_name_the_file(tmp_path):
    root = _folder(tmp_path, n=2, largest=2)
    (root / "classes.txt").write_text("background\nnucleus\n")
    with pytest.raises(ValueError, match=r"img\d\.png: mask value\(s\) \[2\] outside the 2 classes of .*classes.txt"):
        init_folder(root)
    assert not (root / "classes.yaml").exists()


def test_image_mask_mismatch_names_the_stems(tmp_path):
    root = _folder(tmp_path, n=3)
    (root / "masks" / "img1.png").rename(root / "masks" / "other.png")
    with pytest.raises(ValueError) as err:
        init_folder(root)
    msg = str(err.value)
    assert "\n" not in msg and "1 image(s) without a mask" in msg and "img1" in msg
    assert "1 mask(s) without an image" in msg and "other" in msg
    assert not (root / "classes.yaml").exists() and not (root / "splits").exists()


def test_existing_files_need_overwrite(tmp_path):
    root = _folder(tmp_path, n=4)
    init_folder(root, seed=0)
    with pytest.raises(ValueError, match="classes.yaml.*already exist.*--overwrite"):
        init_folder(root)
    result = init_folder(root, overwrite=True, val_fraction=0.0)
    assert result.val == [] and not (root / "splits/val.txt").exists() and len(result.train) == 4


def test_data_init_command(tmp_path, capsys):
    root = _folder(tmp_path / "mine", n=4, largest=1)
    assert cli.main(["data", "init", str(root), "--val-fraction", "0.5", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 classes (from masks: class_0, class_1), 2 train / 2 val" in out
    assert "data check: 4 sample(s) in 2 split(s): OK" in out
    (root / "masks" / "img0.png").unlink()
    assert cli.main(["data", "init", str(root), "--overwrite"]) == 1
    assert "without a mask" in capsys.readouterr().err
