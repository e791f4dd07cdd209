"""U-Net backbone: layout, same-size output for any input size, batch norm trained or frozen."""

from pathlib import Path

import pytest
import torch
from torch import nn

from scaleprotoseg.models.backbones import UNet, build_backbone


def test_paper_channel_layout() -> None:
    model = UNet()  # base 64: 64, 128, 256, 512, 1024
    assert model.out_channels == 64 and model.output_stride == 1
    assert model.inc[0].out_channels == 64
    assert [d[0].out_channels for d in model.down] == [128, 256, 512, 1024]
    assert [u.in_channels for u in model.up] == [128, 256, 512, 1024]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, nn.ConvTranspose2d)]
    convs.remove(model.out_conv)
    assert len(convs) == 18 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18


def test_release_1x1_convolution_before_the_aspp() -> None:
    """The release's U-Net ends with a 1x1 convolution (64 -> 64, bias, no activation) feeding the ASPP."""
    model = UNet(base_channels=4).eval()
    out = model.out_conv
    assert isinstance(out, nn.Conv2d) and out.kernel_size == (1, 1) and out.bias is not None
    assert (out.in_channels, out.out_channels) == (4, 4)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        model.out_conv = None
        torch.testing.assert_close(y, out(model(x)))
    assert UNet(base_channels=4, out_conv=False).out_conv is None


@pytest.mark.parametrize(("h", "w"), [(64, 64), (50, 37), (17, 1)])
def test_output_matches_input_size(h: int, w: int) -> None:
    model = build_backbone("unet", output_stride=1, base_channels=8, freeze_bn=False).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, h, w)).shape == (2, 8, h, w)


def test_default_output_stride_and_errors() -> None:
    assert build_backbone("unet", base_channels=4).output_stride == 1
    with pytest.raises(ValueError, match="output stride 1"):
        build_backbone("unet", output_stride=8, base_channels=4)


def test_trainable_bn_and_gradients() -> None:
    model = build_backbone("unet", base_channels=4, freeze_bn=False, bn_momentum=0.2).train()
    assert all(m.momentum == 0.2 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = model.inc[1].running_mean.clone()
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert not torch.equal(before, model.inc[1].running_mean)
    assert model.inc[1].weight.grad is not None
    assert model.inc[0].weight.grad is not None and model.inc[0].weight.grad.abs().sum() > 0
    assert model.up[-1].weight.grad is not None


def test_frozen_bn() -> None:
    model = build_backbone("unet", base_channels=4).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [bn.running_mean.clone() for bn in bns]
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    assert all(not bn.training and bn.weight.grad is None for bn in bns)
    assert all(torch.equal(s, bn.running_mean) for s, bn in zip(stats, bns))


def test_weights_round_trip(tmp_path: Path) -> None:
    source = UNet(base_channels=4)
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    path = tmp_path / "unet.pt"
    torch.save({"state_dict": source.state_dict()}, path)  # nested dicts are unwrapped
    model = build_backbone("unet", base_channels=4, pretrained=str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="shape mismatches"):
        build_backbone("unet", base_channels=8, pretrained=str(path))
