"""DeepLabv2 ResNet backbones (``resnet101``, ``resnet50``, ``resnet18``).

Layout (DeepLab / caffe "MSRA" ResNet): stem conv 7x7/2 (no bias) + BN + ReLU + max-pool 3x3/2 with ``ceil_mode=True``;
four residual stages. In a bottleneck the stride sits on the FIRST 1x1 conv (``stride_in_1x1=True``, as in the caffe
models; torchvision's ResNet v1.5 puts it on the 3x3). Output stride 8: ``layer3`` stride 1 dilation 2, ``layer4``
stride 1 dilation 4; output stride 16: ``layer4`` stride 1 dilation 2; output stride 32: no dilation. Every block of a
dilated stage uses the stage's dilation. 513x513 -> 65x65 and 321x321 -> 41x41 at output stride 8.

Module names follow torchvision: ``conv1, bn1, layer1..layer4``; blocks ``conv1, bn1, conv2, bn2[, conv3, bn3]`` and
``downsample.0`` (1x1 conv), ``downsample.1`` (BN). Hence:

* torchvision ImageNet state dict -> ours: identity; ``fc.weight``/``fc.bias`` are dropped
  (:func:`load_torchvision_resnet`). torchvision's weights were trained with the stride on the 3x3 conv; the
  ScaleProtoSeg release nevertheless loads them into the DeepLab layout, which is our default.
* kazuto1011/deeplab-pytorch caffe-converted checkpoints -> ours (:func:`load_deeplab_caffe_resnet`), after removing an
  optional ``base.`` prefix (MSC wrapper)::

      layer1.conv1.conv.weight               -> conv1.weight
      layer1.conv1.bn.{p}                    -> bn1.{p}
      layer{L}.block{i}.reduce.{conv,bn}     -> layer{L-1}.{i-1}.{conv1,bn1}
      layer{L}.block{i}.conv3x3.{conv,bn}    -> layer{L-1}.{i-1}.{conv2,bn2}
      layer{L}.block{i}.increase.{conv,bn}   -> layer{L-1}.{i-1}.{conv3,bn3}
      layer{L}.block{i}.shortcut.{conv,bn}   -> layer{L-1}.{i-1}.downsample.{0,1}   (older releases: ``proj``)

  for L = 2..5, i = 1..n. ASPP (``aspp.*``) and ``fc*`` tensors are not backbone weights and are returned separately.
  The caffe models expect BGR input in 0..255 minus the mean (104.008, 116.669, 122.675); pass
  ``input_transform="caffe"`` to convert ImageNet mean/std normalised RGB input to that form inside the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .registry import Backbone, register_backbone
from .weights import load_checked, read_state_dict

__all__ = [
    "DeepLabResNet",
    "deeplab_caffe_key_to_ours",
    "load_deeplab_caffe_resnet",
    "load_resnet_weights",
    "load_torchvision_resnet",
    "resnet18",
    "resnet50",
    "resnet101",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (104.008, 116.669, 122.675)

# (stride, dilation) of layer2, layer3, layer4 for each output stride (layer1 has stride 1, dilation 1).
_STAGE_PLAN: dict[int, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    8: ((2, 1), (1, 2), (1, 4)),
    16: ((2, 1), (2, 1), (1, 2)),
    32: ((2, 1), (2, 1), (2, 1)),
}


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False)
    return conv, nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride is on the first."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, dilation: int, stride_in_1x1: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride, dilation)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, 1, dilation)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (dilated), 1x1 expand (x4); stride on the 1x1 (caffe) or on the 3x3 (torchvision v1.5)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int, stride_in_1x1: bool = True) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = _conv_bn(cin, width, 1, s1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, s3, dilation)
        self.conv3, self.bn3 = _conv_bn(width, width * 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


_DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class DeepLabResNet(Backbone):
    """DeepLabv2 ResNet feature extractor (no classifier); see the module docstring for the layout.

    Args:
        depth: 18, 34, 50, 101 or 152.
        output_stride: 8, 16 or 32.
        freeze_bn: keep batch norm in eval mode with frozen affine parameters.
        stride_in_1x1: put a bottleneck's stride on its first 1x1 conv (DeepLab/caffe) instead of the 3x3.
        ceil_mode: ``ceil_mode`` of the stem max-pool (``True`` in DeepLab).
        input_transform: ``"none"`` (input used as given, e.g. ImageNet mean/std normalised RGB for torchvision
            weights) or ``"caffe"`` (ImageNet-normalised RGB is converted to BGR 0..255 minus the caffe mean).
        bn_momentum: batch-norm momentum in PyTorch's convention (default 0.1); only matters with unfrozen BN.
    """

    def __init__(
        self,
        depth: int = 101,
        *,
        output_stride: int = 8,
        freeze_bn: bool = True,
        stride_in_1x1: bool = True,
        ceil_mode: bool = True,
        input_transform: str = "none",
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__(freeze_bn=freeze_bn)
        if depth not in _DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
        if output_stride not in _STAGE_PLAN:
            raise ValueError(f"ResNet output_stride must be one of {sorted(_STAGE_PLAN)}, got {output_stride!r}")
        if input_transform not in ("none", "caffe"):
            raise ValueError(f"input_transform must be 'none' or 'caffe', got {input_transform!r}")
        block, counts = _DEPTHS[depth]
        self.depth = depth
        self.output_stride = output_stride
        self.stride_in_1x1 = stride_in_1x1
        self.input_transform = input_transform
        self.block_type = block

        self.conv1, self.bn1 = _conv_bn(3, 64, 7, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)
        plan = ((1, 1), *_STAGE_PLAN[output_stride])
        cin = 64
        for idx, (n, width, (stride, dilation)) in enumerate(zip(counts, (64, 128, 256, 512), plan), start=1):
            blocks = []
            for i in range(n):
                blocks.append(block(cin, width, stride if i == 0 else 1, dilation, stride_in_1x1))
                cin = width * block.expansion
            self.add_module(f"layer{idx}", nn.Sequential(*blocks))
        self.out_channels = cin

        if input_transform == "caffe":
            # x_bgr255 - mean = scale * x_rgb_normalised[perm] + shift, per output channel (B, G, R).
            std = torch.tensor(_IMAGENET_STD[::-1]) * 255.0
            shift = torch.tensor(_IMAGENET_MEAN[::-1]) * 255.0 - torch.tensor(_CAFFE_BGR_MEAN)
            self.register_buffer("_in_scale", std.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("_in_shift", shift.view(1, 3, 1, 1), persistent=False)

        self._init_weights()
        self.set_bn_momentum(bn_momentum)
        self.set_freeze_bn(freeze_bn)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels, h, w), h = ceil-ish H / output_stride."""
        if self.input_transform == "caffe":
            x = x.flip(1) * self._in_scale + self._in_shift
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


