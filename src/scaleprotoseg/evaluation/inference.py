"""Full-resolution prediction: whole image, sliding window, short-side or fixed-size resize, multi-scale inputs and
flip.

The model contract is ``model(x) -> out`` with ``out.logits`` of shape (B, C, h, w) on the feature grid (h = H/8 for
DeepLab); a model with a ``logits(x)`` method (:class:`~scaleprotoseg.models.segmenter.Segmenter`) is called through
it instead, which returns the same scores without computing the maps that explanations need. Logits are always
brought to the label size by bilinear upsampling with align_corners=False, as in the release's evaluation (training
instead downsamples the labels). Test-time protocols of supplement 6: Pascal VOC images resized to 513x513 (``fixed``;
the release resizes the image and upsamples the logits to the label's own size) with multi-scale inputs
{0.5, 0.75, 1} fused by max; Cityscapes at 1024x2048 (whole, or sliding windows); ADE20K with the short side resized
to 512."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaleprotoseg.models.heads import ModelOutput
from scaleprotoseg.models.segmenter import MSC_FUSIONS, MscFusion, Segmenter, unwrap
from scaleprotoseg.ops import resize_image, upsample_logits

if TYPE_CHECKING:
    from scaleprotoseg.config import DataConfig

__all__ = ["MODES", "InferenceSettings", "predict_logits", "sliding_window_starts"]

MODES = ("whole", "sliding", "short_side", "fixed")
Mode = Literal["whole", "sliding", "short_side", "fixed"]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InferenceSettings:
    """How a model is run on whole images (the test protocol of supplement 6), in one record: built from a config
    with :meth:`from_config` and passed whole to validation, ``evaluate``, ``predict``, the report and the analyses.
    The fields are :func:`predict_logits`'s arguments of the same names."""

    mode: Mode = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    test_size: int = 0
    msc_scales: tuple[float, ...] = ()
    msc_fusion: MscFusion = "features"
    flip: bool = False
    tile_batch_size: int = 4

    @classmethod
    def from_config(cls, data: DataConfig, **changes: Any) -> InferenceSettings:
        """The settings of ``data`` (``test_mode``, ``crop_size``, ``test_size``, ``msc_scales``, ``msc_fusion``; no
        flip), with ``changes`` (e.g. command-line options) applied on top."""
        base = cls(
            mode=data.test_mode,
            crop_size=(int(data.crop_size[0]), int(data.crop_size[1])),
            test_size=int(data.test_size),
            msc_scales=tuple(float(s) for s in data.msc_scales),
            msc_fusion=data.msc_fusion,
        )
        return cls(**{**base.__dict__, **changes})

    def logits(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """:func:`predict_logits` with these settings."""
        return predict_logits(
            model,
            image,
            mode=self.mode,
            crop_size=self.crop_size,
            stride=self.stride,
            test_size=self.test_size,
            msc_scales=self.msc_scales,
            msc_fusion=self.msc_fusion,
            flip=self.flip,
            tile_batch_size=self.tile_batch_size,
        )


def _logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Segmenter.logits skips the intermediate maps; any other model is called and its output read
    out: Any = model.logits(x) if isinstance(model, Segmenter) else model(x)
    logits: Any
    if isinstance(out, torch.Tensor):
        logits = out
    elif isinstance(out, Mapping):
        logits = out.get("logits")
    elif isinstance(out, ModelOutput):
        logits = out.logits
    else:
        logits = None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[0] != x.shape[0]:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f"model output logits: got {shape}; expected a (B={x.shape[0]}, C, h, w) tensor in out.logits")
    return logits.float()


def _scaled(length: int, factor: float) -> int:
    """Side length after scaling, rounded half up (not Python's half-to-even), at least 1."""
    return max(1, math.floor(length * factor + 0.5))


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name}: got {value}; expected a positive int or (height, width) of positive ints")
    return pair  # type: ignore[return-value]


