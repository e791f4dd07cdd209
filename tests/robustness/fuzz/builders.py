"""Bad input files, built at test time (nothing binary is committed): each function writes one file and returns it.

Huge images are headers that only claim a huge size (a few hundred bytes on disk), so a reader that trusts them
would allocate gigabytes; truncated files are valid files cut short.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

NON_UTF8 = b"caf\xe9"  # Latin-1 bytes: not valid UTF-8 (a surrogate escape in a Python str)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(path: Path, width: int = 13000, height: int = 13000, bit_depth: int = 16) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` gray pixels (default: 169 megapixels, under PIL's own
    decompression-bomb limit, 5.5 GB once decoded and converted), with one tiny compressed row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def huge_tiff(path: Path, width: int = 100000, height: int = 100000) -> Path:
    """A little-endian TIFF whose tags claim ``width`` x ``height`` 8-bit gray pixels in one 16-byte strip."""
    tags = [  # (tag, type, count, value): type 3 SHORT, 4 LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 0),  # strip offset, patched below
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 16),
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0) + b"\x00" * 16
    path.write_bytes(out)
    return path


def truncated(path: Path, keep: float = 0.5) -> Path:
    """Cut an existing file to ``keep`` of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(np.asarray(array)).save(path)
    return path


def tiff(path: Path, array: np.ndarray, **kwargs) -> Path:
    import tifffile

    tifffile.imwrite(path, np.asarray(array), **kwargs)
    return path


def zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def rgb(size: tuple[int, int] = (40, 40), seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def non_utf8_name(folder: Path, stem: bytes = NON_UTF8, suffix: str = ".png") -> Path:
    """A path in ``folder`` whose file name is not valid UTF-8 (as Python sees it: with surrogate escapes)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + stem + suffix.encode()))


def folder_dataset(root: Path, masks: dict[str, np.ndarray], classes: list[str], ignore_index: int = 255) -> Path:
    """A folder dataset with one random RGB image per mask; the stems are split alternately into train and val."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    names = sorted(masks)
    for i, stem in enumerate(names):
        png(root / "images" / f"{stem}.png", rgb(masks[stem].shape, seed=i))
        png(root / "masks" / f"{stem}.png", masks[stem].astype(np.uint8))
    (root / "splits" / "train.txt").write_text("\n".join(names[0::2]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(names[1::2]) + "\n")
    (root / "classes.yaml").write_text(f"classes: [{', '.join(classes)}]\nignore_index: {ignore_index}\n")
    return root


def binary_0_255_masks(n: int = 4, size: int = 16) -> dict[str, np.ndarray]:
    """Binary masks saved as 0/255 (a disc of 255 on 0): the foreground is the default ignore index."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 3) ** 2).astype(np.uint8) * 255
    return {f"m{i}": disc for i in range(n)}