# ---------------------------------------------------------------------------------------------------------------------
# Weight loading

_CAFFE_STEM = re.compile(r"^(?:base\.)?layer1\.conv1\.(conv|bn)\.(\w+)$")
_CAFFE_BLOCK = re.compile(
    r"^(?:base\.)?layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)\.(conv|bn)\.(\w+)$"
)
_CAFFE_EXTRA = re.compile(r"^(?:base\.)?(?:aspp|fc\w*)\.")
_CAFFE_BRANCH = {"reduce": "1", "conv3x3": "2", "increase": "3"}


def deeplab_caffe_key_to_ours(key: str) -> str | None:
    """Our name for a kazuto1011/deeplab-pytorch ResNet key, or ``None`` when it is not a backbone weight."""
    m = _CAFFE_STEM.match(key)
    if m:
        return ("conv1." if m.group(1) == "conv" else "bn1.") + m.group(2)
    m = _CAFFE_BLOCK.match(key)
    if m:
        layer, block, branch, kind, param = m.groups()
        prefix = f"layer{int(layer) - 1}.{int(block) - 1}."
        if branch in ("shortcut", "proj"):
            return prefix + f"downsample.{0 if kind == 'conv' else 1}.{param}"
        return prefix + f"{kind}{_CAFFE_BRANCH[branch]}.{param}"
    return None


