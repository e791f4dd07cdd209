"""Reading and writing images and label maps.

Images are returned as uint8 (H, W, 3) RGB whatever their storage: grayscale is replicated to three channels, an
alpha channel is dropped, palette images are expanded, and 16-bit / float data are scaled to 0..255 (see
:func:`to_rgb_uint8`). Label maps are returned as int64 (H, W) class indices; a colour (RGB) mask is an error,
because its colours would have to be guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
SCALINGS = ("range", "percentile")


def to_rgb_uint8(array: np.ndarray, *, source: str = "image", scaling: str = "range") -> np.ndarray:
    """Convert a decoded image array to uint8 (H, W, 3).

    Accepted shapes: (H, W), (H, W, 1), (H, W, 2) (gray + alpha), (H, W, 3), (H, W, 4) (RGBA). Intensities:
    uint8 unchanged; bool to 0/255; with ``scaling="range"`` other integer types are scaled by their type's full range
    (uint16: x * 255 / 65535; signed types from their minimum) and floats are taken as 0..1 when their maximum is at
    most 1, else as 0..255 (clipped); with ``scaling="percentile"`` every non-uint8 image is stretched between its own
    1st and 99.8th percentiles.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"{source}: intensity scaling {scaling!r} is not known; expected one of {', '.join(SCALINGS)}")
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] in (2, 4):
        a = a[..., :-1]  # drop alpha
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(
            f"{source}: image array of shape {tuple(np.shape(array))} is not supported; expected "
            "(H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4)"
        )
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if scaling == "percentile":
        return percentile_to_uint8(a)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        out = (a.astype(np.float64) - info.min) * (255.0 / (float(info.max) - info.min))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        f = np.nan_to_num(a.astype(np.float64))
        if f.size and f.max() <= 1.0:
            f = f * 255.0
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    raise ValueError(f"{source}: pixel type {a.dtype} is not supported; expected integer, float or bool pixels")


def percentile_to_uint8(array: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Stretch ``array`` linearly so that its ``low`` / ``high`` percentiles map to 0 / 255 (clipped), as uint8."""
    a = np.asarray(array, dtype=np.float64)
    lo, hi = np.percentile(a, [low, high]) if a.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _open_pil(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (so that truncated files fail here), naming the file in any error."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file does not exist") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})") from None
    return img


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as err:
        raise ValueError(f"{path}: unreadable or truncated TIFF ({type(err).__name__}: {err})") from None


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
        a = _read_tiff(path)
        if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (1, 2, 3, 4):
            a = np.moveaxis(a, 0, -1)  # channels first
        if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(f"{path}: TIFF holds {a.shape[0]} pages of {a.shape[1:]} pixels; expected one 2-D image")
        return to_rgb_uint8(a, source=str(path), scaling=scaling)
    return to_rgb_uint8(_pil_to_array(_open_pil(path)), source=str(path), scaling=scaling)


def label_mode(path: str | Path) -> str:
    """PIL mode of a mask file (or ``tiff:<shape>`` for TIFF), for diagnostics."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return f"tiff:{_read_tiff(path).shape}"
    return _open_pil(path).mode


def read_label(path: str | Path) -> np.ndarray:
    """Read an index mask (single-channel or palette PNG, or a 2-D integer TIFF) as int64 (H, W) class indices."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        a = _read_tiff(path)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
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
