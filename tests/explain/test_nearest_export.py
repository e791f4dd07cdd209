"""export_final_nearest: the step after training that writes final/nearest/, a note instead of an error on failure."""

import json
import shutil

from scaleprotoseg.config import load_config, save_config
from scaleprotoseg.explain.nearest import export_final_nearest
from scaleprotoseg.rundir import RunDir


def test_writes_final_nearest_and_notes_failures(explain_runs, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(explain_runs["protoseg"] / "final", run.final)
    shutil.rmtree(run.checkpoint().nearest)
    assert export_final_nearest(run) == run.checkpoint().nearest
    man = json.loads((run.checkpoint().nearest / "manifest.json").read_text())
    assert man["k"] == 3 and man["prototypes"]

    cfg = load_config(run.checkpoint().config)
    cfg.data.root = str(tmp_path / "gone")
    save_config(cfg, run.checkpoint().config)
    assert export_final_nearest(run) is None
    assert "could not save nearest training patches" in run.checkpoint().error_note("nearest").read_text()
    assert (run.checkpoint().nearest / "manifest.json").is_file()  # the earlier export is kept
    assert sorted(p.name for p in run.final.iterdir() if p.name.startswith(".")) == []

    run.checkpoint().projection.unlink()  # no projected prototypes (e.g. DeepLabv2): nothing to export
    assert export_final_nearest(run) is None
