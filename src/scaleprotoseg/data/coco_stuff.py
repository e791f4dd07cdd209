"""COCO-Stuff 164k, 182 classes (91 thing ids incl. 11 unused + 91 stuff), from the stuffthingmaps PNGs.

Layout (``data.root``)::

    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>.png   # 0..181 = COCO category id - 1, 255 = unlabeled

Any other value is reported as an error (by loading and by ``data check``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.data.base import DatasetInfo, SampleRecord, SegmentationDataset, split_aliases
from scaleprotoseg.data.io import read_image, read_label, voc_colormap
from scaleprotoseg.data.registry import register_dataset

COCO_STUFF_CLASSES = [
    # things (COCO ids 1..91, including the 11 ids without annotations)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff (COCO ids 92..182)
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]  # fmt: skip
SPLITS = {"train": "train2017", "val": "val2017"}


@register_dataset("coco_stuff")
class CocoStuffDataset(SegmentationDataset):
    """COCO-Stuff 164k, 182 classes. Splits ``train`` / ``train2017`` and ``val`` / ``val2017``."""

    def __init__(self, root: str | Path, split: str = "train", *, transform: Any = None, seed: int = 0) -> None:
        root = Path(root)
        folder = split_aliases(split, SPLITS)
        img_dir, ann_dir = root / "images" / folder, root / "annotations" / folder
        if not img_dir.is_dir():
            raise FileNotFoundError(
                f"{img_dir}: split folder does not exist; expected <root>/images/{folder}/*.jpg "
                f"and <root>/annotations/{folder}/*.png"
            )
        samples = [SampleRecord(p.stem, p, ann_dir / f"{p.stem}.png") for p in sorted(img_dir.glob("*.jpg"))]
        self.root, self.split = root, split
        info = DatasetInfo("coco_stuff", list(COCO_STUFF_CLASSES), voc_colormap(183)[1:], 255)
        super().__init__(info, samples, transform=transform, seed=seed)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        return read_image(rec.image), read_label(rec.label)  # values are the classes; 255 = unlabeled
