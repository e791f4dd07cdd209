"""U-Net backbone (``unet``) after Ronneberger et al. (2015), used for the ISBI-2012 EM experiment.

Four down levels (max-pool 2x2) and four up levels (2x2 transposed conv halving the channels, concatenation with the
skip, two convs); channels ``c, 2c, 4c, 8c, 16c`` with ``c = base_channels`` (64 as in the paper: 64..1024). Each conv
is 3x3 with ``padding=1`` (the paper's are unpadded) followed by batch norm and ReLU, so the output has the input's
size: output stride 1, ``out_channels = base_channels``. The paper's final 1x1 classifier becomes, as in the authors'
release, a 1x1 convolution (``base_channels -> base_channels``, bias, no activation, PyTorch's default init) between
the U-Net and the ASPP (``out_conv=False`` leaves it out). Inputs whose sides are not multiples of 16 are zero-padded
bottom/right to the next multiple and the output is cropped back.
The EM experiment trains batch norm: build it with ``freeze_bn=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Backbone, register_backbone
from .weights import load_checked, read_state_dict

__all__ = ["UNet", "unet"]


class DoubleConv(nn.Sequential):
    """(conv 3x3 + BN + ReLU) x 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(Backbone):
    """U-Net feature extractor; ``forward`` returns ``(B, base_channels, H, W)``.

    Args:
        base_channels: channels of the first level (64 in the paper; small values for tests).
        in_channels: input channels (3: grey EM images are replicated to RGB by the data pipeline).
        freeze_bn: keep batch norm in eval mode with frozen affine parameters.
        bn_momentum: batch-norm momentum in PyTorch's convention (default 0.1).
        out_conv: end with the release's 1x1 convolution (64 -> 64 in the paper) before the ASPP.
    """

    depth = 4

    def __init__(
        self,
        *,
        base_channels: int = 64,
        in_channels: int = 3,
        freeze_bn: bool = True,
        bn_momentum: float = 0.1,
        out_conv: bool = True,
    ) -> None:
        super().__init__(freeze_bn=freeze_bn)
        if base_channels < 1:
            raise ValueError(f"base_channels must be positive, got {base_channels!r}")
        widths = [base_channels * 2**i for i in range(self.depth + 1)]
        self.output_stride = 1
        self.out_channels = base_channels
        self.inc = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(self.depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(self.depth))
        self.up_conv = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in range(self.depth))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_conv = nn.Conv2d(widths[0], widths[0], 1) if out_conv else None
        self.set_bn_momentum(bn_momentum)
        self.set_freeze_bn(freeze_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, base_channels, H, W) for any H, W >= 1."""
        h, w = x.shape[-2:]
        mult = 2**self.depth
        pad_h, pad_w = (-h) % mult, (-w) % mult
        if pad_h or pad_w:
            x = F.pad(x, [0, pad_w, 0, pad_h])
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for i in reversed(range(self.depth)):
            y = self.up_conv[i](torch.cat([skips.pop(), self.up[i](y)], dim=1))
        if self.out_conv is not None:
            y = self.out_conv(y)
        return y[..., :h, :w]


@register_backbone("unet")
def unet(
    *, output_stride: int | None = None, pretrained: str | None = None, freeze_bn: bool = True, **kwargs: object
) -> UNet:
    """U-Net (output stride 1, ``base_channels`` channels); ``pretrained`` may be a state dict saved from a UNet."""
    if output_stride not in (None, 1):
        raise ValueError(f"unet has output stride 1, got output_stride={output_stride!r}")
    if pretrained == "package":
        raise ValueError("pretrained='package' is only available for efficientnet_lite0, not unet")
    model = UNet(freeze_bn=freeze_bn, **kwargs)  # type: ignore[arg-type]
    if pretrained is not None:
        state = read_state_dict(pretrained)
        try:
            load_checked(model, state, source="U-Net weights")
        except ValueError as err:
            raise ValueError(f"{pretrained!r}: {err}") from err
    return model
