import numpy as np
import pytest
import tifffile
from PIL import Image

from scaleprotoseg.data.io import read_image, read_label, to_rgb_uint8, voc_colormap, write_index_png


def test_to_rgb_uint8_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_rgb_uint8(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 255
    assert (to_rgb_uint8(rgba) == [10, 0, 0]).all()
    u16 = np.array([[0, 65535]], np.uint16)
    assert to_rgb_uint8(u16)[..., 0].tolist() == [[0, 255]]
    assert to_rgb_uint8(np.array([[0.0, 1.0]]))[..., 0].tolist() == [[0, 255]]
    assert to_rgb_uint8(np.array([[False, True]]))[..., 0].tolist() == [[0, 255]]
    stretched = to_rgb_uint8(np.linspace(100, 200, 1000, dtype=np.uint16).reshape(10, 100), scaling="percentile")
    assert stretched.min() == 0 and stretched.max() == 255
    with pytest.raises(ValueError, match="not supported"):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


def test_read_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((5, 6), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", rgb[..., 1].astype(np.uint16) * 257)
    assert (read_image(tmp_path / "rgb.png") == rgb).all()
    assert (read_image(tmp_path / "gray.png")[..., 1] == rgb[..., 0]).all()
    assert (read_image(tmp_path / "rgba.png") == rgb).all()
    assert (read_image(tmp_path / "g16.png")[..., 2] == rgb[..., 0]).all()
    assert (read_image(tmp_path / "g16.tif")[..., 0] == rgb[..., 1]).all()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(tmp_path / "junk.png")


def test_labels_index_png_round_trip_and_rgb_rejected(tmp_path):
    lab = np.array([[0, 1, 2], [255, 20, 0]], dtype=np.int64)
    write_index_png(tmp_path / "m.png", lab)
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert (read_label(tmp_path / "m.png") == lab).all()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb.png: mask is RGB .*expected a single-channel index"):
        read_label(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "m.tif", np.array([[300, 1]], np.uint16))
    assert read_label(tmp_path / "m.tif").tolist() == [[300, 1]]


def test_voc_colormap():
    cmap = voc_colormap(21)
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128]  # person
    assert cmap[20].tolist() == [0, 64, 128]
