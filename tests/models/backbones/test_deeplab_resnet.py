"""DeepLabv2 ResNet backbones: shapes, layout, batch-norm freezing and the two checkpoint formats."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from scaleprotoseg.models.backbones import (
    DeepLabResNet,
    build_backbone,
    load_deeplab_caffe_resnet,
    load_torchvision_resnet,
)


def _bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _randomise(model: nn.Module) -> None:
    """Give every tensor (BN running stats included) a distinctive value so round trips are meaningful."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                t.fill_(7)
            elif key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen))


def _ours_to_caffe(key: str, shortcut: str = "shortcut", prefix: str = "base.") -> str:
    """Inverse of the documented caffe -> ours mapping, written independently for the test."""
    stem = {"conv1.weight": "layer1.conv1.conv.weight"}
    if key in stem:
        return prefix + stem[key]
    if key.startswith("bn1."):
        return prefix + "layer1.conv1.bn." + key[len("bn1.") :]
    layer, block, rest = re.match(r"layer(\d)\.(\d+)\.(.+)", key).groups()
    head = f"{prefix}layer{int(layer) + 1}.block{int(block) + 1}."
    if rest.startswith("downsample."):
        idx, param = rest[len("downsample.") :].split(".", 1)
        return head + f"{shortcut}.{'conv' if idx == '0' else 'bn'}.{param}"
    module, param = rest.split(".", 1)
    branch = {"1": "reduce", "2": "conv3x3", "3": "increase"}[module[-1]]
    return head + f"{branch}.{module[:-1]}.{param}"


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet101", 2048), ("resnet50", 2048), ("resnet18", 512)],
)
@pytest.mark.parametrize(("output_stride", "side"), [(8, 9), (16, 5)])
def test_output_shapes(name: str, channels: int, output_stride: int, side: int) -> None:
    model = build_backbone(name, output_stride=output_stride).eval()
    assert model.out_channels == channels
    assert model.output_stride == output_stride
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
    assert out.shape == (1, channels, side, side)


@pytest.mark.parametrize(("size", "side"), [(513, 65), (321, 41)])
def test_deeplab_crop_sizes(size: int, side: int) -> None:
    # ResNet-18 shares the stem and stage strides of ResNet-101; it keeps the test fast.
    model = build_backbone("resnet18", output_stride=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape[-2:] == (side, side)


def test_deeplab_layout() -> None:
    model = build_backbone("resnet50", output_stride=8)
    first = model.layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)  # stride on the first 1x1
    assert first.downsample[0].stride == (2, 2)
    assert model.maxpool.ceil_mode
    for layer, dilation in ((model.layer1, 1), (model.layer2, 1), (model.layer3, 2), (model.layer4, 4)):
        assert all(block.conv2.dilation == (dilation, dilation) for block in layer)
        assert all(block.conv2.padding == (dilation, dilation) for block in layer)
    assert model.layer3[0].conv1.stride == (1, 1) and model.layer4[0].conv1.stride == (1, 1)
    os16 = build_backbone("resnet50", output_stride=16)
    assert os16.layer3[0].conv1.stride == (2, 2)
    assert all(block.conv2.dilation == (2, 2) for block in os16.layer4)
    v15 = build_backbone("resnet50", stride_in_1x1=False)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet50", output_stride=4)


def test_frozen_bn_stays_frozen_and_gradients_flow() -> None:
    model = build_backbone("resnet18", output_stride=8, freeze_bn=True)
    model.train()
    assert model.training
    assert all(not bn.training for bn in _bn_layers(model))
    assert all(not p.requires_grad for bn in _bn_layers(model) for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model(torch.randn(2, 3, 33, 33)).square().mean().backward()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(bn.weight.grad is None and bn.bias.grad is None for bn in _bn_layers(model))
    for conv in (model.conv1, model.layer1[0].conv1, model.layer4[-1].conv2):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_unfrozen_bn_trains() -> None:
    model = build_backbone("resnet18", freeze_bn=False, bn_momentum=0.3).train()
    assert all(bn.training and bn.momentum == 0.3 for bn in _bn_layers(model))
    mean_before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 33, 33)).mean().backward()
    assert not torch.equal(mean_before, model.bn1.running_mean)
    assert model.bn1.weight.grad is not None
    model.set_freeze_bn(True)
    assert not model.bn1.training and not model.bn1.weight.requires_grad


