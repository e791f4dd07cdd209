"""Tiny files in each official on-disk format, read back to the expected labels."""

import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from scaleprotoseg.cli import main
from scaleprotoseg.config import DataConfig
from scaleprotoseg.data import build_dataset
from scaleprotoseg.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from scaleprotoseg.data.cityscapes import CITYSCAPES_CLASSES, CityscapesDataset, label_ids_to_train_ids
from scaleprotoseg.data.coco_stuff import COCO_STUFF_CLASSES, CocoStuffDataset
from scaleprotoseg.data.io import voc_colormap, write_index_png
from scaleprotoseg.data.isbi_em import ISBIEMDataset, em_split_indices
from scaleprotoseg.data.pascal_voc import (
    PascalVOCDataset,
    prepare_sbd,
    read_sbd_mat,
    train_aug_ids,
)

RNG = np.random.default_rng(0)


def _jpg(path, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(path, quality=95)


def _png_l(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    ids = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    for split, lst in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(lst) + "\n")
    for i in ids["train"] + ids["val"]:
        _jpg(voc / "JPEGImages" / f"{i}.jpg")
        lab = np.zeros((6, 8), np.uint8)
        lab[2:5, 2:6] = 15
        lab[1, 1:7] = 255  # object border
        write_index_png(voc / "SegmentationClass" / f"{i}.png", lab, voc_colormap(256))
    return voc


def test_pascal_voc_palette_pngs_with_void_border(tmp_path):
    voc = _voc(tmp_path)
    assert Image.open(voc / "SegmentationClass" / "2007_000001.png").mode == "P"
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):
        ds = PascalVOCDataset(root, "train")
        assert len(ds) == 2 and ds.info.num_classes == 21 and ds.info.class_names[15] == "person"
    img, lab, name = PascalVOCDataset(tmp_path, "val").load_raw(0)
    assert name == "2007_000003" and img.shape == (6, 8, 3)
    assert lab[3, 3] == 15 and lab[1, 2] == 255 and lab[0, 0] == 0
    with pytest.raises(FileNotFoundError, match="prepare-voc"):
        PascalVOCDataset(tmp_path, "train_aug")


def _sbd_mat(path, seg):
    path.parent.mkdir(parents=True, exist_ok=True)
    bounds = np.empty((21, 1), dtype=object)
    for k in range(21):
        bounds[k, 0] = np.zeros(seg.shape, dtype=bool)
    scipy.io.savemat(
        path,
        {
            "GTcls": {
                "Segmentation": seg.astype(np.uint8),
                "Boundaries": bounds,
                "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8),
            }
        },
    )


