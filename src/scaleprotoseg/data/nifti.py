"""A minimal NIfTI-1 reader (single-file ``.nii`` / ``.nii.gz``) with numpy, for the sample datasets.

Reads the 348-byte header (``sizeof_hdr`` at 0 gives the byte order; ``dim`` at 40; ``datatype`` at 70; ``vox_offset``
at 108; ``scl_slope`` / ``scl_inter`` at 112 / 116; magic ``n+1`` at 344) and returns the voxel array in
(x, y, z, ...) order (NIfTI stores x fastest, i.e. Fortran order), scaled when ``scl_slope`` is set.
"""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np

DTYPES = {
    2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16,
    768: np.uint32, 1024: np.int64, 1280: np.uint64,
}  # fmt: skip


def _header(data: bytes, source: str) -> tuple[str, tuple[int, ...], np.dtype, int, float, float]:
    """(byte order, shape, dtype, vox_offset, scl_slope, scl_inter) from the first 348 bytes."""
    if len(data) < 348:
        raise ValueError(f"{source}: {len(data)} bytes; expected at least the 348-byte NIfTI-1 header")
    if struct.unpack("<i", data[:4])[0] == 348:
        end = "<"
    elif struct.unpack(">i", data[:4])[0] == 348:
        end = ">"
    else:
        raise ValueError(f"{source}: sizeof_hdr is not 348; expected a NIfTI-1 file")
    magic = data[344:348]
    if magic not in (b"n+1\x00", b"ni1\x00"):
        raise ValueError(f"{source}: magic {magic!r}; expected b'n+1' (single-file NIfTI-1)")
    if magic == b"ni1\x00":
        raise ValueError(f"{source}: header-only .hdr/.img pair; expected a single-file .nii")
    dim = struct.unpack(end + "8h", data[40:56])
    datatype = struct.unpack(end + "h", data[70:72])[0]
    vox_offset = int(struct.unpack(end + "f", data[108:112])[0])
    slope, inter = struct.unpack(end + "ff", data[112:120])
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"{source}: dim[0] = {ndim}; expected 1..7 dimensions")
    shape = tuple(int(d) for d in dim[1 : ndim + 1])
    if min(shape) < 0:
        raise ValueError(f"{source}: dimensions {shape}; expected non-negative sizes")
    if datatype not in DTYPES:
        raise ValueError(f"{source}: datatype code {datatype} is not supported; expected one of {sorted(DTYPES)}")
    return end, shape, np.dtype(DTYPES[datatype]).newbyteorder(end), vox_offset, slope, inter


def read_nifti(
    data: bytes, *, source: str = "NIfTI data", scale: bool = True, max_voxels: int | None = None
) -> np.ndarray:
    """Decode a (possibly gzip-compressed) NIfTI-1 file's bytes into an array of shape ``dim[1:dim[0] + 1]``.

    The header is read first (from the compressed stream) and a volume of more than ``max_voxels`` voxels (default:
    :func:`scaleprotoseg.data.io.max_pixels`) is refused before anything is decompressed or allocated.
    """
    from scaleprotoseg.data.io import max_pixels

    limit = max_pixels() if max_voxels is None else max_voxels
    compressed = data[:2] == b"\x1f\x8b"
    if compressed:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                head = stream.read(348)
        except (OSError, EOFError) as err:
            raise ValueError(f"{source}: unreadable gzip data ({err})") from None
    else:
        head = data[:348]
    _, shape, dtype, _, _, _ = _header(head, source)
    count = int(np.prod(shape))
    if count > limit:
        raise ValueError(
            f"{source}: volume of shape {shape} = {count / 1e6:.0f} million voxels; expected at most "
            f"{limit / 1e6:g} million (set SCALEPROTOSEG_MAX_PIXELS to read larger volumes)"
        )
    if compressed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{source}: truncated or corrupt gzip data ({err})") from None
    end, shape, dtype, vox_offset, slope, inter = _header(data, source)
    if vox_offset + count * dtype.itemsize > len(data):
        raise ValueError(
            f"{source}: {len(data) - vox_offset} data bytes; expected {count * dtype.itemsize} for "
            f"shape {shape} of {dtype}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=vox_offset).reshape(shape, order="F")
    arr = arr.astype(dtype.newbyteorder("="))
    if scale and slope != 0.0 and (slope != 1.0 or inter != 0.0):  # slope 0 means 'no scaling'
        arr = arr.astype(np.float64) * slope + inter
    return arr
