"""``evaluate_split``: the one evaluation ``scaleprotoseg evaluate`` and the report share (results, plots, summary)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from scaleprotoseg.models.heads import ModelOutput

C = 3


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.conv(x))


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(3, 12, 10, generator=g), "label": torch.randint(0, C, (12, 10), generator=g), "index": i}
        for i in range(4)
    ]


def test_evaluate_split_writes_results_plots_and_summary(tmp_path):
    from scaleprotoseg.evaluation.evaluate import evaluate
    from scaleprotoseg.evaluation.inference import InferenceSettings
    from scaleprotoseg.evaluation.split import evaluate_split, inference_text

    torch.manual_seed(0)
    model, ds = _Model(), _dataset()
    names = [f"c{i}" for i in range(C)]
    done = evaluate_split(
        model, ds, class_names=names, out_dir=tmp_path / "ev", progress=False, summary={"split": "val", "stage": "x"}
    )
    files = {p.name for p in (tmp_path / "ev").iterdir()}
    assert files >= {"metrics.json", "per_class_iou.csv", "confusion_matrix.csv", "confusion_matrix.png"}
    assert files >= {"per_class_iou.png", "summary.json"}
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["split"] == "val" and summary["stage"] == "x" and summary["inference"]["mode"] == "whole"
    ref = evaluate(model, ds, num_classes=len(names), progress=False)
    assert summary["miou"] == pytest.approx(ref["miou"]) and summary["num_images"] == ref["num_images"]
    np.testing.assert_array_equal(np.asarray(done.result["matrix"]), np.asarray(ref["matrix"]))
    assert int(np.asarray(ref["matrix"]).sum()) == 4 * 12 * 10
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(summary["miou"])
    nothing = evaluate_split(model, ds, class_names=names, out_dir=None, progress=False)
    assert nothing.out_dir is None and nothing.summary["miou"] == pytest.approx(summary["miou"])
    assert inference_text(InferenceSettings()) == "whole images"
    flip = InferenceSettings(mode="sliding", test_size=512, msc_scales=(0.5, 1.0), flip=True)
    assert inference_text(flip) == "sliding 512 px, scales 0.5, 1 (features fused), flip"