def test_sbd_conversion_and_train_aug_list(tmp_path):
    voc = _voc(tmp_path)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    seg = np.zeros((6, 8), np.int64)
    seg[:3] = 7
    for i in ("2008_000010", "2008_000011", "2007_000003", "2007_000002"):
        _sbd_mat(sbd / "cls" / f"{i}.mat", seg)
        _jpg(voc / "JPEGImages" / f"{i}.jpg")
    (sbd / "train.txt").write_text("2008_000010\n2007_000003\n")
    (sbd / "val.txt").write_text("2008_000011\n2007_000002\n")
    assert (read_sbd_mat(sbd / "cls" / "2008_000010.mat") == seg).all()
    # (SBD train + SBD val + VOC train) - VOC val
    assert train_aug_ids(["a", "v"], ["b"], ["c", "a"], ["v"]) == ["a", "b", "c"]
    rc = main(["data", "prepare-voc", "--voc", str(tmp_path), "--sbd", str(tmp_path / "benchmark_RELEASE")])
    assert rc == 0
    lst = (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").read_text().split()
    assert lst == ["2007_000001", "2007_000002", "2008_000010", "2008_000011"]
    ds = PascalVOCDataset(tmp_path, "train_aug")
    labels = {ds.sample_name(i): ds.load_raw(i)[1] for i in range(len(ds))}
    assert (labels["2008_000010"] == seg).all()  # from SBD
    assert (labels["2007_000002"] == seg).all()  # SBD label preferred where both exist
    assert labels["2007_000001"][3, 3] == 15 and labels["2007_000001"][1, 2] == 255  # VOC-only image
    counts = prepare_sbd(sbd, voc, progress=False)
    assert counts == {"train_aug": 4, "from_sbd": 3, "from_voc": 1, "written": 0}  # PNGs are written once
    bad = tmp_path / "bad.mat"
    scipy.io.savemat(bad, {"other": np.zeros(2)})
    with pytest.raises(ValueError, match="bad.mat: no 'GTcls'"):
        read_sbd_mat(bad)


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    ids = np.array([[0, 7, 8, 11], [24, 26, 33, 34], [9, 14, 31, 23]])
    expected = np.array([[255, 0, 1, 2], [11, 13, 18, 255], [255, 255, 16, 10]])
    assert (label_ids_to_train_ids(ids) == expected).all()
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        name = f"{city}_000000_000019"
        _jpg(tmp_path / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 3, 4)
        _png_l(tmp_path / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", ids)
    ds = CityscapesDataset(tmp_path, "val")
    img, lab, name = ds.load_raw(0)
    assert name == "frankfurt_000000_000019" and (lab == expected).all() and img.shape == (3, 4, 3)
    assert ds.info.class_names == CITYSCAPES_CLASSES and len(CITYSCAPES_CLASSES) == 19
    assert ds.info.palette[13].tolist() == [0, 0, 142]  # car
    cfg = DataConfig(name="cityscapes", root=str(tmp_path), crop_size=[4, 4])
    assert build_dataset(cfg, "train", train=True)[0]["label"].shape == (4, 4)


def test_ade20k_zero_is_ignored_and_shifted(tmp_path):
    ann = np.array([[0, 1, 150], [2, 0, 13]])
    root = tmp_path / "ADEChallengeData2016"
    _jpg(root / "images" / "validation" / "ADE_val_00000001.jpg", 2, 3)
    _png_l(root / "annotations" / "validation" / "ADE_val_00000001.png", ann)
    ds = ADE20KDataset(tmp_path, "val")
    _, lab, name = ds.load_raw(0)
    assert name == "ADE_val_00000001"
    assert lab.tolist() == [[255, 0, 149], [1, 255, 12]]
    assert len(ADE20K_CLASSES) == 150 and ds.info.class_names[12] == "person" and ds.info.palette.shape == (150, 3)
    _png_l(root / "annotations" / "validation" / "ADE_val_00000001.png", [[0, 151, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="label values 150 are outside"):
        ds.load_raw(0)


def test_coco_stuff_164k(tmp_path):
    ann = np.array([[0, 181, 255], [91, 0, 5]])
    _jpg(tmp_path / "images" / "val2017" / "000000000139.jpg", 2, 3)
    _png_l(tmp_path / "annotations" / "val2017" / "000000000139.png", ann)
    ds = CocoStuffDataset(tmp_path, "val")
    _, lab, name = ds.load_raw(0)
    assert name == "000000000139" and (lab == ann).all()
    assert len(COCO_STUFF_CLASSES) == 182 and ds.info.num_classes == 182
    assert COCO_STUFF_CLASSES[0] == "person" and COCO_STUFF_CLASSES[91] == "banner" and COCO_STUFF_CLASSES[-1] == "wood"
    _png_l(tmp_path / "annotations" / "val2017" / "000000000139.png", [[182, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="000000000139.png: label values 182"):
        ds.load_raw(0)


def test_isbi_em_stacks_and_seeded_splits(tmp_path):
    vol = RNG.integers(0, 255, (30, 16, 16)).astype(np.uint8)
    lab = np.where(RNG.random((30, 16, 16)) > 0.3, 255, 0).astype(np.uint8)
    tifffile.imwrite(tmp_path / "train-volume.tif", vol)
    tifffile.imwrite(tmp_path / "train-labels.tif", lab)
    train, val = ISBIEMDataset(tmp_path, "train"), ISBIEMDataset(tmp_path, "val")
    assert len(train) == 20 and len(val) == 10
    names_t = {train.sample_name(i) for i in range(20)}
    names_v = {val.sample_name(i) for i in range(10)}
    assert not names_t & names_v and len(names_t | names_v) == 30
    img, lbl, name = val.load_raw(3)
    k = int(name.split("_")[1])
    assert (img[..., 0] == vol[k]).all() and (img[..., 2] == vol[k]).all()
    assert (lbl == (lab[k] == 255)).all() and lbl.dtype == np.int64
    # seeded: the same split twice, a different one for the second seed
    assert em_split_indices(30, "val", 0) == em_split_indices(30, "val", 0)
    assert em_split_indices(30, "val", 0) != em_split_indices(30, "val", 1)
    other = ISBIEMDataset(tmp_path, "val", split_seed=1)
    assert {other.sample_name(i) for i in range(10)} != names_v
    assert len(ISBIEMDataset(tmp_path, "all")) == 30
    cfg = DataConfig(name="isbi_em", root=str(tmp_path), options={"split_seed": 1}, crop_size=[8, 8])
    assert len(build_dataset(cfg, "val", train=False)) == 10
