"""The prototype layer g_proto (Eq. 1) with per-prototype class and scale bookkeeping."""

from __future__ import annotations

import torch
from torch import nn

from scaleprotoseg.ops import (
    ACTIVATION_EPS,
    at_least_float32,
    full_precision,
    log_activation,
    multiscale_squared_distances,
    scale_counts,
)


def prototype_layout(num_classes: int, per_class: int, num_scales: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and scale of each prototype in the release's order: scale-major, then class, then the ``per_class``
    prototypes of that (scale, class) (Cityscapes: 4 x 19 x 3 = 228)."""
    scale = torch.arange(num_scales).repeat_interleave(num_classes * per_class)
    cls = torch.arange(num_classes).repeat_interleave(per_class).repeat(num_scales)
    return cls, scale


class PrototypeLayer(nn.Module):
    """Learnable prototypes ``p_{s,m}`` compared with the features of their own scale.

    ``forward(features (B, S*D, h, w)) -> (distances, activations)``, both (B, P, h, w); activations follow Eq. 1.
    Prototypes are initialised uniform in [0, 1), like the sigmoid features they are compared with.
    """

    def __init__(
        self,
        prototype_class: torch.Tensor,
        prototype_scale: torch.Tensor,
        dim: int,
        num_scales: int,
        eps: float = ACTIVATION_EPS,
    ) -> None:
        super().__init__()
        if prototype_class.shape != prototype_scale.shape:
            raise ValueError("prototype_class and prototype_scale must have the same shape")
        self.dim = dim
        self.num_scales = num_scales
        self.eps = eps
        self.prototypes = nn.Parameter(torch.rand(len(prototype_class), dim))
        self.register_buffer("prototype_class", prototype_class.clone().long())
        self.register_buffer("prototype_scale", prototype_scale.clone().long())
        self._scale_counts: list[int] | None = None
        self.refresh_layout()

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def scale_counts(self) -> list[int] | None:
        """Prototypes per scale (None if not scale-major), as of the last :meth:`refresh_layout`."""
        return self._scale_counts

    def refresh_layout(self) -> None:
        """Recount the prototypes per scale (read back to the host once, not at every forward pass); called by
        :meth:`keep` and :meth:`resize_to`, and needed after any other change of ``prototype_scale``."""
        self._scale_counts = scale_counts(self.prototype_scale, self.num_scales)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances and activations in float32, also under autocast (:func:`~scaleprotoseg.ops.full_precision`)."""
        with full_precision(features):
            d = multiscale_squared_distances(
                at_least_float32(features), self.prototypes, self.prototype_scale, self.num_scales, self.scale_counts()
            )
            return d, log_activation(d, self.eps)

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the prototypes at ``index`` (in that order); class and scale follow them."""
        index = index.to(self.prototypes.device).long()
        self.prototypes = nn.Parameter(self.prototypes.data.index_select(0, index).clone())
        self.prototype_class = self.prototype_class.index_select(0, index).clone()
        self.prototype_scale = self.prototype_scale.index_select(0, index).clone()
        self.refresh_layout()

    def resize_to(self, prototype_class: torch.Tensor, prototype_scale: torch.Tensor) -> None:
        """Re-shape the layer to a saved layout before loading its weights."""
        device = self.prototypes.device
        self.prototypes = nn.Parameter(torch.zeros(len(prototype_class), self.dim, device=device))
        self.prototype_class = prototype_class.clone().long().to(device)
        self.prototype_scale = prototype_scale.clone().long().to(device)
        self.refresh_layout()
