"""Part annotations for the interpretability metrics: Cityscapes-Panoptic-Parts and Pascal-Panoptic-Parts.

Both encode every pixel as a universal id (uid) in a 2-D int32 TIFF: ``uid = sid`` (semantic id, up to 2 digits),
``uid = sid * 1000 + iid`` (with an instance id, 4-5 digits) or ``uid = sid * 100000 + iid * 100 + pid`` (with a
part id, 6-7 digits). Part id 0 is the void part. Items of these datasets add ``parts`` int64 (H, W): the part id
within the pixel's class (1-based, 0 = no part), and ``dataset.part_names[c][p - 1]`` names part ``p`` of class ``c``.

- Cityscapes-Panoptic-Parts: ``<root>/gtFinePanopticParts/<split>/<city>/<name>_gtFinePanopticParts.tif`` beside the
  Cityscapes ``leftImg8bit``. sids are Cityscapes labelIds (mapped to the 19 trainIds); parts exist for person and
  rider (torso, head, arm, leg) and car, truck, bus (window, wheel, light, license plate, chassis). Part ids above a
  class's count (a known artefact: pid 5 on a few humans) become 0.
- Pascal-Panoptic-Parts: ``<parts_root>/{training,validation}/<voc id>.tif`` (PPP v2 labels on VOC 2010 images). As in
  the paper, the semantic labels come from Pascal VOC 2012 (``SegmentationClass``) and the items are the images of
  the VOC split that have a PPP file; a pixel gets a part only where the PPP class equals the VOC class. PPP stores
  PASCAL-Part's fine part ids (countable parts such as wheels numbered 1..10); they are folded to one id per part
  name (the panoptic_parts dataset spec's ``countable_pids_groupings``). ``parts_spec`` may name a YAML file with
  ``scene_class2part_classes`` (and optional ``countable_pids_groupings``) to use another table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scaleprotoseg.data.base import SampleRecord, SegmentationDataset
from scaleprotoseg.data.cityscapes import LABEL_TO_TRAIN_ID, cityscapes_images, cityscapes_info
from scaleprotoseg.data.io import TIFF_SUFFIXES, read_image, read_label
from scaleprotoseg.data.pascal_voc import VOC_CLASSES, find_voc_root, read_id_list, voc_info
from scaleprotoseg.data.registry import register_dataset


def decode_uids(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split universal ids into (semantic id, instance id, part id), int64; an absent level is -1.

    uid <= 99: sid only; 1000 <= uid <= 99999: sid * 1000 + iid; uid >= 100000: sid * 100000 + iid * 100 + pid.
    Negative uids (void in some tools) decode to (-1, -1, -1).
    """
    u = np.asarray(uids).astype(np.int64)
    sem = u <= 99
    inst = (u >= 1000) & (u <= 99_999)
    part = u >= 100_000
    sids = np.where(sem, u, np.where(inst, u // 1000, np.where(part, u // 100_000, -1)))
    sids = np.where(u < 0, -1, sids)
    iids = np.where(inst, u % 1000, np.where(part, (u // 100) % 1000, -1))
    pids = np.where(part, u % 100, -1)
    bad = ~(sem | inst | part) & (u >= 0)
    if bad.any():
        raise ValueError(f"uid values {np.unique(u[bad])[:10].tolist()} have 3 digits; expected 1-2, 4-5 or 6-7 digits")
    return sids, iids, pids


def encode_ids(sid: int, iid: int = -1, pid: int = -1) -> int:
    """The uid of (sid, iid, pid); -1 leaves a level out."""
    if pid >= 0:
        return sid * 100_000 + max(iid, 0) * 100 + pid
    if iid >= 0:
        return sid * 1000 + iid
    return sid


def _read_uids(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        if not path.is_file():
            raise FileNotFoundError(f"{path}: file does not exist")
        try:
            a = np.asarray(tifffile.imread(path))
        except Exception as err:
            raise ValueError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
        if a.ndim != 2:
            raise ValueError(f"{path}: uid map of shape {a.shape}; expected a 2-D array")
        return a.astype(np.int64)
    return read_label(path)


# -- Cityscapes-Panoptic-Parts ---------------------------------------------------------------------------------
HUMAN_PARTS = ["torso", "head", "arm", "leg"]
VEHICLE_PARTS = ["window", "wheel", "light", "license plate", "chassis"]
CITYSCAPES_PART_CLASSES = {24: HUMAN_PARTS, 25: HUMAN_PARTS, 26: VEHICLE_PARTS, 27: VEHICLE_PARTS, 28: VEHICLE_PARTS}


class _UidCache:
    """Keeps the last decoded uid map so that label and parts of one item are read once."""

    def __init__(self) -> None:
        self.key: Path | None = None
        self.value: tuple[np.ndarray, np.ndarray] | None = None

    def get(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if self.key != path or self.value is None:
            sids, _, pids = decode_uids(_read_uids(path))
            self.key, self.value = path, (sids, pids)
        return self.value


@register_dataset("cityscapes_panoptic_parts")
class CityscapesPanopticPartsDataset(SegmentationDataset):
    """Cityscapes images with semantic labels and part ids from the panoptic-parts TIFFs (19 classes)."""

    has_parts = True

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        transform: Any = None,
        seed: int = 0,
        parts_dir: str = "gtFinePanopticParts",
    ) -> None:
        root = Path(root)
        part_root = root / parts_dir / split
        if not part_root.is_dir():
            raise FileNotFoundError(
                f"{part_root}: Cityscapes-Panoptic-Parts folder does not exist; expected "
                f"<root>/{parts_dir}/{split}/<city>/*_gtFinePanopticParts.tif"
            )
        samples = []
        for name, img in cityscapes_images(root, split):
            tif = part_root / img.parent.name / f"{name}_gtFinePanopticParts.tif"
            if tif.is_file():
                samples.append(SampleRecord(name, img, tif))
        if not samples:
            raise FileNotFoundError(
                f"{part_root}: no *_gtFinePanopticParts.tif matches an image of {root / 'leftImg8bit' / split}"
            )
        self.root, self.split = root, split
        self._lut = np.full(100, 255, dtype=np.int64)
        for k, v in LABEL_TO_TRAIN_ID.items():
            self._lut[k] = v
        self._nparts = np.zeros(100, dtype=np.int64)
        part_names = {}
        for sid, names in CITYSCAPES_PART_CLASSES.items():
            self._nparts[sid] = len(names)
            part_names[LABEL_TO_TRAIN_ID[sid]] = list(names)
        self._cache = _UidCache()
        super().__init__(
            cityscapes_info("cityscapes_panoptic_parts", part_names), samples, transform=transform, seed=seed
        )

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        sids, _ = self._cache.get(rec.label)
        return read_image(rec.image), np.where(sids >= 0, self._lut[np.clip(sids, 0, 99)], 255)

    def _read_parts(self, index: int) -> np.ndarray:
        rec = self.samples[index]
        assert rec.label is not None
        sids, pids = self._cache.get(rec.label)
        n = np.where(sids >= 0, self._nparts[np.clip(sids, 0, 99)], 0)
        return np.where((pids >= 1) & (pids <= n), pids, 0)


# -- Pascal-Panoptic-Parts -------------------------------------------------------------------------------------
def _r(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


_BUS_CAR = [
    ("frontside", [1]),
    ("leftside", [2]),
    ("rightside", [3]),
    ("backside", [4]),
    ("roofside", [5]),
    ("leftmirror", [6]),
    ("rightmirror", [7]),
    ("fliplate", [8]),
    ("bliplate", [9]),
    ("door", _r(10, 19)),
    ("wheel", _r(20, 29)),
    ("headlight", _r(30, 39)),
    ("window", _r(40, 59)),
]
_CAT = [
    "head",
    "leye",
    "reye",
    "lear",
    "rear",
    "nose",
    "torso",
    "neck",
    "lfleg",
    "lfpa",
    "rfleg",
    "rfpa",
    "lbleg",
    "lbpa",
    "rbleg",
    "rbpa",
    "tail",
]
_COW = [
    "head",
    "leye",
    "reye",
    "lear",
    "rear",
    "muzzle",
    "lhorn",
    "rhorn",
    "torso",
    "neck",
    "lfuleg",
    "lflleg",
    "rfuleg",
    "rflleg",
    "lbuleg",
    "lblleg",
    "rbuleg",
    "rblleg",
    "tail",
]


def _simple(names: list[str]) -> list[tuple[str, list[int]]]:
    return [(n, [i + 1]) for i, n in enumerate(names)]


# PASCAL-Part part ids as stored in PPP (pid), grouped by part name; the position in each list (1-based) is the
# folded part id. Classes without parts (boat, chair, table, sofa) are absent.
PASCAL_PARTS: dict[str, list[tuple[str, list[int]]]] = {
    "aeroplane": _simple(["body", "stern", "lwing", "rwing", "tail"]) + [("engine", _r(6, 15)), ("wheel", _r(16, 25))],
    "bicycle": _simple(["fwheel", "bwheel", "saddle", "handlebar", "chainwheel"]) + [("headlight", _r(6, 15))],
    "bird": _simple(
        ["head", "leye", "reye", "beak", "torso", "neck", "lwing", "rwing", "lleg", "lfoot", "rleg", "rfoot", "tail"]
    ),
    "bottle": _simple(["cap", "body"]),
    "bus": _BUS_CAR,
    "car": _BUS_CAR,
    "cat": _simple(_CAT),
    "cow": _simple(_COW),
    "dog": _simple(_CAT + ["muzzle"]),
    "horse": _simple(
        [
            "head",
            "leye",
            "reye",
            "lear",
            "rear",
            "muzzle",
            "lfho",
            "rfho",
            "lbho",
            "rbho",
            "torso",
            "neck",
            "lfuleg",
            "lflleg",
            "rfuleg",
            "rflleg",
            "lbuleg",
            "lblleg",
            "rbuleg",
            "rblleg",
            "tail",
        ]
    ),
    "motorbike": _simple(["fwheel", "bwheel", "handlebar", "saddle"]) + [("headlight", _r(5, 14))],
    "person": _simple(
        [
            "head",
            "leye",
            "reye",
            "lear",
            "rear",
            "lebrow",
            "rebrow",
            "nose",
            "mouth",
            "hair",
            "torso",
            "neck",
            "llarm",
            "luarm",
            "lhand",
            "rlarm",
            "ruarm",
            "rhand",
            "llleg",
            "luleg",
            "lfoot",
            "rlleg",
            "ruleg",
            "rfoot",
        ]
    ),
    "pottedplant": _simple(["pot", "plant"]),
    "sheep": _simple(_COW),
    "train": _simple(["head", "hfrontside", "hleftside", "hrightside", "hbackside", "hroofside"])
    + [
        ("headlight", _r(7, 16)),
        ("coach", _r(17, 26)),
        ("cfrontside", _r(27, 36)),
        ("cleftside", _r(37, 46)),
        ("crightside", _r(47, 56)),
        ("cbackside", _r(57, 66)),
        ("croofside", _r(67, 76)),
    ],
    "tvmonitor": _simple(["screen"]),
}


def pascal_part_table(spec_path: str | Path | None = None) -> tuple[dict[int, list[str]], np.ndarray]:
    """(part names per VOC class index, fold table (21, 100): raw PPP pid -> folded part id, 0 = none)."""
    table = PASCAL_PARTS if spec_path is None else _read_parts_spec(Path(spec_path))
    fold = np.zeros((len(VOC_CLASSES), 100), dtype=np.int64)
    names: dict[int, list[str]] = {}
    for c, cls in enumerate(VOC_CLASSES):
        parts = table.get(cls) or table.get("table" if cls == "diningtable" else cls) or []
        if not parts:
            continue
        names[c] = [p for p, _ in parts]
        for j, (_, raw) in enumerate(parts, start=1):
            for pid in raw:
                if 0 < pid < 100:
                    fold[c, pid] = j
    return names, fold


def _read_parts_spec(path: Path) -> dict[str, list[tuple[str, list[int]]]]:
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: parts spec does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    classes = (spec or {}).get("scene_class2part_classes") if isinstance(spec, dict) else None
    if not isinstance(classes, dict):
        raise ValueError(f"{path}: no 'scene_class2part_classes' mapping; expected a panoptic_parts dataset spec")
    groups = spec.get("countable_pids_groupings") or {}
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for cls, parts in classes.items():
        parts = list(parts or [])
        cls_groups = groups.get(cls) or {}
        out[str(cls)] = [(str(p), [int(x) for x in cls_groups.get(p, [j])]) for j, p in enumerate(parts, start=1)]
    return out


@register_dataset("pascal_panoptic_parts")
class PascalPanopticPartsDataset(SegmentationDataset):
    """VOC 2012 images and labels (21 classes) with part ids from Pascal-Panoptic-Parts (option ``parts_root``)."""

    has_parts = True

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        transform: Any = None,
        seed: int = 0,
        parts_root: str | Path = "",
        parts_spec: str | Path | None = None,
    ) -> None:
        voc = find_voc_root(root)
        if not parts_root:
            raise ValueError(
                "data.options.parts_root is empty; expected the Pascal-Panoptic-Parts labels folder "
                "(with training/ and validation/ *.tif)"
            )
        proot = Path(parts_root)
        if not proot.is_dir():
            raise FileNotFoundError(f"{proot}: Pascal-Panoptic-Parts folder does not exist")
        tifs = {p.stem: p for p in sorted(proot.rglob("*")) if p.suffix.lower() in TIFF_SUFFIXES}
        lst = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        samples = [
            SampleRecord(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png", {"parts": tifs[i]})
            for i in read_id_list(lst)
            if i in tifs
        ]
        if not samples:
            raise FileNotFoundError(f"{proot}: no PPP .tif file matches an image of {lst}")
        names, self._fold = pascal_part_table(parts_spec)
        self.root, self.split, self.parts_root = voc, split, proot
        info = voc_info("pascal_panoptic_parts")
        from dataclasses import replace

        super().__init__(replace(info, part_names=names), samples, transform=transform, seed=seed)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        return read_image(rec.image), read_label(rec.label)

    def _read_parts(self, index: int) -> np.ndarray:
        rec = self.samples[index]
        assert rec.label is not None
        tif = rec.extra["parts"]
        sids, _, pids = decode_uids(_read_uids(tif))
        label = read_label(rec.label)
        if sids.shape != label.shape:
            raise ValueError(
                f"{tif}: part map size {sids.shape[::-1]} differs from label size {label.shape[::-1]} "
                f"({rec.label}); expected equal sizes"
            )
        valid = (sids >= 1) & (sids < len(VOC_CLASSES)) & (sids == label) & (pids >= 1)
        return np.where(valid, self._fold[np.clip(sids, 0, len(VOC_CLASSES) - 1), np.clip(pids, 0, 99)], 0)