def sliding_window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``window`` covering ``[0, length)`` with step ``stride``.

    The last window is aligned to the end, so every pixel is covered; ``length <= window`` gives one window at 0.
    """
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def _predict_whole(logits_of: LogitsFn, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    return upsample_logits(logits_of(x), out_size)


def _predict_sliding(
    logits_of: LogitsFn,
    x: torch.Tensor,
    out_size: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    tile_batch_size: int,
) -> torch.Tensor:
    """Average the logits of overlapping windows; images smaller than the window are zero-padded (the mean colour
    after normalisation) at the bottom/right and the padding is cropped off again."""
    b, _, h, w = x.shape
    wh, ww = window
    ph, pw = max(h, wh), max(w, ww)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h))
    boxes = [(t, l) for t in sliding_window_starts(ph, wh, stride[0]) for l in sliding_window_starts(pw, ww, stride[1])]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=x.device, dtype=torch.float32)
    per_chunk = max(1, tile_batch_size // b)  # tiles of all B images in one forward pass, at most ~tile_batch_size
    for i in range(0, len(boxes), per_chunk):
        chunk = boxes[i : i + per_chunk]
        tiles = torch.cat([x[:, :, t : t + wh, l : l + ww] for t, l in chunk], dim=0)  # (len(chunk) * B, 3, wh, ww)
        logits = upsample_logits(logits_of(tiles), (wh, ww))
        if total is None:
            total = torch.zeros(b, logits.shape[1], ph, pw, device=x.device, dtype=torch.float32)
        for k, (t, l) in enumerate(chunk):
            total[:, :, t : t + wh, l : l + ww] += logits[k * b : (k + 1) * b]
            count[:, :, t : t + wh, l : l + ww] += 1
    assert total is not None
    total = (total / count)[:, :, :h, :w]
    return upsample_logits(total, out_size)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    mode: Mode = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    test_size: int = 0,
    msc_scales: Sequence[float] = (),
    msc_fusion: MscFusion = "features",
    flip: bool = False,
    tile_batch_size: int = 4,
) -> torch.Tensor:
    """Logits (B, C, H, W) at the resolution of ``image`` (B, 3, H, W), float32.

    Args:
        model: any module with ``model(x).logits`` (B, C, h, w); put it in eval mode and on ``image.device`` first.
        mode: ``whole`` (full image, logits upsampled bilinearly); ``sliding`` (overlapping windows, logits averaged);
            ``short_side`` (image resized so its short side is ``test_size``, predicted whole, logits resized back);
            ``fixed`` (image resized to ``test_size`` x ``test_size`` whatever its aspect ratio, predicted whole,
            logits resized back to the image's own size: the release's Pascal VOC protocol at 513).
        crop_size: sliding window (height, width) when ``test_size`` is 0 (as in ``data.test_size``).
        stride: sliding step (height, width); default 2/3 of the window, rounded up.
        test_size: short side for ``short_side``; square side for ``fixed``; square window side for ``sliding`` when
            > 0.
        msc_scales: multi-scale inputs: the image (after the mode's own resize, each window in ``sliding``) is run at
            each scale and the results fused by elementwise max. Empty: single scale.
        msc_fusion: ``features`` (the release): the ASPP outputs of the scales are max-fused on the largest scale's
            grid and the head runs once on them (``model`` must be a
            :class:`~scaleprotoseg.models.segmenter.Segmenter`); ``logits``: each scale's logits are resized to
            (H, W) and max-fused (DeepLab's MSC; any model).
        flip: average with the horizontally flipped prediction (applied outermost, around MSC).
        tile_batch_size: at most this many windows (across the batch) per forward pass in ``sliding`` mode.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: got {shape}; expected a (B, 3, H, W) tensor")
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; expected one of {', '.join(MODES)}")
    scales = tuple(float(s) for s in msc_scales) or (1.0,)
    if min(scales) <= 0:
        raise ValueError(f"msc_scales: got {tuple(msc_scales)}; expected positive scale factors")
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size: got {tile_batch_size}; expected >= 1")
    if msc_fusion not in MSC_FUSIONS:
        raise ValueError(f"msc_fusion: got {msc_fusion!r}; expected one of {', '.join(MSC_FUSIONS)}")
    h, w = image.shape[-2:]
    out_size = (int(h), int(w))

    base = (1.0, 1.0)  # resize factors (height, width) of the mode
    window = step = (0, 0)
    if mode == "short_side":
        if test_size <= 0:
            raise ValueError(f"test_size: got {test_size}; expected the positive short side for mode 'short_side'")
        base = (test_size / min(h, w),) * 2
    elif mode == "fixed":
        if test_size <= 0:
            raise ValueError(f"test_size: got {test_size}; expected the positive side of the square for mode 'fixed'")
        base = (test_size / h, test_size / w)
    elif mode == "sliding":
        if test_size > 0:
            window = (int(test_size), int(test_size))
        elif crop_size is not None:
            window = _pair(crop_size, "crop_size")
        else:
            raise ValueError("sliding mode: got neither crop_size nor test_size > 0; expected the window size")
        step = (
            _pair(stride, "stride")
            if stride is not None
            else (math.ceil(window[0] * 2 / 3), math.ceil(window[1] * 2 / 3))
        )

    def run(logits_of: LogitsFn, x: torch.Tensor, s: float) -> torch.Tensor:
        xs = resize_image(x, (_scaled(h, base[0] * s), _scaled(w, base[1] * s)))
        if mode == "sliding":
            return _predict_sliding(logits_of, xs, out_size, window, step, tile_batch_size)
        return _predict_whole(logits_of, xs, out_size)

    if msc_fusion == "features" and scales != (1.0,):
        segmenter = unwrap(model)
        if not isinstance(segmenter, Segmenter):
            raise ValueError(
                f"msc_fusion 'features': got a {type(segmenter).__name__}; expected a Segmenter (whose ASPP outputs "
                "can be fused), or msc_fusion 'logits'"
            )
        relative = tuple(s / max(scales) for s in scales)  # the mode's resize at the largest scale, then the others

        def single(x: torch.Tensor) -> torch.Tensor:
            return run(lambda t: segmenter.msc_logits(t, relative).float(), x, max(scales))

    else:

        def single(x: torch.Tensor) -> torch.Tensor:
            fused: torch.Tensor | None = None
            for s in scales:
                logits = run(lambda t: _logits_of(model, t), x, s)
                fused = logits if fused is None else torch.maximum(fused, logits)
            assert fused is not None
            return fused

    logits = single(image)
    if flip:
        logits = 0.5 * (logits + single(image.flip(-1)).flip(-1))
    return logits
