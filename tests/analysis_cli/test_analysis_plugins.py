"""The analyses as plug-ins: the registry, the shared pass of consistency and stability, and write/plot file names."""

import json

import numpy as np
import torch

from scaleprotoseg.analysis.context import AnalysisContext, AnalysisOptions
from scaleprotoseg.analysis.plots import new_figure
from scaleprotoseg.analysis.registry import METRICS, Analysis, analyses
from scaleprotoseg.analysis.results import MetricResult, jsonable
from scaleprotoseg.analysis.runner import run_metrics, save_result

CPU = torch.device("cpu")


def _parts_context(tiny_runs, metrics):
    options = AnalysisOptions(parts_dataset="folder_parts", parts_root=str(tiny_runs["parts"]), progress=False)
    return AnalysisContext.open(tiny_runs["scaleprotoseg"], CPU, options, metrics)


def _counting(ctx):
    calls = []
    forward = ctx.forward

    def counted(image):
        calls.append(tuple(image.shape))
        return forward(image)

    ctx.forward = counted
    return calls


def test_registry_lists_every_metric_once():
    found = analyses()
    assert tuple(found) == METRICS
    assert all(isinstance(a, Analysis) and a.name == m for m, a in found.items())


def test_consistency_and_stability_share_one_pass(tiny_runs):
    both = _parts_context(tiny_runs, ("consistency", "stability"))
    calls = _counting(both)
    results = {a.name: r for a, r in run_metrics(both, ["consistency", "stability"])}
    assert set(results) == {"consistency", "stability"}
    assert len(calls) == 2 * 2  # 2 val images, each clean and noisy, once for both metrics
    # stability alone: the same numbers, through its own pass (clean and noisy again)
    alone = _parts_context(tiny_runs, ("stability",))
    calls = _counting(alone)
    ((analysis, stability),) = run_metrics(alone, ["stability"])
    assert len(calls) == 4
    assert jsonable(stability.summary) == jsonable(results["stability"].summary)
    assert stability.rows == results["stability"].rows
    # consistency alone: the clean pass only
    alone = _parts_context(tiny_runs, ("consistency",))
    calls = _counting(alone)
    ((_, consistency),) = run_metrics(alone, ["consistency"])
    assert len(calls) == 2
    assert jsonable(consistency.summary) == jsonable(results["consistency"].summary)


class _Toy(Analysis):
    name = "toy"

    def compute(self, ctx):
        summary = {"x": np.float32(0.5), "gone": float("nan")}
        return MetricResult(self.name, "Toy", summary, ["a", "b"], [[1, 2.5], [None, float("nan")]])

    def figures(self, result):
        return {"": new_figure(1)[0], "detail": new_figure(2)[0], "skipped": None}


def test_write_and_plot_file_names(tmp_path):
    toy = _Toy()
    result = toy.compute(None)
    paths = save_result(toy, result, tmp_path / "out")
    names = {k: p.name for k, p in paths.items()}
    assert names == {"json": "toy.json", "csv": "toy.csv", "png": "toy.png", "png-detail": "toy-detail.png"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy-detail.png", "toy.csv", "toy.json", "toy.png"]
    assert json.loads(paths["json"].read_text()) == {"metric": "toy", "meta": {}, "x": 0.5, "gone": None}
    assert paths["csv"].read_text().splitlines() == ["a,b", "1,2.5", ","]
