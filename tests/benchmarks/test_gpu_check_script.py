import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """The GPU check's plumbing (every benchmark, training all stages, evaluation) with DEVICE=cpu QUICK=1."""
    samples = tmp_path / "samples"
    build = [sys.executable, "-m", "scaleprotoseg", "data", "samples", "--out", str(samples), "--only", "nuclei"]
    subprocess.run(build, check=True, cwd=REPO, capture_output=True)
    out = tmp_path / "gpu"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "SAMPLES": str(samples), "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "!! failed" not in res.stdout
    assert json.loads((out / "inference.json").read_text())["equality_checks_passed"] is True
    assert (out / "fp32" / "train_step.json").is_file()
    summary = json.loads((out / "eval" / "metrics.json").read_text())
    assert 0.0 <= summary["miou"] <= 1.0
