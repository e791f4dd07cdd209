"""ISBI 2012 EM segmentation challenge: 30 serial-section images of 512 x 512, membrane vs cell.

Layout (``data.root``): ``train-volume.tif`` (30 pages, 8-bit gray) and ``train-labels.tif`` (30 pages, 0 = membrane,
255 = cell interior). Labels are binarised at 128: 0 -> class 0 (membrane), 255 -> class 1 (cell).

The paper splits the 30 labelled images at random into 20 training and 10 validation images, twice. Here split
``k`` (option ``split_seed``, 0 or 1 for the two splits, any integer allowed) is the permutation
``numpy.random.default_rng(split_seed).permutation(30)``: its first 20 entries are ``train``, the last 10 ``val``;
``all`` is every image. Sample names are ``slice_00`` .. ``slice_29`` (the page index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.data.base import DatasetInfo, SampleRecord, SegmentationDataset
from scaleprotoseg.data.io import to_rgb_uint8
from scaleprotoseg.data.registry import register_dataset

EM_CLASSES = ["membrane", "cell"]
EM_PALETTE = np.array([(0, 0, 0), (255, 255, 255)], dtype=np.uint8)
VOLUME = "train-volume.tif"
LABELS = "train-labels.tif"


def em_split_indices(n: int, split: str, split_seed: int = 0, num_train: int = 20) -> list[int]:
    """Page indices of ``split`` (train / val / all) for the seeded random train/val split of ``n`` images."""
    if split == "all":
        return list(range(n))
    if not 0 < num_train < n:
        raise ValueError(f"data.options.num_train: {num_train}; expected 0 < num_train < {n}")
    perm = np.random.default_rng(int(split_seed)).permutation(n)
    if split == "train":
        return sorted(int(i) for i in perm[:num_train])
    if split == "val":
        return sorted(int(i) for i in perm[num_train:])
    raise ValueError(f"ISBI EM: split {split!r} is not defined; expected train, val or all")


def read_stack(path: Path) -> np.ndarray:
    """A multi-page TIFF as an (N, H, W) array."""
    import tifffile

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist; expected the ISBI 2012 {path.name}")
    try:
        a = np.asarray(tifffile.imread(path))
    except Exception as err:
        raise ValueError(f"{path}: unreadable TIFF stack ({type(err).__name__}: {err})") from None
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{path}: stack of shape {a.shape}; expected (pages, height, width)")
    return a


@register_dataset("isbi_em")
class ISBIEMDataset(SegmentationDataset):
    """ISBI 2012 EM, 2 classes. Options ``split_seed`` (which random 20/10 split) and ``num_train``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: Any = None,
        seed: int = 0,
        split_seed: int = 0,
        num_train: int = 20,
    ) -> None:
        root = Path(root)
        self.volume_path, self.labels_path = root / VOLUME, root / LABELS
        import tifffile

        for p in (self.volume_path, self.labels_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: file does not exist; expected the ISBI 2012 {p.name}")
        try:
            with tifffile.TiffFile(self.volume_path) as tif:
                n = len(tif.pages)
        except Exception as err:
            raise ValueError(f"{self.volume_path}: unreadable TIFF ({type(err).__name__}: {err})") from None
        pages = em_split_indices(n, split, split_seed, num_train)
        samples = [SampleRecord(f"slice_{k:02d}", self.volume_path, self.labels_path, {"page": k}) for k in pages]
        self.root, self.split = root, split
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        super().__init__(
            DatasetInfo("isbi_em", list(EM_CLASSES), EM_PALETTE, 255), samples, transform=transform, seed=seed
        )

    def _stacks(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None:
            vol, lab = read_stack(self.volume_path), read_stack(self.labels_path)
            if vol.shape != lab.shape:
                raise ValueError(
                    f"{self.labels_path}: label stack {lab.shape} differs from image stack {vol.shape} "
                    f"({self.volume_path}); expected equal shapes"
                )
            self._cache = (vol, lab)
        return self._cache

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        vol, lab = self._stacks()
        k = self.samples[index].extra["page"]
        return to_rgb_uint8(vol[k], source=f"{self.volume_path}[{k}]"), (lab[k] >= 128).astype(np.int64)
