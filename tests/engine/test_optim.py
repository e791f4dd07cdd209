"""build_optimizer: Adam or SGD per stage, weight decay on convolution kernels and (optionally) biases, bias rates."""

import pytest
import torch
from torch import nn

from scaleprotoseg.config import StageConfig, default_stages, load_config
from scaleprotoseg.engine.optim import build_optimizer
from scaleprotoseg.models.heads import DeepLabV2Head, ScaleProtoSegHead
from scaleprotoseg.models.segmenter import Segmenter


class TinyBackbone(nn.Module):
    out_channels = 8
    output_stride = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def _groups(model, stage):
    model.set_trainable(stage.trainable)
    opt = build_optimizer(model, stage)
    return opt, {g["name"]: g for g in opt.param_groups}


def test_deeplabv2_gets_deeplabs_sgd_recipe():
    """SGD, momentum 0.9; backbone 2.5e-4 and classifier (ASPP) 10x with weight decay 5e-4; ASPP biases 20x without
    decay; batch norm (frozen or not) never decayed."""
    model = Segmenter(TinyBackbone(), DeepLabV2Head(8, 3, rates=(1, 2)))
    opt, g = _groups(model, default_stages("deeplabv2")["train"])
    assert isinstance(opt, torch.optim.SGD) and all(x["momentum"] == 0.9 for x in opt.param_groups)
    assert (g["backbone"]["lr"], g["backbone"]["weight_decay"]) == (2.5e-4, 5e-4)
    assert (g["aspp"]["lr"], g["aspp"]["weight_decay"]) == (2.5e-3, 5e-4)
    assert (g["aspp_bias"]["lr"], g["aspp_bias"]["weight_decay"]) == (5e-3, 0.0)
    assert g["backbone_nodecay"]["weight_decay"] == 0.0  # batch norm
    assert {id(p) for p in g["aspp_bias"]["params"]} == {id(b.bias) for b in model.head.aspp.branches}


def test_prototype_stages_decay_the_aspp_biases_as_the_release():
    model = Segmenter(TinyBackbone(), ScaleProtoSegHead(8, 3, rates=(1, 2), dim=4))
    opt, g = _groups(model, default_stages("scaleprotoseg")["joint"])
    assert isinstance(opt, torch.optim.Adam)
    assert (g["aspp_bias"]["lr"], g["aspp_bias"]["weight_decay"]) == (2.5e-4, 5e-4)
    assert (g["aspp"]["lr"], g["aspp"]["weight_decay"]) == (2.5e-4, 5e-4)
    assert g["prototypes_nodecay"]["weight_decay"] == 0.0
    _, kept = _groups(model, StageConfig(trainable=["aspp"], lr={"aspp": 1e-3}, bias_decay=False))
    assert kept["aspp_bias"]["weight_decay"] == 0.0 and kept["aspp"]["weight_decay"] == 5e-4


def test_sgd_step_is_plain_momentum_sgd_with_decay():
    torch.manual_seed(0)
    model = Segmenter(TinyBackbone(), DeepLabV2Head(8, 3, rates=(1,)))
    stage = StageConfig(trainable=["aspp"], lr={"aspp": 0.1}, optimizer="sgd", momentum=0.9, bias_lr_factor=2.0)
    opt, _ = _groups(model, stage)
    conv = model.head.aspp.branches[0]
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    model(torch.rand(1, 3, 8, 8)).logits.sum().backward()
    gw, gb = conv.weight.grad.clone(), conv.bias.grad.clone()
    opt.step()
    torch.testing.assert_close(conv.weight.detach(), w0 - 0.1 * (gw + 5e-4 * w0))
    torch.testing.assert_close(conv.bias.detach(), b0 - 0.2 * (gb + 5e-4 * b0))


def test_paper_configs_choose_the_optimizer_per_method():
    from pathlib import Path

    root = Path(__file__).parents[2] / "configs"
    for name in ("cityscapes", "pascal_voc", "ade20k", "coco_stuff"):
        st = load_config(root / name / "deeplabv2.yaml").train.stages["train"]
        assert (st.optimizer, st.momentum, st.schedule, st.lr["backbone"], st.lr["aspp"]) == (
            "sgd",
            0.9,
            "poly",
            2.5e-4,
            2.5e-3,
        ), name
        assert load_config(root / name / "deeplabv2.yaml").model.freeze_bn
        assert load_config(root / name / "scaleprotoseg.yaml").train.stages["joint"].optimizer == "adam"
    # the CPU sample configs keep the Adam settings their results were measured with
    sample = load_config(root / "samples" / "nuclei_deeplabv2.yaml").train.stages["train"]
    assert (sample.optimizer, sample.bias_decay, sample.bias_lr_factor) == ("adam", False, 1.0)
    assert not load_config(root / "samples" / "nuclei_scaleprotoseg.yaml").train.stages["joint"].bias_decay


def test_bad_optimizer_settings_are_config_errors():
    from scaleprotoseg.config import ConfigError

    with pytest.raises(ConfigError, match="expected one of 'adam', 'sgd'"):
        load_config(None, ["train.stages.joint.optimizer=rmsprop"])
    with pytest.raises(ConfigError, match="momentum"):
        load_config(None, ["train.stages.joint.optimizer=sgd", "train.stages.joint.momentum=1.5"])
