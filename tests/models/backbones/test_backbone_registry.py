"""Registry behaviour of scaleprotoseg.models.backbones."""

from pathlib import Path

import pytest
import torch
from torch import nn

from scaleprotoseg.models.backbones import available_backbones, build_backbone, register_backbone, registry

BUILTIN = {"resnet101", "resnet50", "resnet18", "efficientnet_lite0", "unet"}


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register names without leaking them into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_builtin_names_are_registered() -> None:
    assert BUILTIN <= set(available_backbones())
    assert available_backbones() == sorted(available_backbones())


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as info:
        build_backbone("resnet9000")
    for name in BUILTIN:
        assert name in str(info.value)


def test_register_and_build_custom(scratch_registry: None) -> None:
    class Tiny(nn.Module):
        def __init__(self, output_stride: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, stride=output_stride, padding=1)
            self.out_channels = 5
            self.output_stride = output_stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    @register_backbone("tiny_test")
    def tiny(*, output_stride=None, pretrained=None, freeze_bn=True, **kwargs):
        return Tiny(output_stride or 2)

    assert "tiny_test" in available_backbones()
    model = build_backbone("tiny_test", output_stride=4)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 5, 4, 4)

    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny_test")(lambda **kw: Tiny(2))


def test_factory_must_set_attributes(scratch_registry: None) -> None:
    register_backbone("bad_test")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="out_channels"):
        build_backbone("bad_test")


def test_bad_output_stride_type() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet18", output_stride="8")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "unet"])
def test_bn_momentum_range(name: str) -> None:
    with pytest.raises(ValueError, match="bn_momentum"):
        build_backbone(name, bn_momentum=0.99 + 1)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "unet"])
def test_missing_weights_file_names_path(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.pth"
    kwargs = {"output_stride": 1} if name == "unet" else {}
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        build_backbone(name, pretrained=str(missing), **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "unet"])
def test_package_weights_only_for_efficientnet(name: str) -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone(name, pretrained="package")
