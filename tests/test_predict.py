"""Predictor: the same labels as the evaluate path, and a self-describing final/."""

import numpy as np
import torch

from scaleprotoseg.config import load_config
from scaleprotoseg.data.registry import build_dataset
from scaleprotoseg.evaluation.inference import predict_logits
from scaleprotoseg.predict import Predictor


def test_predict_equals_evaluate_labels(trained_runs):
    run = trained_runs["scaleprotoseg"]
    predictor = Predictor.from_run(run)
    cfg = load_config(run / "config.yaml")
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    for i in range(len(dataset)):
        item = dataset[i]
        image, _, _ = dataset.load_raw(i)
        # the evaluate path: normalised dataset tensor through predict_logits, argmax
        with torch.no_grad():
            ev = predict_logits(predictor.model, item["image"][None], mode=cfg.data.test_mode).argmax(1)[0].numpy()
        pred = predictor.predict(image)
        assert pred.shape == image.shape[:2]
        assert np.array_equal(pred, ev)


def test_predictor_needs_only_final(trained_runs, tmp_path):
    import shutil

    src = trained_runs["protoseg"]
    shutil.copytree(src / "final", tmp_path / "run" / "final")
    predictor = Predictor.from_run(tmp_path / "run")
    assert predictor.class_names == ["background", "square", "disc"]
    image = (np.random.default_rng(0).random((37, 45, 3)) * 255).astype(np.uint8)
    labels = predictor.predict(image)
    assert labels.shape == (37, 45) and labels.max() < 3
    assert predictor.colorize(labels).shape == (37, 45, 3)


def test_float_and_uint16_arrays_are_scaled_like_their_files(trained_runs):
    import pytest

    predictor = Predictor.from_run(trained_runs["scaleprotoseg"])
    image = (np.random.default_rng(1).random((33, 41, 3)) * 255).astype(np.uint8)
    expected = predictor.predict(image)
    assert np.array_equal(predictor.predict(image.astype(np.float32) / 255), expected)  # floats in [0, 1]
    assert np.array_equal(predictor.predict(image.astype(np.uint16) * 257), expected)  # 16-bit full range
    assert np.array_equal(predictor.predict(image.astype(np.float64)), expected)  # floats in 0..255
    with pytest.raises(ValueError, match=r"values in \[-1, 300\]; expected floats in \[0, 1\]"):
        predictor.predict(np.array([[[-1.0, 300.0, 0.0]]]))


def test_tiled_prediction_is_the_sliding_window_mode(trained_runs):
    """Above ``tile_above`` pixels the whole image is predicted in overlapping windows whose logits are averaged:
    exactly ``predict_logits(mode="sliding")``; away from the seams the labels match the whole-image ones."""
    run = trained_runs["scaleprotoseg"]
    whole = Predictor.from_run(run)
    tiled = Predictor.from_run(run, tile_size=64, tile_above=40 * 40)
    image = (np.random.default_rng(2).random((70, 90, 3)) * 255).astype(np.uint8)
    image[20:50, 30:60] = (200, 30, 30)
    assert tiled.tiled(70, 90) and not tiled.tiled(40, 40) and not whole.tiled(70, 90)
    x = tiled.preprocess(image)
    with torch.no_grad():
        sliding = predict_logits(tiled.model, x, mode="sliding", test_size=64, tile_batch_size=1)
    batches = []
    hook = tiled.model.backbone.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        assert torch.equal(tiled.logits(x), sliding)
    finally:
        hook.remove()
    assert batches and set(batches) == {1}  # one window per forward pass: memory bounded by one window
    same = tiled.predict(image) == whole.predict(image)
    assert same.mean() > 0.75 and same[20:50, 30:60].mean() > 0.9, (same.mean(), same[20:50, 30:60].mean())
