"""Writing predictions in a public benchmark's own label ids, ready for its evaluation server (Table 1, test)."""

from __future__ import annotations

import numpy as np

# Cityscapes: the 19 evaluated classes (trainIds 0..18) and their official labelIds.
CITYSCAPES_TRAINID_TO_LABELID = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])

EXPORT_FORMATS = ("index", "cityscapes", "voc", "ade20k", "coco_stuff")


def export_labels(
    labels: np.ndarray, fmt: str, palette: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map model class indices to a format's ids; returns (uint8 ids, palette for the PNG or None).

    - ``index``: the model's indices with the run's palette.
    - ``cityscapes``: trainIds -> labelIds (``*_labelIds.png`` convention of the Cityscapes server).
    - ``voc``: VOC indices with the VOC palette.
    - ``ade20k``: 0..149 -> 1..150 (0 is "other" in ADEChallengeData2016).
    - ``coco_stuff``: 0..181 -> 1..182 (0 is "unlabeled" in the official ids).
    """
    labels = np.asarray(labels)
    if fmt == "index":
        return labels.astype(np.uint8), palette
    if fmt == "cityscapes":
        if labels.max(initial=0) >= len(CITYSCAPES_TRAINID_TO_LABELID):
            raise ValueError(f"cityscapes format: class index {int(labels.max())} is not a trainId (expected 0..18)")
        return CITYSCAPES_TRAINID_TO_LABELID[labels].astype(np.uint8), None
    if fmt == "voc":
        return labels.astype(np.uint8), None
    if fmt in ("ade20k", "coco_stuff"):
        limit = 150 if fmt == "ade20k" else 182
        if labels.max(initial=0) >= limit:
            raise ValueError(f"{fmt} format: class index {int(labels.max())} is out of range (expected < {limit})")
        return (labels + 1).astype(np.uint8), None
    raise ValueError(f"format {fmt!r} is not valid; expected one of {', '.join(EXPORT_FORMATS)}")
