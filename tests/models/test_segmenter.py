"""All three models on every backbone: shapes on tiny inputs and gradients reaching exactly each stage's groups."""

import pytest
import torch

from scaleprotoseg.config import ModelConfig, default_stages
from scaleprotoseg.models.segmenter import build_model

BACKBONES = {
    "resnet101": dict(output_stride=8),
    "resnet50": dict(output_stride=16),
    "resnet18": dict(output_stride=8),
    "efficientnet_lite0": dict(output_stride=8),
    "unet": dict(output_stride=1, freeze_bn=False, backbone_options={"base_channels": 4}),
}


def _cfg(method, backbone):
    return ModelConfig(
        method=method,
        backbone=backbone,
        aspp_rates=[1, 2],
        aspp_channels=4,
        prototypes_per_class=2,
        groups_per_class=2,
        **BACKBONES[backbone],
    )


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", ["deeplabv2", "protoseg", "scaleprotoseg"])
def test_shapes_and_stage_gradients(method, backbone):
    torch.manual_seed(0)
    model = build_model(_cfg(method, backbone), num_classes=3)
    size = 16 if backbone == "unet" else 33
    x = torch.rand(2, 3, size, size)
    out = model(x)
    os_ = model.output_stride
    h = size if os_ == 1 else (size + os_ - 1) // os_
    assert out.logits.shape == (2, 3, h, h)
    if method != "deeplabv2":
        S = 2 if method == "scaleprotoseg" else 1
        assert out.features.shape == (2, S * 4, h, h)
        assert out.activations.shape == (2, 2 * 3 * S, h, h)
    for name, stage in default_stages(method).items():
        if stage.kind != "train":
            continue
        if "groups" in stage.trainable and not model.head.grouped:
            model.head.enable_groups()
        model.set_trainable(stage.trainable)
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(x).logits
        (logits * torch.randn_like(logits)).sum().backward()
        groups = model.param_groups()
        trained = {id(p) for g in stage.trainable for p in groups.get(g, []) if p.requires_grad}
        assert trained, (method, backbone, name)
        for pname, p in model.named_parameters():
            has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
            if id(p) in trained:
                assert p.grad is not None, (name, pname)
            else:
                assert not has_grad, (method, backbone, name, pname)
        if backbone != "unet":  # frozen batch norm never trains
            bn = [p for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
            assert bn and all(not p.requires_grad for p in bn)
