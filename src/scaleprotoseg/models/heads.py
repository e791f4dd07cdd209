"""The three heads the paper compares, all on top of an ASPP (section 3.1, Figure 2), with one contract.

- :class:`DeepLabV2Head`: summed ASPP straight to class scores (the black box).
- :class:`ProtoSegHead`: summed ASPP to D channels + sigmoid, M prototypes per class, last layer ``h_proto``.
- :class:`ScaleProtoSegHead`: ASPP concatenated per scale (S x D channels) + sigmoid, M prototypes per scale and class
  compared only with their scale's channels (Eq. 1), ``h_proto`` for stage 1; after
  :meth:`ScaleProtoSegHead.enable_groups` it holds a :class:`~.grouping.GroupingLayer` (Eq. 2) and ``h_group``,
  which replace ``h_proto``.

Every head maps backbone features to a :class:`ModelOutput` (``forward``: logits and, for the prototype heads, the
features, distances, prototype activations and group activations or ``None``) and to class scores only (``logits``).
:func:`make_head` builds the head of a method by name.

The prototype heads keep derived index tables (prototypes per scale, the (class, scale) member table of the
diversity loss, the slots of the inference path) as non-persistent buffers, rebuilt by
:meth:`PrototypeHead.refresh_layout` wherever the tables they derive from change: removing prototypes (duplicates
after projection, pruning), enabling, projecting or thresholding groups, and loading a checkpoint. Code that edits
``prototype_scale``, ``prototype_class`` or the group weights in place by other means must call ``refresh_layout()``
afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from scaleprotoseg.models import fused
from scaleprotoseg.models.aspp import ASPP
from scaleprotoseg.models.grouping import GroupingLayer
from scaleprotoseg.models.layout import member_table, padded_layout
from scaleprotoseg.models.prototypes import PrototypeLayer, prototype_layout
from scaleprotoseg.ops import ACTIVATION_EPS, at_least_float32, full_precision

METHODS = ("deeplabv2", "protoseg", "scaleprotoseg")


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
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModelOutput(**{k: None if v is None else fn(v) for k, v in values.items()})


def class_assignment_weights(column_class: torch.Tensor, num_classes: int, own: float = 1.0, other: float = -0.5):
    """Last-layer initialisation of ProtoPNet used for h_proto and h_group: ``own`` where the column (prototype or
    group) belongs to the row's class, ``other`` elsewhere (section 3.1)."""
    rows = torch.arange(num_classes, device=column_class.device).unsqueeze(1)
    return torch.where(rows == column_class.unsqueeze(0), own, other).float()


class DeepLabV2Head(nn.Module):
    """DeepLabv2 classifier: summed ASPP with one output channel per class."""

    method: ClassVar[str] = "deeplabv2"

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

    def refresh_layout(self) -> None:
        """Nothing is derived: the contract of :meth:`PrototypeHead.refresh_layout`."""


