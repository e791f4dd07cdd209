"""A backbone and a head assembled into one model, chosen by configuration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from scaleprotoseg.models.backbones.registry import Backbone
from scaleprotoseg.models.heads import DeepLabV2Head, ModelOutput, PrototypeHead, make_head
from scaleprotoseg.ops import resize_image

MSC_FUSIONS = ("features", "logits")
MscFusion = Literal["features", "logits"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP / DataParallel wrapper (DDP's forward syncs buffers and would hang on uneven
    shards)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model


@dataclass
class MultiScaleOutput:
    """What a forward pass with multi-scale inputs returns: one output per input scale (in the order of the scales,
    each on its own grid) and the output of the max-fused ASPP features (on the largest scale's grid)."""

    scales: list[ModelOutput]
    fused: ModelOutput


def scaled_input(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` (B, 3, H, W) resized bilinearly by ``scale`` (side lengths rounded, at least 1)."""
    if scale == 1:
        return x
    H, W = x.shape[-2:]
    return resize_image(x, (max(1, int(round(H * scale))), max(1, int(round(W * scale)))))


def max_fuse(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise max of (B, K, h_i, w_i) maps, each first resized bilinearly to the largest one's grid (DeepLab's
    multi-scale inputs)."""
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    return torch.stack([resize_image(m, size) for m in maps], dim=0).amax(dim=0)


class Segmenter(nn.Module):
    """``backbone -> head``; ``forward(x (B, 3, H, W)) -> ModelOutput`` on the backbone's feature grid.

    With ``msc_scales``, ``forward`` runs the multi-scale inputs of the release in one call (one call, so that a
    DistributedDataParallel wrapper sees one forward pass) and returns a :class:`MultiScaleOutput`.
    """

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

    def forward(self, x: torch.Tensor, msc_scales: Sequence[float] = ()) -> ModelOutput | MultiScaleOutput:
        if not msc_scales:
            return self.head(self.backbone(x))
        aspp = self._aspp_outputs(x, msc_scales)
        return MultiScaleOutput([self.head.forward_aspp(a) for a in aspp], self.head.forward_aspp(max_fuse(aspp)))

    def _aspp_outputs(self, x: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
        return [self.head.aspp(self.backbone(scaled_input(x, s))) for s in scales]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C, h, w) only, without the intermediate maps: what evaluation and prediction use."""
        return self.head.logits(self.backbone(x))

    def msc_logits(self, x: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
        """Class scores of multi-scale inputs with the ASPP outputs max-fused (the release), equal to
        ``forward(x, scales).fused.logits``, on the largest scale's grid."""
        return self.head.logits_from_aspp(max_fuse(self._aspp_outputs(x, scales)))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by the names the training stages use: backbone, aspp, prototypes, groups, last_layer."""
        new = self.backbone.new_parameters() if isinstance(self.backbone, Backbone) else []
        fresh = {id(p) for p in new}
        groups = {"backbone": [p for p in self.backbone.parameters() if id(p) not in fresh]}
        groups.update(self.head.param_groups())
        groups["aspp"] = new + groups["aspp"]  # a decoder without pretrained weights trains like the ASPP
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


def msc_forward(
    model: nn.Module, x: torch.Tensor, scales: Sequence[float], fusion: MscFusion = "features"
) -> tuple[list[ModelOutput], ModelOutput]:
    """Multi-scale inputs (DeepLab's MSC): run ``x`` at each scale and fuse by an elementwise max on the largest
    scale's grid (maps resized bilinearly). Returns (outputs per scale, fused output).

    ``fusion="features"`` (the authors' release, in training and evaluation) fuses the ASPP outputs before the
    sigmoid, so the fused output is a whole forward pass (prototype distances included) of the fused features.
    ``"logits"`` fuses the class scores of the per-scale outputs (DeepLab's own MSC); the fused output then has
    logits only. ``model`` is a :class:`Segmenter`, possibly wrapped (DDP).
    """
    if fusion == "features":
        out = model(x, msc_scales=tuple(scales))
        return out.scales, out.fused
    if fusion != "logits":
        raise ValueError(f"multi-scale fusion {fusion!r} is not known; expected one of {', '.join(MSC_FUSIONS)}")
    outputs = [model(scaled_input(x, s)) for s in scales]
    return outputs, ModelOutput(logits=max_fuse([o.logits for o in outputs]))


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
