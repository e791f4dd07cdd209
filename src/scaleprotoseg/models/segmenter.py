"""A backbone and a head assembled into one model, chosen by configuration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scaleprotoseg.models.heads import DeepLabV2Head, ModelOutput, PrototypeHead, make_head
from scaleprotoseg.ops import resize_image


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP / DataParallel wrapper (DDP's forward syncs buffers and would hang on uneven
    shards)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model


class Segmenter(nn.Module):
    """``backbone -> head``; ``forward(x (B, 3, H, W)) -> ModelOutput`` on the backbone's feature grid."""

    def __init__(self, backbone: nn.Module, head: DeepLabV2Head | PrototypeHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def output_stride(self) -> int:
        return int(getattr(self.backbone, "output_stride", 8))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.head(self.backbone(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C, h, w) only, without the intermediate maps: what evaluation and prediction use."""
        return self.head.logits(self.backbone(x))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by the names the training stages use: backbone, aspp, prototypes, groups, last_layer."""
        groups = {"backbone": [p for p in self.backbone.parameters()]}
        groups.update(self.head.param_groups())
        return groups

    def set_trainable(self, names: Sequence[str]) -> list[str]:
        """Let exactly the named parameter groups receive gradients; returns the unknown names for the caller.

        Parameters that the backbone keeps frozen on its own (batch norm when frozen) stay frozen.
        """
        groups = self.param_groups()
        unknown = [n for n in names if n not in groups]
        frozen_bn = set()
        if getattr(self.backbone, "bn_frozen", False):
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    frozen_bn.update(id(p) for p in m.parameters())
        for p in self.parameters():
            p.requires_grad_(False)
        for name in names:
            for p in groups.get(name, []):
                if id(p) not in frozen_bn:
                    p.requires_grad_(True)
        return unknown

    def structure(self) -> dict[str, Any]:
        return self.head.structure()

    def apply_structure(self, structure: dict[str, Any]) -> None:
        self.head.apply_structure(structure)

    def refresh_layout(self) -> None:
        """Rebuild the head's derived tables after its weights were loaded or edited in place
        (:meth:`~scaleprotoseg.models.heads.PrototypeHead.refresh_layout`)."""
        self.head.refresh_layout()


def msc_forward(model: nn.Module, x: torch.Tensor, scales: Sequence[float]) -> tuple[list[ModelOutput], torch.Tensor]:
    """DeepLab multi-scale inputs: run ``x`` at each scale and fuse the logits by an elementwise max on the grid of
    the scale-1 input. Returns (outputs per scale, fused logits)."""
    outputs = []
    H, W = x.shape[-2:]
    for s in scales:
        xs = x if s == 1 else resize_image(x, (max(1, int(round(H * s))), max(1, int(round(W * s)))))
        outputs.append(model(xs))
    ref = next((o for o, s in zip(outputs, scales) if s == 1), outputs[-1])
    size = tuple(ref.logits.shape[-2:])
    fused = torch.stack([resize_image(o.logits, size) for o in outputs], dim=0).amax(dim=0)
    return outputs, fused


def build_model(model_cfg: Any, num_classes: int) -> Segmenter:
    """Build DeepLabv2, ProtoSeg or ScaleProtoSeg from a :class:`~scaleprotoseg.config.ModelConfig`."""
    from scaleprotoseg.models.backbones import build_backbone

    if num_classes <= 0:
        raise ValueError(f"num_classes is {num_classes}; expected a positive number of classes")
    kwargs = dict(model_cfg.backbone_options)
    if model_cfg.bn_momentum:
        kwargs["bn_momentum"] = model_cfg.bn_momentum
    backbone = build_backbone(
        model_cfg.backbone,
        output_stride=model_cfg.output_stride,
        pretrained=model_cfg.pretrained,
        freeze_bn=model_cfg.freeze_bn,
        **kwargs,
    )
    if model_cfg.method not in ("deeplabv2", "protoseg", "scaleprotoseg"):
        raise ValueError(f"model.method {model_cfg.method!r}; expected scaleprotoseg, protoseg or deeplabv2")
    head = make_head(
        model_cfg.method,
        backbone.out_channels,
        num_classes,
        rates=model_cfg.aspp_rates,
        dim=model_cfg.aspp_channels,
        prototypes_per_class=model_cfg.prototypes_per_class,
        groups_per_class=model_cfg.groups_per_class,
        group_activation=model_cfg.group_activation,
        eps=model_cfg.activation_eps,
        init_std=model_cfg.aspp_init_std,
    )
    return Segmenter(backbone, head)


def prototype_head(model: nn.Module) -> PrototypeHead | None:
    """The prototype head (ProtoSeg / ScaleProtoSeg) of a model, wrapped or not; ``None`` for DeepLabv2."""
    net = unwrap(model)
    return net.head if isinstance(net, Segmenter) and isinstance(net.head, PrototypeHead) else None
