"""scripts/convert_resnet101.py: torchvision / DeepLab ResNet checkpoints to the backbone's weights file."""

import importlib.util
from pathlib import Path

import pytest
import torch

from scaleprotoseg.models.backbones import build_backbone
from scaleprotoseg.models.backbones.weights import read_state_dict

SCRIPT = Path(__file__).parents[2] / "scripts" / "convert_resnet101.py"


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_resnet101", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _t(value):
    return torch.full((2,), float(value))


def test_deeplab_keys_are_renamed_and_heads_dropped(convert):
    fake = {
        "base.layer1.conv1.conv.weight": _t(1),
        "base.layer1.conv1.bn.running_mean": _t(2),
        "base.layer2.block1.reduce.conv.weight": _t(3),
        "base.layer3.block2.conv3x3.bn.weight": _t(4),
        "base.layer5.block3.increase.conv.weight": _t(5),
        "base.layer2.block1.shortcut.bn.bias": _t(6),
        "base.layer4.block1.proj.conv.weight": _t(7),
        "base.aspp.c0.weight": _t(8),
        "base.fc8.weight": _t(9),
    }
    out, fmt = convert.convert_state_dict(fake)
    assert fmt == "deeplab"
    assert {k: int(v[0]) for k, v in out.items()} == {
        "conv1.weight": 1,
        "bn1.running_mean": 2,
        "layer1.0.conv1.weight": 3,
        "layer2.1.bn2.weight": 4,
        "layer4.2.conv3.weight": 5,
        "layer1.0.downsample.1.bias": 6,
        "layer3.0.downsample.0.weight": 7,
    }
    with pytest.raises(ValueError, match="neither backbone nor ASPP/fc: \\['base.layer1.extra'\\]"):
        convert.convert_state_dict({**fake, "base.layer1.extra": _t(0)})


def test_torchvision_keys_keep_their_names_without_fc(convert):
    out, fmt = convert.convert_state_dict({"conv1.weight": _t(1), "layer1.0.conv1.weight": _t(2), "fc.weight": _t(3)})
    assert fmt == "torchvision" and sorted(out) == ["conv1.weight", "layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="unrecognised ResNet weights"):
        convert.convert_state_dict({"encoder.stem.weight": _t(1)})


def test_end_to_end_file_loads_into_the_backbone(convert, tmp_path, capsys):
    """A nested torchvision-format ResNet-18 checkpoint (with fc) becomes a file the backbone loads strictly."""
    torch.manual_seed(0)
    source_model = build_backbone("resnet18")
    state = {**source_model.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    src = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, src)
    out = tmp_path / "weights" / "resnet18.safetensors"
    assert convert.main([str(src), str(out), "--depth", "18"]) == 0
    assert "from torchvision keys; loads strictly" in capsys.readouterr().out
    assert not any(k.startswith("fc.") for k in read_state_dict(out))
    loaded = build_backbone("resnet18", pretrained=str(out))
    assert torch.equal(loaded.layer4[1].conv2.weight, source_model.layer4[1].conv2.weight)
    # an existing output needs --overwrite; a file of the wrong depth fails the strict load, naming the keys
    assert convert.main([str(src), str(out), "--depth", "18"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert.main([str(src), str(tmp_path / "r50.pth"), "--depth", "50"]) == 1
    assert "cannot load the converted ResNet-50 weights" in capsys.readouterr().err
    assert not (tmp_path / "r50.pth").exists()
