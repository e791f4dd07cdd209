"""Reading and writing images and label maps.

Images are returned as uint8 (H, W, 3) RGB whatever their storage: grayscale is replicated to three channels, an
alpha channel is dropped, palette images are expanded, and 16-bit / float data are scaled to 0..255 (see
:func:`to_rgb_uint8`). Label maps are returned as int64 (H, W) class indices; a colour (RGB) mask is an error,
because its colours would have to be guessed.

Every reader checks the image size from the file's header before decoding anything: more than :func:`max_pixels`
pixels (default 100 megapixels, environment variable ``SCALEPROTOSEG_MAX_PIXELS``) is refused, so that a small
compressed file cannot ask for tens of gigabytes. An EXIF orientation tag (JPEG, TIFF, PNG, WebP read through PIL) is
applied to images and masks alike, so a photo and a mask drawn on it stay aligned. A TIFF must hold one 2-D image
(samples/channels allowed); a stack of pages is refused rather than read as colour channels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
SCALINGS = ("range", "percentile")
MAX_PIXELS_ENV = "SCALEPROTOSEG_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000


def max_pixels() -> int:
    """The largest image (height x width) the readers decode: ``$SCALEPROTOSEG_MAX_PIXELS`` or 100 megapixels.

    Above about 179 megapixels PIL's own decompression-bomb limit also applies (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    import os

    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} is not valid; expected a positive number of pixels")
    return value


def check_pixels(path: str | Path, height: int, width: int, limit: int | None = None) -> None:
    """Refuse an image of ``height`` x ``width`` pixels (read from its header) above ``limit`` (:func:`max_pixels`)."""
    limit = max_pixels() if limit is None else limit
    if height * width > limit:
        raise ValueError(
            f"{path}: image of {width}x{height} = {height * width / 1e6:.0f} megapixels; expected at most "
            f"{limit / 1e6:g} megapixels (set {MAX_PIXELS_ENV} to read larger images)"
        )


def printable(text: object) -> str:
    """``text`` safe to print or draw: file names that are not valid UTF-8 (surrogate escapes) get U+FFFD."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def to_rgb_uint8(array: np.ndarray, *, source: str = "image", scaling: str = "range") -> np.ndarray:
    """Convert a decoded image array to uint8 (H, W, 3).

    Accepted shapes: (H, W), (H, W, 1), (H, W, 2) (gray + alpha), (H, W, 3), (H, W, 4) (RGBA). Intensities:
    uint8 unchanged; bool to 0/255; with ``scaling="range"`` other integer types are scaled by their type's full range
    (uint16: x * 255 / 65535, rounded; signed types from their minimum) and floats are taken as 0..1 when their maximum
    is at most 1, else as 0..255 (clipped; NaN as 0); with ``scaling="percentile"`` every non-uint8 image is stretched
    between its own 1st and 99.8th percentiles. A float image without a single finite value is refused. No float64
    copy of the image is made (integer arithmetic for integer types, float32 for floats).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"{source}: intensity scaling {scaling!r} is not known; expected one of {', '.join(SCALINGS)}")
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] in (2, 4):
        a = a[..., :-1]  # drop alpha
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(
            f"{source}: image array of shape {tuple(np.shape(array))} is not supported; expected "
            "(H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4)"
        )
    out = _intensity_to_uint8(a, source, scaling)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)  # gray replicated last, as uint8
    return np.ascontiguousarray(out)


