"""ADE20K scene parsing (ADEChallengeData2016), 150 classes.

Layout (``data.root`` is ``ADEChallengeData2016`` or its parent)::

    images/{training,validation}/ADE_*.jpg
    annotations/{training,validation}/ADE_*.png   # 0 = other (ignored), 1..150 = classes 0..149
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.data.base import DatasetInfo, SampleRecord, SegmentationDataset, split_aliases
from scaleprotoseg.data.io import read_image, read_label, voc_colormap
from scaleprotoseg.data.registry import register_dataset

# objectInfo150 order; the first synonym of each entry.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
SPLITS = {"train": "training", "val": "validation"}


def ade20k_labels(annotation: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Annotation value -> class: 0 (other) -> ignore, v -> v - 1 (values above 150 stay invalid and are reported)."""
    a = np.asarray(annotation).astype(np.int64)
    return np.where(a == 0, ignore_index, a - 1)


def find_ade_root(root: str | Path) -> Path:
    root = Path(root)
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise FileNotFoundError(
        f"{root}: no ADEChallengeData2016 folder found; expected images/ and annotations/ in it "
        "or in ADEChallengeData2016/"
    )


@register_dataset("ade20k")
class ADE20KDataset(SegmentationDataset):
    """ADE20K, 150 classes. Splits ``train`` / ``training`` and ``val`` / ``validation``."""

    def __init__(self, root: str | Path, split: str = "train", *, transform: Any = None, seed: int = 0) -> None:
        ade = find_ade_root(root)
        folder = split_aliases(split, SPLITS)
        img_dir, ann_dir = ade / "images" / folder, ade / "annotations" / folder
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir}: split folder does not exist; expected split train or val")
        samples = [SampleRecord(p.stem, p, ann_dir / f"{p.stem}.png") for p in sorted(img_dir.glob("*.jpg"))]
        self.root, self.split = ade, split
        info = DatasetInfo("ade20k", list(ADE20K_CLASSES), voc_colormap(151)[1:], 255)
        super().__init__(info, samples, transform=transform, seed=seed)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        return read_image(rec.image), ade20k_labels(read_label(rec.label))
