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
