"""explain_image runs the backbone once per image when the test protocol is the plain forward pass (``whole``, no
multi-scale inputs, no flip, not tiled), and its prediction is :meth:`Predictor.predict`'s in every case."""

import dataclasses

import numpy as np
import pytest

from scaleprotoseg.data.io import read_image
from scaleprotoseg.explain.explainer import explain_image
from scaleprotoseg.predict import Predictor


@pytest.mark.parametrize("flip", [False, True], ids=["whole", "flip"])
@pytest.mark.parametrize("method", ["scaleprotoseg", "protoseg"])
def test_backbone_passes_and_the_prediction_written(explain_runs, tmp_path, method, flip):
    predictor = Predictor.from_run(explain_runs[method], device="cpu")
    settings = predictor.inference
    assert settings.mode == "whole" and not settings.msc_scales and not settings.flip
    if flip:
        predictor.inference = dataclasses.replace(settings, flip=True)
    image = read_image(explain_runs["root"] / "images" / "img06.png")
    expected = predictor.predict(image)
    calls = []
    hook = predictor.model.backbone.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    try:
        man = explain_image(predictor, image, tmp_path, views=["prototype_maps"])
    finally:
        hook.remove()
    # whole: one pass for the prediction and the maps; flip: the image and its mirror, then the maps
    assert len(calls) == (3 if flip else 1)
    palette = np.asarray(predictor.info.palette, np.uint8).reshape(-1, 3)
    assert len({tuple(c) for c in palette}) == len(palette)  # distinct colours: the written colours are the labels
    from PIL import Image

    written = np.asarray(Image.open(tmp_path / man["files"]["prediction"]).convert("RGB"))
    np.testing.assert_array_equal(written, predictor.colorize(expected))
    assert man["predicted_classes"] == [int(c) for c in np.unique(expected)]
    assert {c["index"]: c["pixels"] for c in man["classes"]} == {
        int(c): int((expected == c).sum()) for c in np.unique(expected)
    }
