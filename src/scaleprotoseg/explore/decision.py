"""The decision of a prototype head as plain tensors: class scores from cached prototype activations, their exact
per-cell decomposition, and the same with prototypes or groups switched off.

For a grouped ScaleProtoSeg head the score of class c at a cell is (Eq. 2 and the last layer h_group)::

    logit_c = sum_g h[c, g] * a_g,      a_g = exp(sum_p w[g, p] * t_p)

with ``t_p`` the activation of Eq. 1 (``mode="ratio"``, the released form) or its log (``mode="geometric"``, Eq. 2
as printed). ``h[c, g] * a_g`` is the contribution of group g to the score and ``w[g, p] * t_p`` the contribution of
prototype p to ``log a_g``; both sums are reproduced exactly. For ProtoSeg and stage-1 heads the score is
``sum_p h[c, p] * t_p`` and every prototype is its own term.

Switching prototypes off (:class:`Ablation`) drops their weights from every group; each group row that lost a
member is divided by what it keeps, so it is on the simplex again (untouched rows stay as trained). A group that
keeps nothing, and every group switched off, contributes 0 (its column of h is 0). The re-exported model of an
edit (:mod:`scaleprotoseg.explore.edits`) is built from these same tables, so a what-if and the exported model agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from scaleprotoseg.models.grouping import GEOMETRIC_FLOOR
from scaleprotoseg.models.heads import PrototypeHead

__all__ = ["Ablation", "DecisionTables", "ExploreError"]


class ExploreError(ValueError):
    """A request the explorer cannot answer (bad image, unknown prototype, a model without prototypes...)."""


@dataclass(frozen=True)
class Ablation:
    """Prototypes and groups switched off (indices in the model's numbering)."""

    prototypes: frozenset[int] = field(default_factory=frozenset)
    groups: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, prototypes: Iterable[int] = (), groups: Iterable[int] = ()) -> Ablation:
        return cls(frozenset(int(p) for p in prototypes), frozenset(int(g) for g in groups))

    @classmethod
    def parse(cls, text: str | None, source: str = "--without") -> Ablation:
        """``"p3,p7,g1"`` (``p``: prototype, ``g``: group; a bare number is a prototype) -> :class:`Ablation`."""
        protos, groups = set(), set()
        for item in (text or "").split(","):
            item = item.strip().lower()
            if not item:
                continue
            kind, number = (item[0], item[1:]) if item[0] in "pg" else ("p", item)
            if not number.isdigit():
                raise ExploreError(f"{source}: {item!r} is not a prototype or group; expected e.g. p3 or g1")
            (protos if kind == "p" else groups).add(int(number))
        return cls(frozenset(protos), frozenset(groups))

    @property
    def empty(self) -> bool:
        return not self.prototypes and not self.groups

    def label(self) -> str:
        """``p3,p7,g1``: the inverse of :meth:`parse`."""
        return ",".join([f"p{p}" for p in sorted(self.prototypes)] + [f"g{g}" for g in sorted(self.groups)])

    def to_dict(self) -> dict[str, list[int]]:
        return {"prototypes": sorted(self.prototypes), "groups": sorted(self.groups)}


