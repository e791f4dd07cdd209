"""Smoke tests of the benchmark scripts (benchmarks/): each runs in --quick mode, prints a table and writes JSON with
the expected keys, and the naive references agree with the library's vectorised code."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
MACHINE_KEYS = {"cpu", "cores", "torch_threads", "python", "torch", "device", "date", "command"}
QUICK = ["--quick", "--threads", "1"]


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _check_common(out: dict, path: Path, printed: str, name: str) -> dict:
    assert path.is_file(), f"{name}: no JSON written"
    data = json.loads(path.read_text())
    assert data["benchmark"] == name
    assert data["quick"] is True
    assert MACHINE_KEYS <= set(data["machine"]), set(data["machine"])
    assert data["machine"]["device"] == "cpu"
    assert data["table"].startswith("## ")
    assert "|---|" in printed and data["table"] in printed
    for t in data["targets"]:
        assert {"target", "value", "met"} <= set(t)
    assert out["json_path"] == str(path)
    return data


def test_inference_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("bench_inference")
    out = mod.main([*QUICK, "--out", str(tmp_path)])
    data = _check_common(out, tmp_path / "inference.json", capsys.readouterr().out, "inference")
    variants = [r["variant"] for r in data["models"]]
    assert variants == list(mod.VARIANTS) * 2  # 19 and 150 classes
    for r in data["models"]:
        assert {"median_s", "peak_mb", "delta_mb", "memory_method", "ratio_to_deeplabv2", "weights_mb"} <= set(r)
        assert r["median_s"] > 0
    thresholded = [r for r in data["models"] if r["variant"] == "thresholded"]
    assert all(0 < r["nonzero_per_group"] <= 4 for r in thresholded)
    assert data["equality_checks_passed"] is True
    parts = {"features -> logits", "features -> logits, maps kept", "activations -> logits"}
    assert {r["part"] for r in data["head"]} == parts
    assert all(r["allclose"] and r["speedup"] > 0 for r in data["head"])
    assert len(data["targets"]) == 3  # two model ratios (n/a without ResNet-101) and the head speed-up


def test_train_step_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("bench_train_step")
    out = mod.main([*QUICK, "--profile", "3", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    data = _check_common(out, tmp_path / "train_step.json", printed, "train_step")
    assert "profile of 3 steps: DeepLabv2" in printed and "profile of 3 steps: ScaleProtoSeg stage 1" in printed
    assert "float32, optimizer step included" in printed
    steps = {r["stage"]: r for r in data["steps"] if "no_grad" not in r["step"]}
    assert set(steps) == {"train", "joint", "group_joint"}
    assert steps["joint"]["losses"] == ["ce", "diversity", "l1_proto"]
    assert steps["group_joint"]["trainable"] == ["groups", "last_layer"]
    # a frozen backbone is not recorded by autograd, and stage 1 does train it
    assert steps["group_joint"]["backbone_output_requires_grad"] is False
    assert steps["group_joint"]["features_require_grad"] is False
    assert steps["joint"]["backbone_output_requires_grad"] is True
    for r in data["steps"]:
        assert r["median_s"] > 0 and r["ratio_to_deeplabv2"] > 0
        assert all(v == v for v in r["last_losses"].values())  # finite, not NaN


def test_diversity_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("bench_diversity")
    out = mod.main([*QUICK, "--out", str(tmp_path)])
    data = _check_common(out, tmp_path / "diversity.json", capsys.readouterr().out, "diversity")
    assert data["equality_checks_passed"] is True
    assert [r["shape"] for r in data["shapes"]] == ["cityscapes", "ade20k"]
    for r in data["shapes"]:
        assert r["value_abs_diff"] <= 1e-5
        assert 0 < r["value_ours"] < 1
        assert r["ours_s"] > 0 and r["naive_s"] > 0
    assert [r["prototypes"] for r in data["shapes"]] == [228, 1800]


def test_projection_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("bench_projection")
    out = mod.main([*QUICK, "--out", str(tmp_path)])
    data = _check_common(out, tmp_path / "projection.json", capsys.readouterr().out, "projection")
    assert [r["images"] for r in data["runs"]] == [2, 4, 8]
    for r in data["runs"]:
        assert r["images_per_s"] > 0 and r["peak_mb"] > 0 and r["prototypes"] == 228
    assert {"peak_slope_mb_per_image", "delta_slope_mb_per_image", "memory_flat"} <= set(data)


def test_explore_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("bench_explore")
    out = mod.main(QUICK + ["--out", str(tmp_path), "--classes", "2"])
    data = _check_common(out, tmp_path / "explore.json", capsys.readouterr().out, "explore")
    (case,) = data["cases"]
    assert case["classes"] == 2 and case["prototypes"] == 24 and case["groups"] == 6
    assert all(case[k] > 0 for k in ("open_s", "click_s", "switch_off_s"))
    assert len(data["targets"]) == 2 and all(isinstance(t["met"], bool) for t in data["targets"])


def test_run_all_collects_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_all passes the options through and prints every table; the scripts run in-process here (fast)."""
    mod = _load("run_all")
    calls = []
    real_run = mod.subprocess.run

    def fake_run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, **kwargs):
        if kwargs or not str(cmd[1]).endswith(".py"):  # not a benchmark script (e.g. machine info run alone)
            return real_run(cmd, cwd=cwd, env=env, **kwargs)
        assert env is not None and env["OMP_WAIT_POLICY"]
        calls.append(cmd)
        script = Path(cmd[1]).stem
        _load(script).main(cmd[2:])
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    out = mod.main(["--quick", "--threads", "1", "--only", "diversity,projection", "--out", str(tmp_path)])
    assert out["failed"] == []
    assert [Path(c[1]).name for c in calls] == ["bench_diversity.py", "bench_projection.py"]
    assert all("--quick" in c and "--device" in c and str(tmp_path) in c for c in calls)
    printed = capsys.readouterr().out
    assert "# All benchmark tables" in printed and "## Targets" in printed
    summary = (tmp_path / "summary.md").read_text()
    assert "Diversity loss" in summary and "Projection" in summary


