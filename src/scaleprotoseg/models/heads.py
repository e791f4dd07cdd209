"""The three heads the paper compares, all on top of an ASPP (section 3.1, Figure 2).

- :class:`DeepLabV2Head`: summed ASPP straight to class scores (the black box).
- :class:`PrototypeHead` with ``method="protoseg"``: summed ASPP to D channels + sigmoid, M prototypes per class,
  last layer ``h_proto``.
- :class:`PrototypeHead` with ``method="scaleprotoseg"``: ASPP concatenated per scale (S x D channels) + sigmoid,
  M prototypes per scale and class compared only with their scale's channels (Eq. 1), ``h_proto`` for stage 1; after
  :meth:`PrototypeHead.enable_groups` the class-wise sparse groups (Eq. 2) and ``h_group`` replace ``h_proto``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from scaleprotoseg.models import fused
from scaleprotoseg.models.aspp import ASPP
from scaleprotoseg.models.grouping import GroupingLayer
from scaleprotoseg.models.layout import member_table, padded_layout
from scaleprotoseg.models.memo import memoised
from scaleprotoseg.models.prototypes import PrototypeLayer, prototype_layout
from scaleprotoseg.ops import ACTIVATION_EPS, at_least_float32, full_precision


@dataclass
class ModelOutput:
    """What a forward pass returns; every map is on the feature grid (h, w) = (H, W) / output stride.

    logits: (B, C, h, w) class scores.
    features: (B, S*D, h, w) sigmoid ASPP features (prototype heads only).
    distances: (B, P, h, w) squared distances to the prototypes.
    activations: (B, P, h, w) prototype activations (Eq. 1).
    group_activations: (B, G, h, w) group activations (Eq. 2), grouped heads only.
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    distances: torch.Tensor | None = None
    activations: torch.Tensor | None = None
    group_activations: torch.Tensor | None = None

    def map(self, fn: Any) -> ModelOutput:
        """Apply ``fn`` to every tensor field (e.g. to resize or detach)."""
        return ModelOutput(
            **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in fields(self)}
        )


def class_assignment_weights(column_class: torch.Tensor, num_classes: int, own: float = 1.0, other: float = -0.5):
    """Last-layer initialisation of ProtoPNet used for h_proto and h_group: ``own`` where the column (prototype or
    group) belongs to the row's class, ``other`` elsewhere (section 3.1)."""
    rows = torch.arange(num_classes, device=column_class.device).unsqueeze(1)
    return torch.where(rows == column_class.unsqueeze(0), own, other).float()


