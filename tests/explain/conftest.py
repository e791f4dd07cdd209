"""One tiny trained ScaleProtoSeg run and one ProtoSeg run per test session, their explanations and a report."""

import numpy as np
import pytest


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
def explain_runs(trained_runs):
    """``{"root", "scaleprotoseg", "protoseg"}``: the synthetic folder dataset and two trained runs."""
    return trained_runs


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
def scaleprotoseg_report(explain_runs, tmp_path_factory):
    """``scaleprotoseg report`` of a copy of the ScaleProtoSeg run (one explained validation image, an analysis JSON
    with a figure, a train-split evaluation that must not become the headline), via the CLI."""
    import shutil

    from scaleprotoseg.cli import main

    run = tmp_path_factory.mktemp("report_run") / "run"
    shutil.copytree(explain_runs["scaleprotoseg"], run)
    for sub in ("eval", "analysis", "report"):  # what other tests may have written into the shared run
        shutil.rmtree(run / sub, ignore_errors=True)
    assert main(["evaluate", str(run), "--split", "train", "--device", "cpu", "--no-progress", "--no-baselines"]) == 0
    assert main(["analyze", str(run), "components", "--device", "cpu", "--no-progress", "--max-images", "2"]) == 0
    (run / "analysis" / "sparsity.json").write_text(
        '{"tau": 0.005, "mean": 3.5, "per_class": [{"class": "square", "active": 4}, {"class": "disc", "active": 3}]}'
    )
    shutil.copy(run / "final" / "prototypes" / "proto_0000.png", run / "analysis" / "sparsity_hist.png")
    assert main(["report", str(run), "--images", "1", "--device", "cpu"]) == 0
    return run / "report" / "index.html"
