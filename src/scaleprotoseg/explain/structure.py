"""What the model says about one class: its prototypes per scale, its groups, and the weights linking them.

This is the static part of the explanations (the edges of Figure 4 "are static for all samples" of a class, i.e. a
global explanation); the per-image parts (activations) are added by the views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from scaleprotoseg.models.heads import PrototypeHead
from scaleprotoseg.models.segmenter import prototype_head

__all__ = ["ClassStructure", "class_structure", "prototype_head"]


@dataclass
class ClassStructure:
    """The decision structure of class ``index``.

    prototypes: the class's prototypes, ordered by (scale, index); scales: prototype -> scale (0-based).
    groups: global indices of the class's groups (grouped heads), ``[]`` otherwise.
    group_weights: group -> {prototype: w_g} with only the non-zero entries of the group matrix (Eq. 2).
    class_weights: grouped: group -> h_group[c, g]; ProtoSeg: prototype -> h_proto[c, p] (non-zero entries, own
    class's groups / prototypes only; the negative cross-class weights of the initialisation are not drawn).
    """

    index: int
    name: str
    grouped: bool
    prototypes: list[int]
    scales: dict[int, int]
    groups: list[int] = field(default_factory=list)
    group_weights: dict[int, dict[int, float]] = field(default_factory=dict)
    class_weights: dict[int, float] = field(default_factory=dict)

    @property
    def num_scales_used(self) -> list[int]:
        return sorted(set(self.scales.values()))

    def used_prototypes(self) -> list[int]:
        """Prototypes that reach the class's decision: with a non-zero group weight (grouped) or last-layer weight."""
        if self.grouped:
            used = {p for g in self.groups for p in self.group_weights.get(g, {})}
        else:
            used = set(self.class_weights)
        return [p for p in self.prototypes if p in used]

    def decision_weight(self) -> dict[int, float]:
        """Effective weight of each prototype in the class's score: sum_g h_group[c, g] * w_g[g, p] for grouped heads
        (exact in log space for the geometric mean of Eq. 2), h_proto[c, p] otherwise."""
        if not self.grouped:
            return {p: self.class_weights.get(p, 0.0) for p in self.prototypes}
        out = {p: 0.0 for p in self.prototypes}
        for g in self.groups:
            h = self.class_weights.get(g, 0.0)
            for p, w in self.group_weights.get(g, {}).items():
                out[p] = out.get(p, 0.0) + h * w
        return out

    def group_number(self, g: int) -> int:
        """1-based number of group ``g`` within its class (the paper's "Group 1..N_c")."""
        return self.groups.index(g) + 1

    def edges(self) -> dict[str, list[dict[str, Any]]]:
        """Graph edges: prototype -> group (w_g, non-zero only) and group -> class (h_group), or prototype -> class
        (h_proto) for ProtoSeg."""
        if self.grouped:
            pg = [
                {"prototype": p, "group": g, "weight": w}
                for g in self.groups
                for p, w in sorted(self.group_weights.get(g, {}).items())
            ]
            gc = [
                {"group": g, "class": self.index, "weight": self.class_weights[g]}
                for g in self.groups
                if g in self.class_weights
            ]
            return {"prototype_group": pg, "group_class": gc}
        pc = [
            {"prototype": p, "class": self.index, "weight": self.class_weights[p]}
            for p in self.prototypes
            if p in self.class_weights
        ]
        return {"prototype_class": pc}

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.index,
            "name": self.name,
            "grouped": self.grouped,
            "prototypes": [{"prototype": p, "scale": self.scales[p]} for p in self.prototypes],
            "used_prototypes": self.used_prototypes(),
            "groups": [
                {"group": g, "number": self.group_number(g), "class_weight": self.class_weights.get(g)}
                for g in self.groups
            ],
            "edges": self.edges(),
        }


@torch.no_grad()
def class_structure(head: PrototypeHead, class_index: int, class_names: list[str] | None = None) -> ClassStructure:
    """Read the structure of ``class_index`` from a prototype head (``prototype_class``, ``prototype_scale``,
    ``grouping.weight`` via ``dense_weight``, ``h_group`` / ``h_proto``)."""
    c = int(class_index)
    cls = head.prototype_class.detach().cpu()
    scale = head.prototype_scale.detach().cpu()
    P = int(cls.numel())
    protos = [int(p) for p in torch.nonzero(cls == c).flatten().tolist()]
    protos.sort(key=lambda p: (int(scale[p]), p))
    scales = {p: int(scale[p]) for p in protos}
    name = class_names[c] if class_names and c < len(class_names) else str(c)
    grouping = head.grouping
    if grouping is None:
        h = head.h_proto.detach().cpu()
        weights = {p: float(h[c, p]) for p in protos if float(h[c, p]) != 0.0}
        return ClassStructure(c, name, False, protos, scales, class_weights=weights)
    dense = grouping.dense_weight(P).detach().cpu()  # (G, P)
    group_class = grouping.group_class.detach().cpu()
    groups = [int(g) for g in torch.nonzero(group_class == c).flatten().tolist()]
    gw = {g: {p: float(dense[g, p]) for p in protos if float(dense[g, p]) != 0.0} for g in groups}
    hg = head.h_group.detach().cpu()
    cw = {g: float(hg[c, g]) for g in groups if float(hg[c, g]) != 0.0}
    return ClassStructure(c, name, True, protos, scales, groups, gw, cw)
