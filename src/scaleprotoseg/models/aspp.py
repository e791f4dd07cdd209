"""Atrous spatial pyramid pooling (DeepLabv2), summed or concatenated per scale (section 3.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn


class ASPP(nn.Module):
    """Parallel 3x3 atrous convolutions, one per rate.

    ``mode="sum"`` adds the branches (DeepLabv2, ProtoSeg); ``mode="concat"`` stacks them along channels, scale-major,
    so that channels ``[s*D, (s+1)*D)`` are the features of scale ``s`` (ScaleProtoSeg). Scale 0 is the smallest rate.
    Weights are drawn from N(0, ``init_std``) (0.01 in DeepLabv2) and biases are 0. The output's scale at
    initialisation is ``init_std * sqrt(branches * 9 * in_channels) * feature scale``: 0.01 suits ReLU features of
    unit scale, while the signed stage outputs of EfficientNet-Lite0 (std about 6) give DeepLabv2 logits of std 5 and a
    CE of 4.3 for 2 classes at step 0 (``docs/results/learning.md``); the sample configs use 0.001.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        mode: Literal["sum", "concat"] = "sum",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if mode not in ("sum", "concat"):
            raise ValueError(f"ASPP mode {mode!r} is not valid; expected 'sum' or 'concat'")
        self.mode = mode
        self.rates = tuple(int(r) for r in rates)
        self.branch_channels = out_channels
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=init_std)
            nn.init.zeros_(conv.bias)

    @property
    def num_scales(self) -> int:
        return len(self.rates) if self.mode == "concat" else 1

    @property
    def out_channels(self) -> int:
        return self.branch_channels * self.num_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.mode == "concat":
            return torch.cat(outs, dim=1)
        return torch.stack(outs, dim=0).sum(dim=0)
