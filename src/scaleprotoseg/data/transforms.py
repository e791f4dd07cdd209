"""Joint image / label transforms, deterministic under a seed.

Every op receives a :class:`Pair` (image float32 (3, H, W), label int64 (H, W), extra label-like maps such as
``parts``) and a ``numpy.random.Generator``; datasets seed that generator from (seed, epoch, index), so the result of
an item does not depend on which DataLoader worker computes it or how many workers there are.

Training (:class:`TrainTransform`): random scale (bilinear image, nearest labels) -> normalise -> pad to the crop
size (image with 0, i.e. the mean after normalisation; labels with the ignore index; part maps with 0) -> random
crop -> random horizontal flip. Evaluation (:class:`EvalTransform`): normalise the whole image; optionally resize
the image so its short side is ``short_side`` (labels stay at the original size for scoring).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from scaleprotoseg.config import IMAGENET_MEAN, IMAGENET_STD
from scaleprotoseg.ops import resize_image, resize_labels

NORMALIZATIONS = ("imagenet", "tf")


@dataclass
class Pair:
    """An image with its aligned label maps; ``fills`` gives each extra map's padding value."""

    image: torch.Tensor
    label: torch.Tensor
    ignore_index: int = 255
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    fills: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def maps(self) -> dict[str, tuple[torch.Tensor, int]]:
        out = {"label": (self.label, self.ignore_index)}
        out.update({k: (v, self.fills.get(k, 0)) for k, v in self.extras.items()})
        return out

    def replace_maps(self, maps: dict[str, torch.Tensor]) -> None:
        self.label = maps.pop("label")
        self.extras.update(maps)


class Op(Protocol):
    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair: ...


class Transform(Protocol):
    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        *,
        rng: np.random.Generator,
        extras: dict[str, np.ndarray] | None = None,
        ignore_index: int = 255,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


def normalization_stats(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (3, 1, 1) tensors on the 0..255 scale: ImageNet, or 127 / 128 for ``tf``."""
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN) * 255.0
        std = torch.tensor(IMAGENET_STD) * 255.0
    elif mode == "tf":
        mean, std = torch.full((3,), 127.0), torch.full((3,), 128.0)
    else:
        raise ValueError(f"normalization: {mode!r} is not known; expected one of {', '.join(NORMALIZATIONS)}")
    return mean.view(3, 1, 1), std.view(3, 1, 1)


def normalize(image: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """0..255 float image(s) (..., 3, H, W) -> normalised."""
    mean, std = normalization_stats(mode)
    return (image - mean.to(image)) / std.to(image)


def denormalize(image: torch.Tensor, mode: str = "imagenet") -> np.ndarray:
    """Normalised (3, H, W) tensor -> uint8 (H, W, 3) numpy image (for display)."""
    mean, std = normalization_stats(mode)
    x = image.detach().float().cpu() * std + mean
    return x.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


@dataclass
class Normalize:
    mode: str = "imagenet"

    def __post_init__(self) -> None:
        normalization_stats(self.mode)  # validates

    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair:
        pair.image = normalize(pair.image, self.mode)
        return pair


# ---------------------------------------------------------------------------------------------------------------
# Geometric ops


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one (3, H, W) image, computed in float64 so that the float32 result is the same whatever
    the number of threads (float32 kernels round differently per thread count)."""
    return resize_image(image[None].double(), size)[0].to(image.dtype)


def _resize_pair(pair: Pair, size: tuple[int, int]) -> Pair:
    if size == pair.size:
        return pair
    pair.image = _resize_image(pair.image, size)
    pair.replace_maps({k: resize_labels(v, size) for k, (v, _) in pair.maps().items()})
    return pair


@dataclass
class RandomScale:
    """Resize by a factor drawn uniformly from [low, high] (bilinear image, nearest labels)."""

    low: float = 0.5
    high: float = 1.5

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"scale range [{self.low}, {self.high}] is not valid; expected 0 < low <= high")

    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair:
        s = float(rng.uniform(self.low, self.high)) if self.high > self.low else self.low
        h, w = pair.size
        return _resize_pair(pair, (max(1, round(h * s)), max(1, round(w * s))))


@dataclass
class ResizeShortSide:
    """Resize the image (not the labels) so that its short side is ``size``, keeping the aspect ratio."""

    size: int

    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair:
        if self.size <= 0:
            return pair
        h, w = pair.size
        s = self.size / min(h, w)
        new = (max(1, round(h * s)), max(1, round(w * s)))
        if new != (h, w):
            pair.image = _resize_image(pair.image, new)
        return pair


