"""Cityscapes (fine annotations), labelIds mapped to the 19 evaluation classes (trainIds).

Layout (``data.root`` holds both folders)::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.data.base import DatasetInfo, SampleRecord, SegmentationDataset, apply_lut, lookup_table
from scaleprotoseg.data.io import read_image, read_label
from scaleprotoseg.data.registry import register_dataset

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)  # fmt: skip

# The official table (cityscapesScripts labels.py): labelId -> trainId; every other id (0-6 void/flat-void, 9
# parking, 10 rail track, 14 guard rail, 15 bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer, -1 license
# plate) is ignored.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def cityscapes_info(name: str = "cityscapes", part_names: dict[int, list[str]] | None = None) -> DatasetInfo:
    return DatasetInfo(name, list(CITYSCAPES_CLASSES), CITYSCAPES_PALETTE, 255, part_names)


def label_ids_to_train_ids(label_ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Map Cityscapes labelIds to trainIds (0..18), everything else to ``ignore_index``."""
    return apply_lut(label_ids, lookup_table(LABEL_TO_TRAIN_ID, 256, ignore_index), ignore_index)


def cityscapes_images(root: Path, split: str) -> list[tuple[str, Path]]:
    """(name, image path) of every ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``, sorted by name."""
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise FileNotFoundError(
            f"{img_dir}: Cityscapes image folder does not exist; expected "
            f"<root>/leftImg8bit/{split}/<city>/*_leftImg8bit.png"
        )
    out = [(p.name[: -len("_leftImg8bit.png")], p) for p in img_dir.glob("*/*_leftImg8bit.png")]
    return sorted(out)


@register_dataset("cityscapes")
class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine, 19 classes. Splits ``train``, ``val`` (and ``test``, whose labels are all void)."""

    def __init__(self, root: str | Path, split: str = "train", *, transform: Any = None, seed: int = 0) -> None:
        root = Path(root)
        samples = []
        for name, img in cityscapes_images(root, split):
            city = img.parent.name
            samples.append(SampleRecord(name, img, root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"))
        self.root, self.split = root, split
        super().__init__(cityscapes_info(), samples, transform=transform, seed=seed)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        return read_image(rec.image), label_ids_to_train_ids(read_label(rec.label))