class PrototypeHead(nn.Module):
    """What ProtoSeg and ScaleProtoSeg share: an ASPP (summed or concatenated), sigmoid, the prototype layer (Eq. 1)
    and the last layer ``h_proto``. Use :class:`ProtoSegHead` or :class:`ScaleProtoSegHead`.

    Parameters live in named groups used by the training stages: ``aspp``, ``prototypes``, ``groups`` (group weights
    w_g, grouped heads) and ``last_layer`` (h_group once groups are enabled, h_proto before). ``grouping`` and
    ``h_group`` stay ``None`` unless a :class:`ScaleProtoSegHead` enables its groups.
    """

    method: ClassVar[str]
    aspp_mode: ClassVar[Literal["sum", "concat"]]

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        rates: Sequence[int] = (6, 12, 18, 24),
        dim: int = 64,
        prototypes_per_class: int = 3,
        eps: float = ACTIVATION_EPS,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.aspp = ASPP(in_channels, dim, rates, mode=self.aspp_mode, init_std=init_std)
        self.num_scales = self.aspp.num_scales
        cls, scale = prototype_layout(num_classes, prototypes_per_class, self.num_scales)
        self.prototypes = PrototypeLayer(cls, scale, dim, self.num_scales, eps)
        self.h_proto = nn.Parameter(class_assignment_weights(cls, num_classes))  # (C, P)
        self.grouping: GroupingLayer | None = None
        self.h_group: nn.Parameter | None = None  # (C, G)
        self._slots = 0  # m of the inference layout; the tables are the non-persistent buffers below
        self.refresh_layout()

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

    def refresh_layout(self) -> None:
        """Rebuild every table derived from the prototype layout and the group weights.

        The prototypes per scale (:meth:`.PrototypeLayer.refresh_layout`), the (C, S, M) member table of the
        diversity loss and the inference layout of :meth:`logits_from_features`: :func:`.layout.padded_layout` of
        the prototypes some group uses (all of them without groups) and each group member's slot. Reading the
        layout back to the host happens here, once, not at every forward pass.
        """
        layer = self.prototypes
        layer.refresh_layout()
        index, mask = member_table(layer.prototype_class, layer.prototype_scale, self.num_classes, self.num_scales)
        self._set_table("_member_index", index)
        self._set_table("_member_mask", mask)
        source, slot, m = padded_layout(layer.prototype_scale, self.num_scales, self._used_prototypes())
        self._set_table("_plan_source", source)
        self._set_table("_plan_slot", slot)
        self._slots = m

    def _used_prototypes(self) -> torch.Tensor | None:
        """(P,) mask of the prototypes the logits depend on, ``None`` for all of them (the inference layout)."""
        return None

    def _set_table(self, name: str, value: torch.Tensor) -> None:
        if name in self._buffers:
            self._buffers[name] = value
        else:
            self.register_buffer(name, value, persistent=False)

    def member_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, S, M) prototype indices per (class, scale) and their mask, for the diversity loss."""
        return self._member_index, self._member_mask

    def last_layer_weight(self) -> torch.Tensor:
        """The weights of the final linear layer in use: h_group (C, G) when grouped, else h_proto (C, P)."""
        return self.h_group if self.h_group is not None else self.h_proto

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {
            "aspp": list(self.aspp.parameters()),
            "prototypes": [self.prototypes.prototypes],
            "last_layer": [self.last_layer_weight()],
        }
        return groups

    @torch.no_grad()
    def remove_prototypes(self, keep: torch.Tensor) -> None:
        """Keep only the prototypes at ``keep`` (duplicate removal, pruning); every table follows."""
        keep = keep.to(self.h_proto.device).long()
        self.prototypes.keep(keep)
        self.h_proto = nn.Parameter(self.h_proto.data.index_select(1, keep).clone())
        self._remap_groups(keep)
        self.refresh_layout()

    def _remap_groups(self, keep: torch.Tensor) -> None:
        """Let the groups follow a removal of prototypes (grouped heads)."""

    def structure(self) -> dict[str, Any]:
        """Everything needed to rebuild the head's shapes before loading its weights."""
        return {
            "method": self.method,
            "prototype_class": self.prototype_class.tolist(),
            "prototype_scale": self.prototype_scale.tolist(),
            "grouped": self.grouped,
        }

    def apply_structure(self, structure: dict[str, Any]) -> None:
        """Take a saved layout (before loading weights; call :meth:`refresh_layout` once they are loaded)."""
        device = self.h_proto.device
        cls = torch.tensor(structure["prototype_class"], dtype=torch.long, device=device)
        scale = torch.tensor(structure["prototype_scale"], dtype=torch.long, device=device)
        self.prototypes.resize_to(cls, scale)
        self.h_proto = nn.Parameter(torch.zeros(self.num_classes, len(cls), device=device))
        self._apply_group_structure(structure)
        self.refresh_layout()

    def _apply_group_structure(self, structure: dict[str, Any]) -> None:
        if structure.get("grouped"):
            raise ValueError(f"a {self.method} head has no groups; the saved structure is of a grouped head")

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
            logits, groups = self.classify(activations)
            return ModelOutput(logits, features, distances, activations, groups)

    def classify(self, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prototype activations (B, P, h, w) -> (logits (B, C, h, w), group activations (B, G, h, w) or None)."""
        return torch.einsum("cp,bphw->bchw", self.h_proto, activations), None

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

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores from the sigmoid ASPP features (B, S*D, h, w), block by block (Eqs. 1-2, no autograd), on
        the layout of the last :meth:`refresh_layout`, in float32 under autocast too."""
        with full_precision(features):
            return self._blockwise_logits(at_least_float32(features))

    def _blockwise_logits(self, features: torch.Tensor) -> torch.Tensor:
        m = self._slots
        protos = self.prototypes.prototypes.index_select(0, self._plan_source).view(self.num_scales, m, -1)
        return fused.blockwise_logits(features, protos, self.prototypes.eps, self._combine(), self.num_classes)

    def _combine(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Activations on the inference layout's slots (S*m, T) -> class scores (C, T)."""
        last = self.h_proto.new_zeros(self.num_classes, self.num_scales * self._slots)
        return fused.linear_combine(last.index_copy_(1, self._plan_slot, self.h_proto))  # padding slots: weight 0


class ProtoSegHead(PrototypeHead):
    """ProtoSeg: summed ASPP, M prototypes per class, ``h_proto``; no groups."""

    method: ClassVar[str] = "protoseg"
    aspp_mode: ClassVar[Literal["sum", "concat"]] = "sum"


class ScaleProtoSegHead(PrototypeHead):
    """ScaleProtoSeg: concatenated ASPP, M prototypes per scale and class (Eq. 1) and, from stage 2 on, class-wise
    sparse groups (Eq. 2) with ``h_group``."""

    method: ClassVar[str] = "scaleprotoseg"
    aspp_mode: ClassVar[Literal["sum", "concat"]] = "concat"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        rates: Sequence[int] = (6, 12, 18, 24),
        dim: int = 64,
        prototypes_per_class: int = 3,
        groups_per_class: int = 3,
        group_activation: Literal["ratio", "geometric"] = "ratio",
        eps: float = ACTIVATION_EPS,
        init_std: float = 0.01,
    ) -> None:
        if group_activation not in ("ratio", "geometric"):
            raise ValueError(
                f"group activation mode {group_activation!r} is not valid; expected 'ratio' or 'geometric'"
            )
        super().__init__(
            in_channels,
            num_classes,
            rates=rates,
            dim=dim,
            prototypes_per_class=prototypes_per_class,
            eps=eps,
            init_std=init_std,
        )
        self.groups_per_class = groups_per_class
        self.group_activation = group_activation

    def enable_groups(self) -> None:
        """Switch to stage 2: class-wise groups over the current prototypes, h_group initialised 1 / -0.5."""
        device = self.h_proto.device
        self.grouping = GroupingLayer(
            self.prototype_class, self.num_classes, self.groups_per_class, self.group_activation
        ).to(device)
        self.h_group = nn.Parameter(class_assignment_weights(self.grouping.group_class, self.num_classes).to(device))
        self.refresh_layout()

    def project_groups_(self) -> None:
        """Project every group row back onto the simplex (after each optimizer step that trains the groups)."""
        self._groups().project_()
        self.refresh_layout()

    def threshold_groups_(self, alpha: float) -> int:
        """Zero the group weights below ``alpha`` (section 3.2, post-processing); returns how many were zeroed."""
        zeroed = self._groups().threshold_(alpha)
        self.refresh_layout()
        return zeroed

    def _groups(self) -> GroupingLayer:
        if self.grouping is None:
            raise ValueError("the head has no groups yet; call enable_groups() first (stage 2)")
        return self.grouping

    def refresh_layout(self) -> None:
        super().refresh_layout()
        if self.grouping is not None:  # members no group uses have weight 0: any slot will do
            self._set_table("_plan_member_slot", self._plan_slot[self.grouping.member_index].clamp_min(0))

    def _used_prototypes(self) -> torch.Tensor | None:
        if self.grouping is None:
            return None
        used = torch.zeros(self.num_prototypes, dtype=torch.bool, device=self.prototype_scale.device)
        used[self.grouping.used_prototypes()] = True
        return used

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        if self.grouping is not None:
            groups["groups"] = [self.grouping.weight]
        return groups

    def _remap_groups(self, keep: torch.Tensor) -> None:
        if self.grouping is not None:
            self.grouping.remap_prototypes(keep, self.prototype_class)

    def structure(self) -> dict[str, Any]:
        s = super().structure()
        if self.grouping is not None:
            s["group_class"] = self.grouping.group_class.tolist()
            s["member_index"] = self.grouping.member_index.tolist()
            s["member_mask"] = self.grouping.member_mask.tolist()
        return s

    def _apply_group_structure(self, structure: dict[str, Any]) -> None:
        if structure.get("grouped"):
            device = self.h_proto.device
            self.enable_groups()
            self.grouping.resize_to(
                torch.tensor(structure["member_index"], dtype=torch.long, device=device),
                torch.tensor(structure["member_mask"], dtype=torch.bool, device=device),
            )

    def classify(self, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.grouping is None:
            return super().classify(activations)
        groups = self.grouping(activations)  # Eq. 2
        return torch.einsum("cg,bghw->bchw", self.h_group, groups), groups

    def _combine(self) -> Callable[[torch.Tensor], torch.Tensor]:
        g = self.grouping
        if g is None:
            return super()._combine()
        weight = g.weight.detach() * g.member_mask.unsqueeze(1)
        return fused.group_combine(self._plan_member_slot, weight, self.h_group, g.mode)


def make_head(
    method: str,
    in_channels: int,
    num_classes: int,
    *,
    rates: Sequence[int] = (6, 12, 18, 24),
    dim: int = 64,
    prototypes_per_class: int = 3,
    groups_per_class: int = 3,
    group_activation: Literal["ratio", "geometric"] = "ratio",
    eps: float = ACTIVATION_EPS,
    init_std: float = 0.01,
) -> DeepLabV2Head | PrototypeHead:
    """The head of ``method`` (``deeplabv2``, ``protoseg`` or ``scaleprotoseg``); options a method has no use for
    are ignored."""
    if method == "deeplabv2":
        return DeepLabV2Head(in_channels, num_classes, rates, init_std=init_std)
    common = dict(rates=rates, dim=dim, prototypes_per_class=prototypes_per_class, eps=eps, init_std=init_std)
    if method == "protoseg":
        return ProtoSegHead(in_channels, num_classes, **common)
    if method == "scaleprotoseg":
        return ScaleProtoSegHead(
            in_channels, num_classes, groups_per_class=groups_per_class, group_activation=group_activation, **common
        )
    raise ValueError(f"head method {method!r} is not valid; expected one of {', '.join(METHODS)}")