@pytest.mark.slow
def test_run_all_subprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("run_all")
    out = mod.main(["--quick", "--threads", "1", "--only", "diversity", "--out", str(tmp_path)])
    assert out["failed"] == []
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "diversity.json").is_file()


def test_naive_diversity_matches_library_on_edge_cases() -> None:
    """Void cells, a class with a single cell (skipped) and an uneven layout after removing prototypes."""
    from scaleprotoseg.losses import diversity_loss
    from scaleprotoseg.models.prototypes import prototype_layout

    mod = _load("bench_diversity")
    g = torch.Generator().manual_seed(3)
    C, S = 4, 2
    cls, scale = prototype_layout(C, 3, S)
    # (class 0, scale 0) keeps 2 prototypes, (class 2, scale 0) keeps 1 (no pair)
    keep = torch.tensor([i for i in range(len(cls)) if i not in (1, 7, 8)])
    cls, scale = cls[keep], scale[keep]
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    labels[0, :2] = 255
    labels[1, 0, 0] = 3  # class 3 has one cell: no term
    for jeffreys in ("half", "full"):
        d1 = (torch.rand(2, len(cls), 6, 6, generator=g) * 3).requires_grad_(True)
        d2 = d1.detach().clone().requires_grad_(True)
        ours = diversity_loss(d1, labels, cls, scale, C, S, jeffreys=jeffreys)
        naive = mod.naive_diversity(d2, labels, cls, scale, C, S, jeffreys=jeffreys)
        assert abs(float(ours.detach()) - float(naive.detach())) <= 1e-6
        ours.backward()
        naive.backward()
        assert torch.allclose(d1.grad, d2.grad, atol=1e-7)


def test_reference_head_matches_library() -> None:
    from scaleprotoseg.models.heads import ScaleProtoSegHead

    mod = _load("bench_inference")
    g = torch.Generator().manual_seed(0)
    head = ScaleProtoSegHead(8, 5, dim=16, prototypes_per_class=2)
    head.enable_groups()
    nz = mod.sparse_groups_(head, 3, g)
    assert 0 < nz <= 3
    head.eval()
    feats = torch.rand(1, 64, 5, 7, generator=g)
    with torch.no_grad():
        ref = mod.reference_head(head, mod.reference_setup(head), feats)
        ours = mod.ours_head(head, feats)
    assert torch.allclose(ref, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "data/samples/nuclei/splits").is_dir(), reason="data/samples/nuclei missing")