def load_torchvision_resnet(model: DeepLabResNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision-format ResNet state dict (or one saved from our own model); ``fc.*`` is ignored.

    Strict: every backbone tensor must be present (batch-norm counters excepted) with the right shape, and no other
    key may appear; otherwise ``ValueError`` lists the keys.
    """
    mapped = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    load_checked(model, mapped, source="torchvision-format ResNet weights")


def load_deeplab_caffe_resnet(model: DeepLabResNet, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load a kazuto1011/deeplab-pytorch caffe-converted ResNet checkpoint (mapping in the module docstring).

    Returns the tensors that are not backbone weights (``aspp.*``, ``fc*``, with their original keys). Strict for the
    backbone: missing or unknown keys raise ``ValueError``.
    """
    if model.block_type is not Bottleneck:
        raise ValueError(f"DeepLab caffe checkpoints hold bottleneck ResNets; resnet{model.depth} uses basic blocks")
    mapped: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        ours = deeplab_caffe_key_to_ours(key)
        if ours is not None:
            mapped[ours] = value
        elif _CAFFE_EXTRA.match(key):
            extras[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"DeepLab caffe checkpoint has keys that are neither backbone nor ASPP/fc: {sorted(unknown)}")
    load_checked(model, mapped, source="DeepLab caffe-converted ResNet weights")
    return extras


def load_resnet_weights(model: DeepLabResNet, path: str) -> dict[str, torch.Tensor]:
    """Read ``path`` and load it with the loader matching its key format; returns ignored non-backbone tensors."""
    state = read_state_dict(path)
    if any(_CAFFE_STEM.match(k) for k in state):
        try:
            return load_deeplab_caffe_resnet(model, state)
        except ValueError as err:
            raise ValueError(f"{path!r}: {err}") from err
    if "conv1.weight" in state:
        try:
            load_torchvision_resnet(model, state)
        except ValueError as err:
            raise ValueError(f"{path!r}: {err}") from err
        return {k: v for k, v in state.items() if k.startswith("fc.")}
    raise ValueError(
        f"{path!r}: unrecognised ResNet weights; expected torchvision keys ('conv1.weight', 'layer1.0.conv1.weight', "
        f"...) or DeepLab caffe keys ('[base.]layer1.conv1.conv.weight', ...), found e.g. {sorted(state)[:5]}"
    )


def _build(
    depth: int,
    output_stride: int | None,
    pretrained: str | None,
    freeze_bn: bool,
    **kwargs: object,
) -> DeepLabResNet:
    if pretrained == "package":
        raise ValueError(f"pretrained='package' is only available for efficientnet_lite0, not resnet{depth}")
    os_ = 8 if output_stride is None else output_stride
    model = DeepLabResNet(depth, output_stride=os_, freeze_bn=freeze_bn, **kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        load_resnet_weights(model, pretrained)
    return model


@register_backbone("resnet101")
def resnet101(
    *, output_stride: int | None = None, pretrained: str | None = None, freeze_bn: bool = True, **kwargs: object
) -> DeepLabResNet:
    """DeepLabv2 ResNet-101 (2048 channels); kwargs as :class:`DeepLabResNet`."""
    return _build(101, output_stride, pretrained, freeze_bn, **kwargs)


@register_backbone("resnet50")
def resnet50(
    *, output_stride: int | None = None, pretrained: str | None = None, freeze_bn: bool = True, **kwargs: object
) -> DeepLabResNet:
    """DeepLabv2 ResNet-50 (2048 channels); kwargs as :class:`DeepLabResNet`."""
    return _build(50, output_stride, pretrained, freeze_bn, **kwargs)


@register_backbone("resnet18")
def resnet18(
    *, output_stride: int | None = None, pretrained: str | None = None, freeze_bn: bool = True, **kwargs: object
) -> DeepLabResNet:
    """DeepLab-layout ResNet-18 (basic blocks, 512 channels); kwargs as :class:`DeepLabResNet`."""
    return _build(18, output_stride, pretrained, freeze_bn, **kwargs)