@dataclass
class PadToSize:
    """Pad at the bottom / right to at least ``size`` (H, W): image with ``image_fill``, labels with their fill."""

    size: tuple[int, int]
    image_fill: float = 0.0

    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair:
        h, w = pair.size
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph == 0 and pw == 0:
            return pair
        pad = (0, pw, 0, ph)
        pair.image = torch.nn.functional.pad(pair.image, pad, value=self.image_fill)
        pair.replace_maps({k: torch.nn.functional.pad(v, pad, value=fill) for k, (v, fill) in pair.maps().items()})
        return pair


@dataclass
class RandomCrop:
    """Crop a random window of ``size`` (H, W); the pair must be at least that large (pad first)."""

    size: tuple[int, int]

    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair:
        h, w = pair.size
        ch, cw = self.size
        if h < ch or w < cw:
            raise ValueError(f"random crop: image {h}x{w} is smaller than the crop {ch}x{cw}; pad it first")
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        pair.image = pair.image[:, top : top + ch, left : left + cw]
        pair.replace_maps({k: v[top : top + ch, left : left + cw] for k, (v, _) in pair.maps().items()})
        return pair


@dataclass
class RandomHorizontalFlip:
    p: float = 0.5

    def __call__(self, pair: Pair, rng: np.random.Generator) -> Pair:
        if float(rng.random()) < self.p:
            pair.image = pair.image.flip(-1)
            pair.replace_maps({k: v.flip(-1) for k, (v, _) in pair.maps().items()})
        return pair


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


def _to_pair(image: np.ndarray, label: np.ndarray, extras: dict[str, np.ndarray] | None, ignore_index: int) -> Pair:
    img = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))).float()
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    ext = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in (extras or {}).items()}
    return Pair(img, lab, ignore_index, ext, {k: 0 for k in ext})


class Compose:
    """Run ops in order on a numpy image / label; returns (image, label, extras) tensors, all contiguous."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = list(ops)

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        *,
        rng: np.random.Generator | None = None,
        extras: dict[str, np.ndarray] | None = None,
        ignore_index: int = 255,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        rng = rng if rng is not None else np.random.default_rng(0)
        pair = _to_pair(image, label, extras, ignore_index)
        for op in self.ops:
            pair = op(pair, rng)
        return (pair.image.contiguous(), pair.label.contiguous(), {k: v.contiguous() for k, v in pair.extras.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ops})"


class TrainTransform(Compose):
    """Random scale, normalise, pad (ignore label), random crop, flip."""

    def __init__(
        self,
        crop_size: Sequence[int] = (321, 321),
        scale_range: Sequence[float] = (0.5, 1.5),
        flip: bool = True,
        normalization: str = "imagenet",
    ) -> None:
        crop = (int(crop_size[0]), int(crop_size[1]))
        if min(crop) <= 0:
            raise ValueError(f"crop size {list(crop_size)} is not valid; expected [height, width] > 0")
        ops: list[Op] = [
            RandomScale(float(scale_range[0]), float(scale_range[1])),
            Normalize(normalization),
            PadToSize(crop),
            RandomCrop(crop),
        ]
        if flip:
            ops.append(RandomHorizontalFlip())
        super().__init__(ops)


class EvalTransform(Compose):
    """Normalise the whole image; ``short_side > 0`` also resizes the image (labels keep the original size)."""

    def __init__(self, normalization: str = "imagenet", short_side: int = 0) -> None:
        ops: list[Op] = [Normalize(normalization)]
        if short_side > 0:
            ops.insert(0, ResizeShortSide(int(short_side)))
        super().__init__(ops)


def build_transform(data_cfg, *, train: bool) -> Compose:  # data_cfg: scaleprotoseg.config.DataConfig
    """The training or evaluation transform a :class:`~scaleprotoseg.config.DataConfig` asks for.

    Evaluation images keep their size: the test-time modes (``short_side``, ``sliding``) are applied by
    ``scaleprotoseg.evaluation.inference.predict_logits``, which needs labels and images of equal size.
    """
    if train:
        return TrainTransform(data_cfg.crop_size, data_cfg.scale_range, data_cfg.flip, data_cfg.normalization)
    return EvalTransform(data_cfg.normalization)


# ---------------------------------------------------------------------------------------------------------------
# DataLoader helpers


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: seed Python's and NumPy's global generators from the torch worker seed.

    The dataset's own augmentations do not use these generators (they are seeded per sample), but third-party code
    running inside workers then stays reproducible too.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for DataLoader shuffling / worker seeds."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g
