"""predict_logits: output sizes, sliding == whole for a pointwise model, short side, MSC max fusion, flip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleprotoseg.config import load_config
from scaleprotoseg.evaluation.inference import InferenceSettings, predict_logits, sliding_window_starts
from scaleprotoseg.models.heads import ModelOutput

C = 5


class StrideModel(nn.Module):
    """DeepLab-like contract: logits on a stride-8 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, stride=8, padding=1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.conv(x))


class PointwiseModel(nn.Module):
    """1x1 conv, no stride: translation-equivariant and local, so windows cannot change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.conv(x))


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("size", [(17, 23), (33, 31), (8, 8)])
def test_whole_output_size(size: tuple[int, int]) -> None:
    model = _model(StrideModel)
    x = torch.randn(2, 3, *size)
    out = predict_logits(model, x, mode="whole")
    assert out.shape == (2, C, *size) and out.dtype == torch.float32
    torch.testing.assert_close(out, _up(model(x).logits, size))


def test_sliding_window_starts_cover() -> None:
    assert sliding_window_starts(10, 16, 5) == [0]
    assert sliding_window_starts(16, 16, 5) == [0]
    assert sliding_window_starts(30, 16, 11) == [0, 11, 14]
    for length, window, stride in [(1024, 513, 342), (2048, 513, 342), (2048, 1024, 683), (100, 7, 3)]:
        starts = sliding_window_starts(length, window, stride)
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all() and starts[-1] == length - window and starts == sorted(set(starts))


@pytest.mark.parametrize(
    "size", [(9, 11), (12, 16), (31, 45)], ids=["smaller-than-window", "equal-to-window", "larger-than-window"]
)
@pytest.mark.parametrize("tile_batch_size", [1, 3])
def test_sliding_equals_whole_for_pointwise_model(size: tuple[int, int], tile_batch_size: int) -> None:
    model = _model(PointwiseModel)
    x = torch.randn(2, 3, *size)
    whole = predict_logits(model, x, mode="whole")
    sliding = predict_logits(model, x, mode="sliding", crop_size=(12, 16), tile_batch_size=tile_batch_size)
    assert sliding.shape == (2, C, *size)
    torch.testing.assert_close(sliding, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(sliding.argmax(1), whole.argmax(1))
    square = predict_logits(model, x, mode="sliding", test_size=10, stride=(4, 7))  # test_size: square window
    torch.testing.assert_close(square, whole, rtol=1e-5, atol=1e-5)


def test_sliding_averages_windows_of_strided_model() -> None:
    model = _model(StrideModel)
    x = torch.randn(1, 3, 24, 40)
    out = predict_logits(model, x, mode="sliding", crop_size=24, stride=16)  # windows at column 0 and 16
    left = _up(model(x[..., :24]).logits, (24, 24))
    right = _up(model(x[..., 16:]).logits, (24, 24))
    expected = torch.zeros(1, C, 24, 40)
    expected[..., :16] = left[..., :16]
    expected[..., 16:24] = 0.5 * (left[..., 16:] + right[..., :8])
    expected[..., 24:] = right[..., 8:]
    torch.testing.assert_close(out, expected)


def test_short_side_returns_original_size() -> None:
    model = _model(StrideModel)
    x = torch.randn(1, 3, 30, 50)
    out = predict_logits(model, x, mode="short_side", test_size=24)
    assert out.shape == (1, C, 30, 50)
    resized = _up(x, (24, 40))
    torch.testing.assert_close(out, _up(model(resized).logits, (30, 50)))


def test_msc_max_fusion() -> None:
    model = _model(StrideModel)
    x = torch.randn(2, 3, 33, 41)
    out = predict_logits(model, x, mode="whole", msc_scales=(0.5, 0.75, 1.0), msc_fusion="logits")
    parts = []
    for s in (0.5, 0.75, 1.0):
        xs = _up(x, (int(33 * s + 0.5), int(41 * s + 0.5))) if s != 1.0 else x  # 16.5 -> 17
        parts.append(_up(model(xs).logits, (33, 41)))
    torch.testing.assert_close(out, torch.stack(parts).amax(0))


def test_flip_average() -> None:
    model = _model(StrideModel)
    x = torch.randn(1, 3, 27, 35)
    out = predict_logits(model, x, flip=True, msc_scales=(0.5, 1.0), msc_fusion="logits")
    plain = predict_logits(model, x, msc_scales=(0.5, 1.0), msc_fusion="logits")
    flipped = predict_logits(model, x.flip(-1), msc_scales=(0.5, 1.0), msc_fusion="logits").flip(-1)
    torch.testing.assert_close(out, 0.5 * (plain + flipped))


def test_no_grad_and_invalid_arguments() -> None:
    model = _model(StrideModel)
    x = torch.randn(1, 3, 16, 16)
    assert not predict_logits(model, x).requires_grad
    as_dict = predict_logits(lambda t: {"logits": model(t).logits}, x)  # type: ignore[arg-type]
    torch.testing.assert_close(as_dict, predict_logits(model, x))
    with pytest.raises(ValueError, match="out.logits"):
        predict_logits(lambda t: SimpleNamespace(features=t), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, x, mode="tiles")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="test_size"):
        predict_logits(model, x, mode="short_side")
    with pytest.raises(ValueError, match="window"):
        predict_logits(model, x, mode="sliding")
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        predict_logits(model, x[0])
    with pytest.raises(ValueError, match="msc_scales"):
        predict_logits(model, x, msc_scales=(0.0,))
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(model, x, mode="sliding", crop_size=(0, 4))


def test_inference_settings_from_config_and_changes() -> None:
    """One record of the test protocol, built from the data config; command-line changes applied on top."""
    sets = ["data.test_mode=sliding", "data.crop_size=[12, 20]", "data.msc_scales=[0.5, 1]", "data.msc_fusion=logits"]
    data = load_config(None, sets).data
    settings = InferenceSettings.from_config(data)
    assert settings == InferenceSettings("sliding", (12, 20), None, 0, (0.5, 1.0), "logits", False, 4)
    assert InferenceSettings.from_config(data, flip=True, test_size=8).flip
    with pytest.raises(TypeError):
        InferenceSettings.from_config(data, msc=(1.0,))
    model = _model(StrideModel)
    image = torch.randn(1, 3, 24, 30)
    expected = predict_logits(
        model, image, mode="sliding", crop_size=(12, 20), msc_scales=(0.5, 1.0), msc_fusion="logits"
    )
    assert torch.equal(settings.logits(model, image), expected)
    assert not torch.equal(InferenceSettings().logits(model, image), expected)


def test_fixed_mode_resizes_to_a_square_and_back() -> None:
    """The release's Pascal VOC protocol: the image resized to S x S whatever its shape, the logits upsampled to the
    label's (the image's own) size."""
    model = _model(StrideModel)
    x = torch.randn(1, 3, 30, 50)
    out = predict_logits(model, x, mode="fixed", test_size=24)
    assert out.shape == (1, C, 30, 50)
    torch.testing.assert_close(out, _up(model(_up(x, (24, 24))).logits, (30, 50)))
    with pytest.raises(ValueError, match="side of the square"):
        predict_logits(model, x, mode="fixed")


def test_msc_feature_fusion_runs_the_head_once_on_fused_aspp_outputs() -> None:
    from scaleprotoseg.config import ModelConfig
    from scaleprotoseg.models.segmenter import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        method="scaleprotoseg",
        backbone="unet",
        output_stride=1,
        freeze_bn=False,
        backbone_options={"base_channels": 4},
        aspp_rates=[1, 2],
        aspp_channels=4,
        prototypes_per_class=2,
    )
    model = build_model(cfg, num_classes=C).eval()
    x = torch.randn(1, 3, 16, 20)
    out = predict_logits(model, x, msc_scales=(0.5, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(out, _up(model.msc_logits(x, (0.5, 1.0)), (16, 20)))
        fixed = predict_logits(model, x, mode="fixed", test_size=12, msc_scales=(0.5, 1.0))
        torch.testing.assert_close(fixed, _up(model.msc_logits(_up(x, (12, 12)), (0.5, 1.0)), (16, 20)))
    assert not torch.allclose(out, predict_logits(model, x, msc_scales=(0.5, 1.0), msc_fusion="logits"))
    with pytest.raises(ValueError, match="expected a Segmenter"):
        predict_logits(_model(StrideModel), x, msc_scales=(0.5, 1.0))