def _intensity_to_uint8(a: np.ndarray, source: str, scaling: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(a.dtype, np.floating) and a.size and not np.isfinite(a).any():
        raise ValueError(f"{source}: every pixel is NaN or infinite; expected an image with finite values")
    if scaling == "percentile":
        return percentile_to_uint8(a)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        span = int(info.max) - int(info.min)
        if a.dtype.itemsize <= 4:
            # round(v * 255 / span) in integers: span is odd (2^n - 1), so no value lies exactly halfway
            work = np.uint32 if a.dtype.itemsize <= 2 else np.uint64
            v = a.astype(work)
            if info.min:
                v -= np.array(info.min, dtype=np.int64).astype(work)  # two's complement: shifts to 0..span
            v *= work(510)
            v += work(span)
            v //= work(2 * span)
            return v.astype(np.uint8)
        f = (a - info.min).astype(np.float64) * (255.0 / span)
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        f = np.array(a, dtype=np.float32)  # one float32 copy, modified in place
        np.nan_to_num(f, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.max() <= 1.0:
            f *= 255.0
        np.rint(f, out=f)
        np.clip(f, 0, 255, out=f)
        return f.astype(np.uint8)
    raise ValueError(f"{source}: pixel type {a.dtype} is not supported; expected integer, float or bool pixels")


def percentile_to_uint8(array: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Stretch ``array`` linearly so that its ``low`` / ``high`` percentiles map to 0 / 255 (clipped), as uint8."""
    a = np.array(array, dtype=np.float32)  # float32 working copy, modified in place
    finite = np.isfinite(a)
    lo, hi = (float(v) for v in np.percentile(a[finite], [low, high])) if finite.any() else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    np.nan_to_num(a, copy=False, nan=lo, posinf=hi, neginf=lo)
    a -= lo
    a *= 255.0 / (hi - lo)
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    return a.astype(np.uint8)


def _open_pil(path: Path, *, decode: bool = True) -> Image.Image:
    """Open ``path``, check its size against :func:`max_pixels` from the header, then fully decode it (so that
    truncated files fail here) and apply its EXIF orientation; every error names the file."""
    try:
        with warnings.catch_warnings():  # the size is checked below, against max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file does not exist") from None
    except Image.DecompressionBombError:
        raise ValueError(
            f"{path}: image is larger than PIL's decompression-bomb limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} "
            f"pixels; expected at most {max_pixels() / 1e6:g} megapixels"
        ) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    width, height = img.size
    check_pixels(path, height, width)
    if not decode:
        return img
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as err:
        raise ValueError(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})") from None
    return img


def _tiff_layout(path: Path) -> tuple[tuple[int, ...], str]:
    """(shape, axes) of the first image series of a TIFF, read from its header; size checked against max_pixels."""
    import tifffile

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = tuple(int(v) for v in series.shape), str(series.axes)
    except Exception as err:
        raise ValueError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
    planes = [(ax, n) for ax, n in zip(axes, shape) if ax not in "YXS" and n > 1]
    if planes and not (len(planes) == 1 and planes[0][0] == "C" and planes[0][1] in (3, 4) and axes.index("C") == 0):
        what = ", ".join(f"{n} along {ax}" for ax, n in planes)
        raise ValueError(
            f"{path}: TIFF holds several planes ({what}; axes {axes}, shape {shape}); expected one 2-D image"
        )
    h = shape[axes.index("Y")] if "Y" in axes else 1
    w = shape[axes.index("X")] if "X" in axes else 1
    check_pixels(path, h, w)
    return shape, axes


def _read_tiff(path: Path) -> np.ndarray:
    """The single 2-D image of a TIFF as (H, W) or (H, W, channels) (see :func:`_tiff_layout`)."""
    import tifffile

    _, axes = _tiff_layout(path)
    try:
        a = np.asarray(tifffile.imread(path, series=0))
    except Exception as err:
        raise ValueError(f"{path}: unreadable or truncated TIFF ({type(err).__name__}: {err})") from None
    keep = [i for i, (ax, n) in enumerate(zip(axes, a.shape)) if ax in "YX" or n > 1]  # drop singleton planes
    kept = [axes[i] for i in keep]
    a = a.reshape([a.shape[i] for i in keep])
    if a.ndim == 3 and kept[0] in "SC":
        a = np.moveaxis(a, 0, -1)  # planar samples / channels first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels (:func:`read_header`)."""

    width: int  # after the EXIF orientation
    height: int
    mode: str  # PIL mode, or ``tiff:<dtype>`` for a TIFF
    channels: int


def read_header(path: str | Path) -> ImageHeader:
    """Size, mode and channels of an image or mask file from its header, in milliseconds; the file is also checked
    for completeness (PNG chunks up to IEND, JPEG end marker, TIFF strips and BMP/WebP sizes within the file), so a
    truncated file is refused (ValueError naming it) without decoding it. Sizes above :func:`max_pixels` are refused.
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        shape, axes = _tiff_layout(path)
        try:
            with tifffile.TiffFile(path) as tif:
                size = path.stat().st_size
                page = tif.pages[0]
                dtype = str(tif.series[0].dtype)
                ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts)]
        except Exception as err:
            raise ValueError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
        if ends and max(ends) > size:
            raise ValueError(f"{path}: truncated TIFF ({size} bytes; its image data ends at byte {max(ends)})")
        channels = int(np.prod([n for ax, n in zip(axes, shape) if ax in "SC"], dtype=np.int64))
        return ImageHeader(shape[axes.index("X")], shape[axes.index("Y")], f"tiff:{dtype}", channels)
    img = _open_pil(path, decode=False)
    with img:
        width, height = img.size
        mode, channels, fmt = img.mode, len(img.getbands()), img.format
        problem, png_exif = _incomplete(path, fmt)
        if problem:
            raise ValueError(f"{path}: truncated {fmt} ({problem})")
        # PIL finds a PNG's eXIf chunk only by decoding, so it is asked only when the chunk walk saw one
        orientation = 1
        if fmt in ("JPEG", "MPO", "WEBP", "TIFF") or png_exif:
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception as err:
                raise ValueError(f"{path}: unreadable EXIF data ({type(err).__name__}: {err})") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageHeader(width, height, mode, channels)


def _incomplete(path: Path, fmt: str | None) -> tuple[str | None, bool]:
    """(why ``path`` of PIL format ``fmt`` is shorter than its own structure says, or None; whether a PNG has an
    eXIf chunk)."""
    import struct

    size = path.stat().st_size
    with path.open("rb") as f:
        if fmt == "PNG":
            pos, exif = 8, False
            while pos + 8 <= size:
                f.seek(pos)
                length, kind = struct.unpack(">I4s", f.read(8))
                pos += 12 + length
                exif |= kind == b"eXIf"
                if pos > size:
                    return f"chunk {kind.decode('latin-1')!r} runs past the end of the file ({size} bytes)", exif
                if kind == b"IEND":
                    return None, exif
            return f"no IEND chunk in {size} bytes", exif
        if fmt in ("JPEG", "MPO"):
            f.seek(max(0, size - 4096))
            return (None if b"\xff\xd9" in f.read() else f"no end-of-image marker in {size} bytes"), False
        if fmt in ("BMP", "WEBP"):
            f.seek(2 if fmt == "BMP" else 4)
            declared = struct.unpack("<I", f.read(4))[0] + (0 if fmt == "BMP" else 8)
            return (None if declared <= size else f"{size} bytes, the header declares {declared}"), False
    return None, False


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        img = img.convert("RGBA" if mode in ("PA", "RGBa") else "RGB")
    elif mode == "1":
        img = img.convert("L")
    return np.asarray(img)


def read_image(path: str | Path, *, scaling: str = "range") -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB (see :func:`to_rgb_uint8` for the conversions)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return to_rgb_uint8(_read_tiff(path), source=str(path), scaling=scaling)
    return to_rgb_uint8(_pil_to_array(_open_pil(path)), source=str(path), scaling=scaling)


def label_mode(path: str | Path) -> str:
    """PIL mode of a mask file (or ``tiff:<shape>`` for TIFF), for diagnostics."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return f"tiff:{_tiff_layout(path)[0]}"
    return _open_pil(path, decode=False).mode


def read_label(path: str | Path) -> np.ndarray:
    """Read an index mask (single-channel or palette PNG, or a 2-D integer TIFF) as int64 (H, W) class indices."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        a = _read_tiff(path)
        if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{path}: mask of shape {a.shape} and type {a.dtype}; expected a 2-D integer index image")
        return a.astype(np.int64)
    img = _open_pil(path)
    if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(img).astype(np.int64)
    raise ValueError(
        f"{path}: mask is {img.mode} ({len(img.getbands())} channels); expected a single-channel index image "
        "(PNG mode L or P) whose pixel values are class indices"
    )


def voc_colormap(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved class index), (n, 3) uint8; used as the default palette."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def write_index_png(
    path: str | Path, label: np.ndarray, palette: np.ndarray | Sequence[Sequence[int]] | None = None
) -> None:
    """Write class indices (values 0..255) as a palette PNG (mode P) coloured with ``palette`` (default VOC map)."""
    path = Path(path)
    a = np.asarray(label)
    if a.ndim != 2 or (a.size and (a.min() < 0 or a.max() > 255)):
        raise ValueError(f"{path}: label of shape {a.shape} with values outside 0..255; expected a 2-D map of 0..255")
    full = voc_colormap(256)
    if palette is not None:
        pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        full[: len(pal)] = pal
    img = Image.frombytes("P", (a.shape[1], a.shape[0]), np.ascontiguousarray(a, dtype=np.uint8).tobytes())
    img.putpalette(full.reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image (format from the suffix; PNG is lossless)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_rgb_uint8(image, source=str(path))).save(path)