@pytest.fixture(scope="module")
def resnet50_state() -> dict[str, torch.Tensor]:
    source = DeepLabResNet(50, output_stride=8)
    _randomise(source)
    return {k: v.clone() for k, v in source.state_dict().items()}


@pytest.mark.parametrize(("depth", "suffix"), [(50, ".pth"), (18, ".safetensors")])
def test_torchvision_format_round_trip(
    tmp_path: Path, resnet50_state: dict[str, torch.Tensor], depth: int, suffix: str
) -> None:
    if depth == 50:
        state = resnet50_state
    else:
        source = DeepLabResNet(depth)
        _randomise(source)
        state = {k: v.clone() for k, v in source.state_dict().items()}
    foreign = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # old torchvision files
    channels = 2048 if depth == 50 else 512
    foreign["fc.weight"] = torch.randn(1000, channels)
    foreign["fc.bias"] = torch.randn(1000)
    path = tmp_path / f"resnet{depth}-imagenet{suffix}"
    if suffix == ".safetensors":
        save_file(foreign, str(path))
    else:
        torch.save(foreign, path)

    model = build_backbone(f"resnet{depth}", pretrained=str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(("prefix", "shortcut"), [("base.", "shortcut"), ("", "proj")])
def test_deeplab_caffe_format_round_trip(
    tmp_path: Path, resnet50_state: dict[str, torch.Tensor], prefix: str, shortcut: str
) -> None:
    state = resnet50_state
    foreign = {_ours_to_caffe(k, shortcut, prefix): v for k, v in state.items()}
    assert f"{prefix}layer2.block1.reduce.conv.weight" in foreign
    assert f"{prefix}layer5.block3.increase.bn.running_mean" in foreign
    assert f"{prefix}layer3.block1.{shortcut}.conv.weight" in foreign
    aspp = {f"{prefix}aspp.c{i}.weight": torch.randn(21, 2048, 3, 3) for i in range(4)}
    aspp.update({f"{prefix}aspp.c{i}.bias": torch.randn(21) for i in range(4)})
    foreign.update(aspp)
    path = tmp_path / "deeplabv2_resnet_msc.pth"
    torch.save(foreign, path)

    model = build_backbone("resnet50", pretrained=str(path))
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key

    extras = load_deeplab_caffe_resnet(model, foreign)
    assert set(extras) == set(aspp)
    assert all(torch.equal(extras[k], v) for k, v in aspp.items())


def test_loaders_are_strict() -> None:
    model = DeepLabResNet(18)
    state = dict(model.state_dict())
    missing = {k: v for k, v in state.items() if k != "layer3.1.conv2.weight"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer3.1.conv2.weight"):
        load_torchvision_resnet(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layer9.weight"):
        load_torchvision_resnet(model, {**state, "layer9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatches"):
        load_torchvision_resnet(model, {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ValueError, match="basic blocks"):
        load_deeplab_caffe_resnet(model, {})
    bottleneck = DeepLabResNet(50)
    caffe = {_ours_to_caffe(k): v for k, v in bottleneck.state_dict().items()}
    with pytest.raises(ValueError, match="neither backbone"):
        load_deeplab_caffe_resnet(bottleneck, {**caffe, "base.decoder.weight": torch.zeros(1)})
    del caffe["base.layer5.block3.conv3x3.conv.weight"]
    with pytest.raises(ValueError, match=r"layer4\.2\.conv2\.weight"):
        load_deeplab_caffe_resnet(bottleneck, caffe)


def test_unrecognised_file_format(tmp_path: Path) -> None:
    path = tmp_path / "weird.pt"
    torch.save({"encoder.stem.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="unrecognised ResNet weights"):
        build_backbone("resnet18", pretrained=str(path))


def test_caffe_input_transform() -> None:
    model = build_backbone("resnet18", input_transform="caffe").eval()
    seen = {}
    model.conv1.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].clone()))
    rgb = torch.tensor([200.0, 100.0, 50.0])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((rgb / 255 - mean) / std).view(1, 3, 1, 1).expand(1, 3, 9, 9)
    with torch.no_grad():
        model(x)
    expected = torch.tensor([50 - 104.008, 100 - 116.669, 200 - 122.675])
    torch.testing.assert_close(seen["x"][0, :, 4, 4], expected, atol=1e-3, rtol=0)
