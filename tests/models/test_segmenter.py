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


def _tiny_segmenter(method: str = "scaleprotoseg"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        method=method,
        backbone="unet",
        output_stride=1,
        freeze_bn=False,
        backbone_options={"base_channels": 4},
        aspp_rates=[1, 2],
        aspp_channels=4,
        prototypes_per_class=2,
    )
    return build_model(cfg, num_classes=3).eval()


def test_msc_features_fusion_max_fuses_the_aspp_outputs():
    """The release's multi-scale inputs: the ASPP outputs (before the sigmoid) of the scaled images are resized
    bilinearly to the largest grid and max-fused; the head then runs on the fused features."""
    import torch.nn.functional as F

    from scaleprotoseg.models.segmenter import msc_forward

    model = _tiny_segmenter()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        outs, fused = msc_forward(model, x, [0.5, 1.0])
        small = model.head.aspp(model.backbone(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)))
        big = model.head.aspp(model.backbone(x))
        up = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
        want = model.head.forward_aspp(torch.maximum(up, big))
        torch.testing.assert_close(outs[0].logits, model.head.forward_aspp(small).logits)
        torch.testing.assert_close(fused.logits, want.logits)
        torch.testing.assert_close(fused.distances, want.distances)
        torch.testing.assert_close(model.msc_logits(x, [0.5, 1.0]), want.logits, rtol=1e-5, atol=1e-5)
        _, by_logits = msc_forward(model, x, [0.5, 1.0], fusion="logits")
    assert not torch.allclose(by_logits.logits, fused.logits)  # the two fusions are different models
    with pytest.raises(ValueError, match="fusion"):
        msc_forward(model, x, [0.5, 1.0], fusion="mean")  # type: ignore[arg-type]
