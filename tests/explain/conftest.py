"""One tiny trained ScaleProtoSeg run and one ProtoSeg run per test session, their explanations and a report."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def swapped_label(pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, set[int]]:
    """A ground truth that swaps the most predicted class a with b = (a + 1) % C: every pixel of a and b is then
    wrong (IoU 0), the other classes stay perfect. Returns the label and the classes that must fail."""
    values, counts = np.unique(pred, return_counts=True)
    a = int(values[np.argmax(counts)])
    b = (a + 1) % num_classes
    label = pred.copy()
    label[pred == a] = b
    label[pred == b] = a
    return label, {c for c in (a, b) if (label == c).any()}


@pytest.fixture(scope="session")
def swap_label():
    """:func:`swapped_label` for the tests."""
    return swapped_label


@pytest.fixture(scope="session")
def explain_runs(tmp_path_factory):
    """``{"root", "scaleprotoseg", "protoseg"}``: the synthetic folder dataset and two trained runs."""
    import torch

    from scaleprotoseg.engine.trainer import Trainer

    write_synthetic_folder = _load(TESTS / "conftest.py", "_sps_tests_conftest").write_synthetic_folder
    tiny_config = _load(TESTS / "engine" / "test_trainer.py", "_sps_tests_trainer").tiny_config
    base = tmp_path_factory.mktemp("explain_runs")
    root = write_synthetic_folder(base / "synthetic")
    out = {"root": root}
    torch.set_num_threads(2)
    for method in ("scaleprotoseg", "protoseg"):
        torch.manual_seed(0)
        run = base / f"run_{method}"
        Trainer(tiny_config(root, method), run, device="cpu", progress=False).run_stages()
        out[method] = run
    return out


@pytest.fixture(scope="session")
def explained(explain_runs, tmp_path_factory):
    """``explain_image`` on a validation image of each run, with a ground truth that makes two classes fail.

    ``{method: {"manifest", "out", "predictor", "image", "label", "failing", "run"}}``.
    """
    from scaleprotoseg.data.io import read_image
    from scaleprotoseg.explain.explainer import explain_image
    from scaleprotoseg.predict import Predictor

    image = read_image(explain_runs["root"] / "images" / "img06.png")
    results = {}
    for method in ("scaleprotoseg", "protoseg"):
        run = explain_runs[method]
        predictor = Predictor.from_run(run, device="cpu")
        pred = predictor.predict(image)
        label, failing = swapped_label(pred, len(predictor.class_names))
        out = tmp_path_factory.mktemp(f"explain_{method}")
        manifest = explain_image(predictor, image, out, label=label, run_dir=run, name="img06")
        results[method] = {
            "manifest": manifest,
            "out": out,
            "predictor": predictor,
            "image": image,
            "label": label,
            "failing": failing,
            "run": run,
        }
    return results


@pytest.fixture(scope="session")
def scaleprotoseg_report(explain_runs):
    """``scaleprotoseg report`` of the ScaleProtoSeg run (one explained validation image), via the CLI."""
    from scaleprotoseg.cli import main

    run = explain_runs["scaleprotoseg"]
    (run / "analysis").mkdir(exist_ok=True)
    (run / "analysis" / "sparsity.json").write_text(
        '{"tau": 0.005, "mean": 3.5, "per_class": [{"class": "square", "active": 4}, {"class": "disc", "active": 3}]}'
    )
    import shutil

    shutil.copy(run / "final" / "prototypes" / "proto_0000.png", run / "analysis" / "sparsity_hist.png")
    assert main(["report", str(run), "--images", "1", "--device", "cpu"]) == 0
    return run / "report" / "index.html"