def test_quality_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("quality")
    out = mod.main(["--quick", "--sets", "nuclei", "--seeds", "0", "--threads", "1", "--out", str(tmp_path)])
    data = _check_common(out, tmp_path / "quality.json", capsys.readouterr().out, "quality")
    assert {(r["method"], r["seed"]) for r in data["runs"]} == {(m, 0) for m in mod.METHODS}
    for r in data["runs"]:
        assert 0 <= r["val_miou"] <= 1
        assert (tmp_path / "quality" / "nuclei" / r["method"] / "seed0" / "final" / "model.safetensors").is_file()
    by = {r["method"]: r for r in data["runs"]}
    assert by["deeplabv2"]["sparsity"] is None and by["deeplabv2"]["prototypes_after_projection"] is None
    for m in ("protoseg", "scaleprotoseg"):
        assert by[m]["prototypes_after_projection"] >= by[m]["prototypes_after_grouping_or_pruning"] > 0
        assert by[m]["sparsity"] > 0
    assert {"val_miou_mean", "val_miou_std", "sparsity_mean"} <= set(data["summary"][0])
    base = data["baselines"]["nuclei"]
    assert set(base) == {"majority class", "Otsu threshold"}  # the forest is left out by --quick
    assert 0 < base["majority class"] < base["Otsu threshold"] <= 1


def _quality_payload(seconds: float, runs: list[tuple[str, int, float, float | None]]) -> dict:
    rows = [
        {
            "set": "nuclei",
            "method": method,
            "seed": seed,
            "run_dir": f"/runs/{method}/{seed}",
            "val_miou": miou,
            "train_miou": miou - 0.01,
            "val_miou_per_stage": {},
            "prototypes_initial": None,
            "prototypes_after_projection": None,
            "prototypes_after_grouping_or_pruning": None,
            "sparsity": None,
            "train_steps": 10,
            "seconds": secs,
            "seconds_per_step": None if secs is None else secs / 10,
        }
        for method, seed, miou, secs in runs
    ]
    baselines = {"nuclei": {"majority class": 0.35, "pixel forest": 0.95}}
    return {"benchmark": "quality", "quick": False, "runs": rows, "baselines": baselines, "total_seconds": seconds}


def test_quality_merge_combines_parallel_invocations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("quality")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_quality_payload(600.0, [("deeplabv2", 0, 0.90, 100.0), ("protoseg", 0, 0.80, 200.0)])))
    runs_b = [("protoseg", 0, 0.96, 300.0), ("protoseg", 1, 0.94, None), ("scaleprotoseg", 0, 0.97, 50.0)]
    b.write_text(json.dumps(_quality_payload(900.0, runs_b)))
    out = mod.main(["--merge", str(a), str(b), "--out", str(tmp_path / "merged"), "--threads", "1"])
    data = json.loads((tmp_path / "merged" / "quality.json").read_text())
    assert data == {k: v for k, v in out.items() if k != "json_path"}
    assert [(r["method"], r["seed"]) for r in data["runs"]] == [
        ("deeplabv2", 0),
        ("protoseg", 0),
        ("protoseg", 1),
        ("scaleprotoseg", 0),
    ]
    summary = {s["method"]: s for s in data["summary"]}
    assert summary["protoseg"]["val_miou_mean"] == pytest.approx(0.95)  # b's seed 0 replaced a's
    assert summary["protoseg"]["seconds_total"] is None  # one run's time is not known
    assert summary["scaleprotoseg"]["seconds_total"] == 50.0
    assert data["total_seconds"] == 900.0 and data["settings"]["merged_from"] == [str(a), str(b)]
    printed = capsys.readouterr().out
    assert "| nuclei | protoseg | 2 | 95.00 ± 1.41 |" in printed and "not pixel forest" in printed
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "inference"}))
    with pytest.raises(ValueError, match="is not a quality.json"):
        mod.main(["--merge", str(bad), "--out", str(tmp_path / "x")])
