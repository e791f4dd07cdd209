"""Pascal VOC 2012 with the SBD augmented training set (``train_aug``, 10,582 images).

Layout (``data.root`` may be ``VOC2012`` itself or a folder holding ``VOCdevkit/VOC2012`` or ``VOC2012``)::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png          # palette PNGs: 0..20, 255 on object borders / void
    VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    VOC2012/SegmentationClassAug/<id>.png       # written once by prepare_sbd()
    VOC2012/ImageSets/SegmentationAug/train_aug.txt

:func:`prepare_sbd` converts SBD's ``cls/<id>.mat`` (struct ``GTcls`` with field ``Segmentation``) to index PNGs
and writes the standard list: train_aug = (SBD train + SBD val + VOC train) - VOC val. Images in SBD get the SBD
label; the others (VOC train images missing from SBD) get their VOC label.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.data.base import DatasetInfo, SampleRecord, SegmentationDataset
from scaleprotoseg.data.io import read_image, read_label, voc_colormap, write_index_png
from scaleprotoseg.data.registry import register_dataset

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
AUG_LABEL_DIR = "SegmentationClassAug"
AUG_LIST = "ImageSets/SegmentationAug/train_aug.txt"


def voc_info(name: str = "pascal_voc") -> DatasetInfo:
    return DatasetInfo(name, list(VOC_CLASSES), voc_colormap(21), 255)


def find_voc_root(root: str | Path) -> Path:
    """The ``VOC2012`` folder at or under ``root`` (one with JPEGImages)."""
    root = Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(
        f"{root}: no Pascal VOC 2012 folder found; expected JPEGImages/ in it, in VOC2012/ or in VOCdevkit/VOC2012/"
    )


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file; lines like ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` give ``x``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image list does not exist")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(Path(line.split()[0]).stem)
    return ids


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """Class labels (H, W) int64 from an SBD ``cls/<id>.mat`` file (struct ``GTcls``, field ``Segmentation``)."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file does not exist") from None
    except Exception as err:
        raise ValueError(f"{path}: unreadable .mat file ({type(err).__name__}: {err})") from None
    if "GTcls" not in mat:
        raise ValueError(
            f"{path}: no 'GTcls' struct (keys: {sorted(k for k in mat if not k.startswith('__'))}); "
            "expected an SBD cls/*.mat file"
        )
    seg = getattr(mat["GTcls"], "Segmentation", None)
    if seg is None:
        raise ValueError(f"{path}: GTcls has no 'Segmentation' field; expected an SBD cls/*.mat file")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"{path}: GTcls.Segmentation has shape {seg.shape}; expected a 2-D label map")
    return seg.astype(np.int64)


def _find_sbd_root(sbd_root: Path) -> Path:
    for cand in (sbd_root, sbd_root / "dataset", sbd_root / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir():
            return cand
    raise FileNotFoundError(
        f"{sbd_root}: no SBD folder found; expected cls/ in it, in dataset/ or in benchmark_RELEASE/dataset/"
    )


def train_aug_ids(
    sbd_train: Iterable[str], sbd_val: Iterable[str], voc_train: Iterable[str], voc_val: Iterable[str]
) -> list[str]:
    """The standard augmented training list: (SBD train + SBD val + VOC train) - VOC val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def prepare_sbd(
    sbd_root: str | Path, voc_root: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, int]:
    """Write ``SegmentationClassAug/*.png`` and ``ImageSets/SegmentationAug/train_aug.txt`` into the VOC folder.

    Existing PNGs are kept unless ``overwrite``. Returns counts: ``train_aug`` (10,582 for the official data),
    ``from_sbd``, ``from_voc``, ``written``.
    """
    from tqdm import tqdm

    sbd = _find_sbd_root(Path(sbd_root))
    voc = find_voc_root(voc_root)
    seg_sets = voc / "ImageSets" / "Segmentation"
    ids = train_aug_ids(
        read_id_list(sbd / "train.txt"),
        read_id_list(sbd / "val.txt"),
        read_id_list(seg_sets / "train.txt"),
        read_id_list(seg_sets / "val.txt"),
    )
    out_dir = voc / AUG_LABEL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = voc_colormap(256)
    counts = {"train_aug": len(ids), "from_sbd": 0, "from_voc": 0, "written": 0}
    for image_id in tqdm(ids, desc="SBD -> PNG", disable=None if progress else True, dynamic_ncols=True):
        mat = sbd / "cls" / f"{image_id}.mat"
        source = "from_sbd" if mat.is_file() else "from_voc"
        counts[source] += 1
        out = out_dir / f"{image_id}.png"
        if out.is_file() and not overwrite:
            continue
        if source == "from_sbd":
            label = read_sbd_mat(mat)
        else:
            voc_png = voc / "SegmentationClass" / f"{image_id}.png"
            if not voc_png.is_file():
                raise FileNotFoundError(
                    f"{voc_png}: image {image_id} is in train_aug but has neither an SBD label ({mat}) nor a VOC label"
                )
            label = read_label(voc_png)
        write_index_png(out, label, palette)
        counts["written"] += 1
    lst = voc / AUG_LIST
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("".join(f"{i}\n" for i in ids))
    return counts


@register_dataset("pascal_voc")
class PascalVOCDataset(SegmentationDataset):
    """Pascal VOC 2012, 21 classes. Splits: ``train_aug`` (SBD-augmented; run :func:`prepare_sbd` once), ``train``,
    ``val``, ``trainval`` (``ImageSets/Segmentation``). Options: ``aug_label_dir``, ``aug_list``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train_aug",
        *,
        transform: Any = None,
        seed: int = 0,
        aug_label_dir: str = AUG_LABEL_DIR,
        aug_list: str = AUG_LIST,
    ) -> None:
        voc = find_voc_root(root)
        if split.endswith("_aug"):
            lst = voc / aug_list if split == "train_aug" else voc / "ImageSets" / "SegmentationAug" / f"{split}.txt"
            if not lst.is_file():
                raise FileNotFoundError(
                    f"{lst}: the {split} list does not exist; run `scaleprotoseg data prepare-voc "
                    f"--voc {voc} --sbd <benchmark_RELEASE>` once to convert SBD"
                )
            label_dir = voc / aug_label_dir
        else:
            lst = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not lst.is_file():
                raise FileNotFoundError(
                    f"{lst}: split {split!r} does not exist; expected train_aug, train, val or trainval"
                )
            label_dir = voc / "SegmentationClass"
        samples = [SampleRecord(i, voc / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png") for i in read_id_list(lst)]
        self.root, self.split = voc, split
        super().__init__(voc_info(), samples, transform=transform, seed=seed)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.samples[index]
        assert rec.label is not None
        return read_image(rec.image), read_label(rec.label)
