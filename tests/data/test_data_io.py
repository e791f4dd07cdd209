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


def test_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    from scaleprotoseg.data.io import MAX_PIXELS_ENV, read_header

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((20, 30), np.uint16))
    assert read_image(tmp_path / "a.png").shape == (20, 30, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "500")
    for name in ("a.png", "a.tif"):
        with pytest.raises(ValueError, match=rf"{name}: image of 30x20 = 0 megapixels; expected at most 0.0005"):
            read_image(tmp_path / name)
        with pytest.raises(ValueError, match="megapixels"):
            read_label(tmp_path / name)
        with pytest.raises(ValueError, match="megapixels"):
            read_header(tmp_path / name)
    monkeypatch.setenv(MAX_PIXELS_ENV, "600")
    assert read_label(tmp_path / "a.tif").shape == (20, 30)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="SCALEPROTOSEG_MAX_PIXELS='lots' is not valid"):
        read_image(tmp_path / "a.png")


def test_nifti_voxel_limit_before_decompressing():
    import gzip

    from scaleprotoseg.data.nifti import read_nifti

    header = bytearray(352)
    header[0:4] = (348).to_bytes(4, "little")
    header[40:56] = np.array([3, 2000, 2000, 2000, 1, 1, 1, 1], "<i2").tobytes()
    header[70:72] = (2).to_bytes(2, "little")
    header[108:112] = np.array([352], "<f4").tobytes()
    header[344:348] = b"n+1\x00"
    with pytest.raises(ValueError, match=r"x.nii.gz: volume of shape \(2000, 2000, 2000\) = 8000 million voxels"):
        read_nifti(gzip.compress(bytes(header)), source="x.nii.gz")


def test_tiff_pages_are_refused_and_channels_kept(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((4, 6, 7), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match=r"pages.tif: TIFF holds several planes \(4 along"):
        read_image(tmp_path / "pages.tif")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, np.full((6, 7), 9, np.uint8)]))
    assert (read_image(tmp_path / "planar.tif") == rgb).all()
    assert (read_image(tmp_path / "rgba.tif") == rgb).all()


def test_float_images_nan_and_integer_rounding():
    with pytest.raises(ValueError, match="x.tif: every pixel is NaN"):
        to_rgb_uint8(np.full((3, 3), np.nan, np.float32), source="x.tif")
    part = np.array([[np.nan, 0.5, 1.0]], np.float32)
    assert to_rgb_uint8(part)[..., 0].tolist() == [[0, 128, 255]]
    u16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    assert (to_rgb_uint8(u16)[..., 0] == np.rint(u16 * (255 / 65535))).all()
    i16 = np.arange(-32768, 32768, dtype=np.int16).reshape(256, 256)
    assert (to_rgb_uint8(i16)[..., 0] == np.rint((i16.astype(np.float64) + 32768) * (255 / 65535))).all()


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_conversion_makes_no_float64_copy(dtype):
    import tracemalloc

    a = np.ones((500, 500), dtype)  # 0.25 M pixels: a float64 RGB copy alone would be 6 MB
    tracemalloc.start()
    out = to_rgb_uint8(a)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (500, 500, 3)
    assert peak < 3e6, f"peak {peak / 1e6:.1f} MB"  # a 4-byte working copy, a mask, the uint8 output


def test_exif_orientation_applies_to_images_and_masks(tmp_path):
    from scaleprotoseg.data.io import read_header

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(rgb).save(tmp_path / "photo.png", exif=exif)
    Image.fromarray((rgb[..., 0] > 0).astype(np.uint8)).save(tmp_path / "mask.png", exif=exif)
    image, label = read_image(tmp_path / "photo.png"), read_label(tmp_path / "mask.png")
    assert image.shape == (6, 4, 3) and label.shape == (6, 4)
    assert image[0, -1, 0] == 255 and label[0, -1] == 1  # the top-left pixel is now top-right
    assert (read_header(tmp_path / "photo.png").width, read_header(tmp_path / "photo.png").height) == (4, 6)


def test_read_header_finds_truncated_files_without_decoding(tmp_path):
    from scaleprotoseg.data.io import read_header

    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    for name in ("a.png", "a.jpg", "a.tif", "a.bmp"):
        (tifffile.imwrite(tmp_path / name, rgb) if name.endswith("tif") else Image.fromarray(rgb).save(tmp_path / name))
        head = read_header(tmp_path / name)
        assert (head.width, head.height, head.channels) == (32, 32, 3)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(ValueError, match=rf"{name}: .*truncated|{name}: unreadable"):
            read_header(tmp_path / name)