@dataclass
class DecisionTables:
    """The decision structure of a :class:`PrototypeHead` on the CPU, in float32.

    ``last_layer`` is h_group (C, G) for grouped heads and h_proto (C, P) otherwise; ``group_weight`` is the dense
    (G, P) group-to-prototype weight (``None`` without groups).
    """

    prototype_class: torch.Tensor
    prototype_scale: torch.Tensor
    last_layer: torch.Tensor
    group_weight: torch.Tensor | None = None
    group_class: torch.Tensor | None = None
    mode: str = "ratio"

    @classmethod
    def of_head(cls, head: PrototypeHead) -> DecisionTables:
        g = head.grouping
        return cls(
            prototype_class=head.prototype_class.detach().cpu().long(),
            prototype_scale=head.prototype_scale.detach().cpu().long(),
            last_layer=head.last_layer_weight().detach().cpu().float(),
            group_weight=None if g is None else g.dense_weight(head.num_prototypes).detach().cpu().float(),
            group_class=None if g is None else g.group_class.detach().cpu().long(),
            mode="ratio" if g is None else g.mode,
        )

    @property
    def grouped(self) -> bool:
        return self.group_weight is not None

    @property
    def num_prototypes(self) -> int:
        return len(self.prototype_class)

    @property
    def num_groups(self) -> int:
        return 0 if self.group_weight is None else self.group_weight.shape[0]

    @property
    def num_classes(self) -> int:
        return self.last_layer.shape[0]

    def check(self, ablation: Ablation) -> None:
        """Raise :class:`ExploreError` for indices this model does not have."""
        bad_p = sorted(p for p in ablation.prototypes if not 0 <= p < self.num_prototypes)
        if bad_p:
            raise ExploreError(f"prototype(s) {bad_p} do not exist; expected 0..{self.num_prototypes - 1}")
        if ablation.groups and not self.grouped:
            raise ExploreError("this model has no groups (ProtoSeg or stage 1): only prototypes can be switched off")
        bad_g = sorted(g for g in ablation.groups if not 0 <= g < self.num_groups)
        if bad_g:
            raise ExploreError(f"group(s) {bad_g} do not exist; expected 0..{self.num_groups - 1}")

    def ablate(self, ablation: Ablation) -> DecisionTables:
        """The tables with ``ablation`` applied (see the module docstring); an empty ablation returns ``self``."""
        self.check(ablation)
        if ablation.empty:
            return self
        last = self.last_layer.clone()
        if not self.grouped:
            last[:, sorted(ablation.prototypes)] = 0
            return DecisionTables(self.prototype_class, self.prototype_scale, last, mode=self.mode)
        w = self.group_weight.clone()  # type: ignore[union-attr]
        before = w.sum(1)
        w[:, sorted(ablation.prototypes)] = 0
        after = w.sum(1)
        touched = after < before
        w[touched] = w[touched] / after[touched].clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(1)
        off = (after <= 0) & (before > 0)
        off[sorted(ablation.groups)] = True
        w[off] = 0
        last[:, off] = 0
        return DecisionTables(self.prototype_class, self.prototype_scale, last, w, self.group_class, self.mode)

    # -- scores --------------------------------------------------------------------------------------------------
    def _terms(self, activations: torch.Tensor) -> torch.Tensor:
        """What the group weights multiply: the activations (``ratio``) or their floored log (``geometric``)."""
        if self.mode == "geometric":
            return torch.log(activations.clamp_min(GEOMETRIC_FLOOR))
        return activations

    def group_activations(self, activations: torch.Tensor) -> torch.Tensor:
        """(G, ...) group activations (Eq. 2) from prototype activations (P, ...)."""
        if self.group_weight is None:
            raise ExploreError("this model has no groups (ProtoSeg or stage 1)")
        t = self._terms(activations)
        return torch.exp(torch.tensordot(self.group_weight, t, dims=([1], [0])))

    def logits(self, activations: torch.Tensor) -> torch.Tensor:
        """(C, ...) class scores from prototype activations (P, ...): a gather and two products, no forward pass."""
        a = activations.float()
        inner = self.group_activations(a) if self.grouped else a
        return torch.tensordot(self.last_layer, inner, dims=([1], [0]))

    def decompose(self, activations: torch.Tensor, classes: Iterable[int]) -> dict[str, Any]:
        """The score of each of ``classes`` at one cell as a sum of group (or prototype) terms.

        ``activations``: (P,) at the cell. Returns ``{"logits": [C], "classes": [{class, logit, terms, total}]}``;
        each term has its weight, activation and contribution; group terms also list their prototypes with their
        simplex weight, scale, activation and share of ``log a_g``. ``total`` (the sum of the contributions) equals
        ``logit`` up to float round-off.
        """
        a = activations.double()
        last = self.last_layer.double()
        out: dict[str, Any] = {"logits": [], "classes": []}
        members: list[list[dict[str, Any]]] = []
        if self.grouped:
            w = self.group_weight.double()  # type: ignore[union-attr]
            t = self._terms(a)
            log_g = w @ t
            inner = torch.exp(log_g)
            for g in range(w.shape[0]):
                nz = torch.nonzero(w[g] > 0).flatten().tolist()
                members.append(
                    [
                        {
                            "prototype": p,
                            "class": int(self.prototype_class[p]),
                            "scale": int(self.prototype_scale[p]),
                            "weight": float(w[g, p]),
                            "activation": float(a[p]),
                            "log_contribution": float(w[g, p] * t[p]),
                        }
                        for p in sorted(nz, key=lambda p: -float(w[g, p] * t[p]))
                    ]
                )
        else:
            inner = a
        logits = last @ inner
        out["logits"] = [float(v) for v in logits]
        for c in classes:
            c = int(c)
            if not 0 <= c < self.num_classes:
                raise ExploreError(f"class {c} does not exist; expected 0..{self.num_classes - 1}")
            contrib = last[c] * inner
            terms = []
            for j in range(len(inner)):
                if last[c, j] == 0:
                    continue
                term: dict[str, Any] = {
                    "weight": float(last[c, j]),
                    "activation": float(inner[j]),
                    "contribution": float(contrib[j]),
                }
                if self.grouped:
                    term.update(
                        group=j,
                        group_class=int(self.group_class[j]),  # type: ignore[index]
                        log_activation=float(log_g[j]),
                        prototypes=members[j],
                    )
                else:
                    term.update(
                        prototype=j, prototype_class=int(self.prototype_class[j]), scale=int(self.prototype_scale[j])
                    )
                terms.append(term)
            terms.sort(key=lambda e: -abs(e["contribution"]))
            out["classes"].append(
                {"class": c, "logit": float(logits[c]), "total": float(sum(contrib.tolist())), "terms": terms}
            )
        return out