class DeepLabV2Head(nn.Module):
    """DeepLabv2 classifier: summed ASPP with one output channel per class."""

    method = "deeplabv2"

    def __init__(
        self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24), init_std: float = 0.01
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.aspp = ASPP(in_channels, num_classes, rates, mode="sum", init_std=init_std)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.forward_aspp(self.aspp(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores only (the inference path)."""
        return self.aspp(x)

    def forward_aspp(self, a: torch.Tensor) -> ModelOutput:
        """The output from the ASPP's output ``a``, here the class scores themselves (multi-scale inputs fuse it)."""
        return ModelOutput(logits=a)

    def logits_from_aspp(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"aspp": list(self.aspp.parameters())}

    def structure(self) -> dict[str, Any]:
        return {"method": self.method}

    def apply_structure(self, structure: dict[str, Any]) -> None:
        pass


class PrototypeHead(nn.Module):
    """Prototype head of ProtoSeg (``num_scales=1``, summed ASPP) or ScaleProtoSeg (concatenated ASPP).

    Parameters live in named groups used by the training stages: ``aspp``, ``prototypes``, ``groups`` (group weights
    w_g) and ``last_layer`` (h_group once groups are enabled, h_proto before).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        method: Literal["protoseg", "scaleprotoseg"],
        rates: Sequence[int] = (6, 12, 18, 24),
        dim: int = 64,
        prototypes_per_class: int = 3,
        groups_per_class: int = 3,
        group_activation: Literal["ratio", "geometric"] = "ratio",
        eps: float = ACTIVATION_EPS,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if method not in ("protoseg", "scaleprotoseg"):
            raise ValueError(f"prototype head method {method!r} is not valid; expected 'protoseg' or 'scaleprotoseg'")
        self.method = method
        self.num_classes = num_classes
        self.groups_per_class = groups_per_class
        self.group_activation = group_activation
        mode = "concat" if method == "scaleprotoseg" else "sum"
        self.aspp = ASPP(in_channels, dim, rates, mode=mode, init_std=init_std)
        self.num_scales = self.aspp.num_scales
        cls, scale = prototype_layout(num_classes, prototypes_per_class, self.num_scales)
        self.prototypes = PrototypeLayer(cls, scale, dim, self.num_scales, eps)
        self.h_proto = nn.Parameter(class_assignment_weights(cls, num_classes))  # (C, P)
        self.grouping: GroupingLayer | None = None
        self.h_group: nn.Parameter | None = None  # (C, G)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def prototype_class(self) -> torch.Tensor:
        return self.prototypes.prototype_class

    @property
    def prototype_scale(self) -> torch.Tensor:
        return self.prototypes.prototype_scale

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.num_prototypes

    @property
    def grouped(self) -> bool:
        return self.grouping is not None

    @property
    def group_class(self) -> torch.Tensor | None:
        return None if self.grouping is None else self.grouping.group_class

    def member_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, S, M) prototype indices per (class, scale) and their mask, for the diversity loss; memoised."""
        layer = self.prototypes
        return memoised(
            self,
            "_memo_member_table",
            [layer.prototype_class, layer.prototype_scale],
            lambda: member_table(layer.prototype_class, layer.prototype_scale, self.num_classes, self.num_scales),
        )

    def last_layer_weight(self) -> torch.Tensor:
        """The weights of the final linear layer in use: h_group (C, G) when grouped, else h_proto (C, P)."""
        return self.h_group if self.h_group is not None else self.h_proto

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {
            "aspp": list(self.aspp.parameters()),
            "prototypes": [self.prototypes.prototypes],
            "last_layer": [self.last_layer_weight()],
        }
        if self.grouping is not None:
            groups["groups"] = [self.grouping.weight]
        return groups

    def enable_groups(self) -> None:
        """Switch to stage 2: class-wise groups over the current prototypes, h_group initialised 1 / -0.5."""
        device = self.h_proto.device
        self.grouping = GroupingLayer(
            self.prototype_class, self.num_classes, self.groups_per_class, self.group_activation
        ).to(device)
        self.h_group = nn.Parameter(class_assignment_weights(self.grouping.group_class, self.num_classes).to(device))

    @torch.no_grad()
    def remove_prototypes(self, keep: torch.Tensor) -> None:
        """Keep only the prototypes at ``keep`` (duplicate removal, pruning); every table follows."""
        keep = keep.to(self.h_proto.device).long()
        self.prototypes.keep(keep)
        self.h_proto = nn.Parameter(self.h_proto.data.index_select(1, keep).clone())
        if self.grouping is not None:
            self.grouping.remap_prototypes(keep, self.prototype_class)

    def structure(self) -> dict[str, Any]:
        """Everything needed to rebuild the head's shapes before loading its weights."""
        s: dict[str, Any] = {
            "method": self.method,
            "prototype_class": self.prototype_class.tolist(),
            "prototype_scale": self.prototype_scale.tolist(),
            "grouped": self.grouped,
        }
        if self.grouping is not None:
            s["group_class"] = self.grouping.group_class.tolist()
            s["member_index"] = self.grouping.member_index.tolist()
            s["member_mask"] = self.grouping.member_mask.tolist()
        return s

    def apply_structure(self, structure: dict[str, Any]) -> None:
        device = self.h_proto.device
        cls = torch.tensor(structure["prototype_class"], dtype=torch.long, device=device)
        scale = torch.tensor(structure["prototype_scale"], dtype=torch.long, device=device)
        self.prototypes.resize_to(cls, scale)
        self.h_proto = nn.Parameter(torch.zeros(self.num_classes, len(cls), device=device))
        if structure.get("grouped"):
            self.enable_groups()
            self.grouping.resize_to(
                torch.tensor(structure["member_index"], dtype=torch.long, device=device),
                torch.tensor(structure["member_mask"], dtype=torch.bool, device=device),
            )

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.forward_aspp(self.aspp(x))

    def forward_aspp(self, a: torch.Tensor) -> ModelOutput:
        """Everything after the ASPP from its (pre-sigmoid) output ``a``: the entry point of multi-scale inputs, which
        max-fuse the ASPP outputs of the scaled images (:func:`~scaleprotoseg.models.segmenter.msc_forward`)."""
        with full_precision(a):
            return self.forward_features(torch.sigmoid(at_least_float32(a)))

    def forward_features(self, features: torch.Tensor) -> ModelOutput:
        """Everything after the ASPP and sigmoid, every map kept (training, explanations); float32 under autocast."""
        with full_precision(features):
            features = at_least_float32(features)
            distances, activations = self.prototypes(features)
            if self.grouping is None:
                logits = torch.einsum("cp,bphw->bchw", self.h_proto, activations)
                return ModelOutput(logits, features, distances, activations)
            groups = self.grouping(activations)
            logits = torch.einsum("cg,bghw->bchw", self.h_group, groups)
            return ModelOutput(logits, features, distances, activations, groups)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores only, equal to ``forward(x).logits`` (the inference path).

        Without autograd, cells are processed in reused blocks and a grouped head skips the prototypes no group uses
        (:mod:`scaleprotoseg.models.fused`); with autograd on, this is the plain forward.
        """
        return self.logits_from_aspp(self.aspp(x))

    def logits_from_aspp(self, a: torch.Tensor) -> torch.Tensor:
        """Class scores from the ASPP's output, equal to ``forward_aspp(a).logits`` (see :meth:`logits`)."""
        if torch.is_grad_enabled():
            return self.forward_aspp(a).logits
        with full_precision(a):
            return self.logits_from_features(torch.sigmoid(at_least_float32(a)))

    def _fused_plan(self) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        """The inference layout (:func:`.layout.padded_layout` of the prototypes some group uses, or of all of them
        without groups), the group members' slots and the masked group weights; memoised until they change."""
        layer, g = self.prototypes, self.grouping

        def compute() -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
            if g is None:
                return (*padded_layout(layer.prototype_scale, self.num_scales), None, None)
            weight = g.weight.detach() * g.member_mask.unsqueeze(1)
            used = torch.zeros(self.num_prototypes, dtype=torch.bool, device=weight.device)
            used[g.used_prototypes()] = True
            source, slot, m = padded_layout(layer.prototype_scale, self.num_scales, used)
            index = slot[g.member_index].clamp_min(0)  # members no group uses have weight 0: any slot will do
            return source, slot, m, index, weight

        sources = [layer.prototype_scale] + ([] if g is None else [g.weight, g.member_index, g.member_mask])
        return memoised(self, "_memo_fused_plan", sources, compute)

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores from the sigmoid ASPP features (B, S*D, h, w), block by block (Eqs. 1-2, no autograd), in
        float32 under autocast too."""
        with full_precision(features):
            return self._blockwise_logits(at_least_float32(features))

    def _blockwise_logits(self, features: torch.Tensor) -> torch.Tensor:
        source, slot, m, index, weight = self._fused_plan()
        protos = self.prototypes.prototypes.index_select(0, source).view(self.num_scales, m, -1)
        if self.grouping is None:
            last = self.h_proto.new_zeros(self.num_classes, self.num_scales * m).index_copy_(1, slot, self.h_proto)
            combine = fused.linear_combine(last)  # padding slots get weight 0
        else:
            combine = fused.group_combine(index, weight, self.h_group, self.grouping.mode)
        return fused.blockwise_logits(features, protos, self.prototypes.eps, combine, self.num_classes)
