"""Class-wise sparse grouping of prototypes g_group (section 3.2, Eq. 2).

Each class c owns ``N_c`` groups; group n of class c combines the prototypes of class c (all scales) with a row
``w_{g,c}^{(n,:)}`` on the probability simplex. All classes are computed in one batched product: the prototypes of
each class are gathered into a padded (C, K) index table (K = the largest |P_c|), padding carries zero weight, and a
single ``einsum`` gives every group of every class. There is no Python loop over classes or groups.

Two forms of the group activation are offered (``mode``):

- ``"ratio"`` (default, the form that produced the published numbers): ``exp(sum_m w_m * g_m)`` with ``g_m`` the
  activation of Eq. 1, i.e. the weighted geometric mean of the distance ratios (d + 1) / (d + eps); in [1, 1/eps].
- ``"geometric"`` (Eq. 2 as printed): ``prod_m g_m ** w_m = exp(sum_m w_m * log g_m)``, the weighted geometric mean
  of the activations themselves; in (0, log(1/eps)].

Initialisation follows the authors' release (a per-class ``nn.Linear(|P_c|, N_c)``): uniform in ``±1/sqrt(|P_c|)``,
then projected on the simplex, which leaves part of each row at exactly 0. Training is projected gradient descent:
the trainer calls :meth:`GroupingLayer.project_` after every optimizer step of a stage that trains the groups.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from scaleprotoseg.models.layout import padded_index
from scaleprotoseg.ops import at_least_float32, full_precision, project_simplex

GEOMETRIC_FLOOR = 1e-6  # activations are floored here before the log of the 'geometric' form


class GroupingLayer(nn.Module):
    """Sparse groups of same-class prototypes across scales (Eq. 2).

    ``forward(activations (B, P, h, w)) -> (B, C * N, h, w)``, groups ordered class-major (group ``c*N + n`` is
    group n of class c). ``weight`` is (C, N, K); entries outside ``member_mask`` are kept at exactly 0.
    """

    def __init__(
        self,
        prototype_class: torch.Tensor,
        num_classes: int,
        groups_per_class: int = 3,
        mode: Literal["ratio", "geometric"] = "ratio",
    ) -> None:
        super().__init__()
        if mode not in ("ratio", "geometric"):
            raise ValueError(f"group activation mode {mode!r} is not valid; expected 'ratio' or 'geometric'")
        self.num_classes = num_classes
        self.groups_per_class = groups_per_class
        self.mode = mode
        index, mask = padded_index(prototype_class.long(), num_classes)
        self.register_buffer("member_index", index)
        self.register_buffer("member_mask", mask)
        self.register_buffer(
            "group_class", torch.arange(num_classes, device=index.device).repeat_interleave(groups_per_class)
        )
        self.weight = nn.Parameter(self._project(self._linear_init()))

    def _linear_init(self) -> torch.Tensor:
        """Unprojected initial weights, as the release's per-class ``nn.Linear(|P_c|, N_c)``: uniform in
        ``±1/sqrt(|P_c|)`` (PyTorch's default linear init, fan-in = the class's own prototype count, not the padded
        width K). Drawn from the global RNG, so ``torch.manual_seed`` fixes it."""
        C, K = self.member_mask.shape
        size = self.member_mask.sum(-1).clamp_min(1).to(torch.float32)  # |P_c|
        bound = size.rsqrt().view(C, 1, 1)
        u = torch.rand(C, self.groups_per_class, K, device=self.member_mask.device)
        return (2 * u - 1) * bound

    def _row_mask(self) -> torch.Tensor:
        return self.member_mask.unsqueeze(1).expand_as(self.weight)

    def _project(self, w: torch.Tensor) -> torch.Tensor:
        mask = self.member_mask.unsqueeze(1).expand_as(w)
        empty = ~mask.any(dim=-1, keepdim=True)
        safe_mask = mask | empty  # classes without prototypes: project anything, then zero
        return torch.where(empty, torch.zeros_like(w), project_simplex(w, safe_mask))

    @torch.no_grad()
    def project_(self) -> None:
        """Project every row back onto the simplex (after each optimizer step: projected gradient descent)."""
        self.weight.copy_(self._project(self.weight))

    @torch.no_grad()
    def threshold_(self, alpha: float) -> int:
        """Set weights below ``alpha`` to 0 without renormalising (section 3.2, post-processing). Returns the count."""
        small = (self.weight < alpha) & (self.weight > 0)
        self.weight.masked_fill_(small, 0.0)
        return int(small.sum())

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.groups_per_class

    def dense_weight(self, num_prototypes: int) -> torch.Tensor:
        """The group-to-prototype weights as a dense (G, P) matrix (for analysis and plots)."""
        C, N, K = self.weight.shape
        dense = torch.zeros(C, N, num_prototypes, dtype=self.weight.dtype, device=self.weight.device)
        w = (self.weight * self._row_mask()).detach()
        dense.scatter_add_(2, self.member_index.unsqueeze(1).expand(C, N, K), w)
        return dense.reshape(C * N, num_prototypes)

    def used_prototypes(self) -> torch.Tensor:
        """Indices of prototypes with a non-zero weight in some group."""
        used = (self.weight > 0) & self._row_mask()
        return torch.unique(self.member_index.unsqueeze(1).expand_as(self.weight)[used])

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        B, P, h, w = activations.shape
        C, K = self.member_index.shape
        with full_precision(activations):  # float32 under autocast too: exp() of a bfloat16 sum is off by up to 4 %
            gathered = at_least_float32(activations).index_select(1, self.member_index.reshape(-1)).view(B, C, K, h * w)
            if self.mode == "geometric":
                gathered = torch.log(gathered.clamp_min(GEOMETRIC_FLOOR))
            weight = self.weight * self._row_mask()
            log_groups = torch.einsum("cnk,bckx->bcnx", weight, gathered)
            return torch.exp(log_groups).reshape(B, C * self.groups_per_class, h, w)

    @torch.no_grad()
    def remap_prototypes(self, keep: torch.Tensor, new_prototype_class: torch.Tensor) -> None:
        """Follow a removal of prototypes: ``keep`` lists the surviving old indices in their new order.

        Weights of surviving members move with them; weights of removed members are dropped (rows are not
        renormalised here: call :meth:`project_` if they must stay on the simplex).
        """
        device = self.weight.device
        keep = keep.to(device).long()
        C, N, _ = self.weight.shape
        num_old = int(max(int(self.member_index.max()), int(keep.max())) + 1)
        old_to_new = torch.full((num_old,), -1, dtype=torch.long, device=device)
        old_to_new[keep] = torch.arange(len(keep), device=device)
        index, mask = padded_index(new_prototype_class.long().to(device), self.num_classes)
        slot_of_new = torch.full((len(keep),), -1, dtype=torch.long, device=device)  # new prototype -> its column
        slot_of_new[index[mask]] = torch.nonzero(mask, as_tuple=True)[1]
        new_idx = old_to_new[self.member_index]
        alive = self.member_mask & (new_idx >= 0)
        c_idx, k_idx = torch.nonzero(alive, as_tuple=True)
        new_w = torch.zeros(C, N, index.shape[1], dtype=self.weight.dtype, device=device)
        new_w[c_idx, :, slot_of_new[new_idx[c_idx, k_idx]]] = self.weight[c_idx, :, k_idx]
        self.member_index = index
        self.member_mask = mask
        self.weight = nn.Parameter(new_w)

    def resize_to(self, member_index: torch.Tensor, member_mask: torch.Tensor) -> None:
        """Re-shape the layer to a saved membership before loading its weights."""
        self.member_index = member_index.clone().long()
        self.member_mask = member_mask.clone().bool()
        C, N = self.num_classes, self.groups_per_class
        self.weight = nn.Parameter(torch.zeros(C, N, member_index.shape[1], device=member_index.device))
