"""Backbone registry and the built-in backbones: ``resnet101``, ``resnet50``, ``resnet18`` (DeepLabv2 layout),
``efficientnet_lite0`` and ``unet``.

``build_backbone(name, output_stride=..., pretrained=..., freeze_bn=..., **kwargs)`` returns an ``nn.Module`` with
``out_channels`` and ``output_stride``; ``register_backbone(name)`` adds a user factory. Importing this package only
defines classes and fills the name registry.
"""

from . import deeplab_resnet, efficientnet_lite, unet  # noqa: F401  (registers the built-in backbones)
from .deeplab_resnet import DeepLabResNet, load_deeplab_caffe_resnet, load_torchvision_resnet
from .efficientnet_lite import EfficientNetLite0, load_efficientnet_lite_weights, package_weights_path
from .registry import Backbone, available_backbones, build_backbone, freeze_batchnorm, register_backbone
from .unet import UNet
from .weights import read_state_dict

__all__ = [
    "Backbone",
    "DeepLabResNet",
    "EfficientNetLite0",
    "UNet",
    "available_backbones",
    "build_backbone",
    "freeze_batchnorm",
    "load_deeplab_caffe_resnet",
    "load_efficientnet_lite_weights",
    "load_torchvision_resnet",
    "package_weights_path",
    "read_state_dict",
    "register_backbone",
]
