import numpy as np
import pytest
import tifffile
from PIL import Image

from scaleprotoseg.config import DataConfig
from scaleprotoseg.data import build_dataset
from scaleprotoseg.data.io import voc_colormap, write_index_png
from scaleprotoseg.data.panoptic_parts import (
    CityscapesPanopticPartsDataset,
    PascalPanopticPartsDataset,
    decode_uids,
    encode_ids,
    pascal_part_table,
)


def test_decode_uids_three_forms():
    uids = np.array([[23, 26002, 2401002], [0, 99, 1500000], [-1, 1000, 2612304]])
    sids, iids, pids = decode_uids(uids)
    assert sids.tolist() == [[23, 26, 24], [0, 99, 15], [-1, 1, 26]]
    assert iids.tolist() == [[-1, 2, 10], [-1, -1, 0], [-1, 0, 123]]
    assert pids.tolist() == [[-1, -1, 2], [-1, -1, 0], [-1, -1, 4]]
    assert encode_ids(24, 10, 2) == 2401002 and encode_ids(26, 2) == 26002 and encode_ids(23) == 23
    with pytest.raises(ValueError, match="3 digits"):
        decode_uids(np.array([500]))


def test_cityscapes_panoptic_parts(tmp_path):
    name = "frankfurt_000000_000294"
    img_dir = tmp_path / "leftImg8bit" / "val" / "frankfurt"
    img_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(img_dir / f"{name}_leftImg8bit.png")
    uids = np.array([[7, 2401002, 2401005, 26003], [2602105, 2500203, 0, 23]], dtype=np.int32)
    tif = tmp_path / "gtFinePanopticParts" / "val" / "frankfurt" / f"{name}_gtFinePanopticParts.tif"
    tif.parent.mkdir(parents=True)
    tifffile.imwrite(tif, uids)
    ds = CityscapesPanopticPartsDataset(tmp_path, "val")
    _, lab, n = ds.load_raw(0)
    assert n == name
    assert lab.tolist() == [[0, 11, 11, 13], [13, 12, 255, 10]]
    parts = ds.load_parts(0)
    # person head (2); pid 5 on a human is the known artefact -> 0; car without part level -> 0; car chassis (5)
    assert parts.tolist() == [[0, 2, 0, 0], [5, 3, 0, 0]]
    assert ds.part_names[11] == ["torso", "head", "arm", "leg"] and ds.part_names[13][4] == "chassis"
    item = ds[0]
    assert item["parts"].shape == (2, 4) and item["parts"].dtype.is_floating_point is False
    cfg = DataConfig(name="cityscapes_panoptic_parts", root=str(tmp_path), crop_size=[2, 2])
    train_item = build_dataset(cfg, "val", train=True)[0]
    assert train_item["parts"].shape == (2, 2)


def _ppp(tmp_path):
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000001\n2008_000002\n")
    for i in ("2008_000001", "2008_000002"):
        (voc / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((2, 5, 3), np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    # VOC semantic labels: aeroplane (1) and person (15), a void border pixel
    sem = np.array([[1, 1, 1, 15, 255], [15, 15, 0, 7, 7]])
    write_index_png(voc / "SegmentationClass" / "2008_000001.png", sem, voc_colormap(256))
    write_index_png(voc / "SegmentationClass" / "2008_000002.png", sem, voc_colormap(256))
    # PPP uids: aeroplane engine_3 (pid 8 -> folded 'engine' = 6), aeroplane body (1), plane wheel_2 (17 -> 7);
    # person head (1), person on a VOC-void pixel (dropped); person hair (10); sem-only; car (7) wheel_1 (20 -> 11)
    uids = np.array([[100108, 100101, 100117, 1500101, 1500110], [1500010, 15, 0, 700120, 7]], dtype=np.int32)
    (tmp_path / "ppp" / "validation").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "ppp" / "validation" / "2008_000001.tif", uids)
    return voc


def test_pascal_panoptic_parts_folding_and_overlap(tmp_path):
    voc = _ppp(tmp_path)
    ds = PascalPanopticPartsDataset(tmp_path, "val", parts_root=tmp_path / "ppp")
    assert len(ds) == 1 and ds.sample_name(0) == "2008_000001"  # only images with a PPP file
    _, lab, _ = ds.load_raw(0)
    assert lab[0, 4] == 255
    parts = ds.load_parts(0)
    assert parts.tolist() == [[6, 1, 7, 1, 0], [10, 0, 0, 11, 0]]
    assert ds.part_names[1][5] == "engine" and ds.part_names[1][6] == "wheel"
    assert ds.part_names[15][9] == "hair" and ds.part_names[7][10] == "wheel"
    assert 4 not in ds.part_names and 11 not in ds.part_names  # boat and table have no parts
    names, fold = pascal_part_table()
    assert len(names) == 16 and fold[19, 76] == 13 and fold[6, 59] == 13  # train croofside, bus window_20
    with pytest.raises(ValueError, match="parts_root is empty"):
        PascalPanopticPartsDataset(voc, "val")
    cfg = DataConfig(name="pascal_panoptic_parts", root=str(voc), options={"parts_root": str(tmp_path / "ppp")})
    assert build_dataset(cfg, "val", train=False)[0]["parts"].tolist() == parts.tolist()


def test_pascal_parts_spec_yaml(tmp_path):
    _ppp(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "scene_class2part_classes:\n  aeroplane: [body, engine]\n  person: [head]\n"
        "countable_pids_groupings:\n  aeroplane:\n    engine: [6, 7, 8]\n"
    )
    ds = PascalPanopticPartsDataset(tmp_path, "val", parts_root=tmp_path / "ppp", parts_spec=spec)
    assert ds.part_names == {1: ["body", "engine"], 15: ["head"]}
    assert ds.load_parts(0).tolist() == [[2, 1, 0, 1, 0], [0, 0, 0, 0, 0]]
