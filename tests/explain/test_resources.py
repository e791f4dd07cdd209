"""Galleries are read only for the model they were written from: final/, or the stage final/ was exported from."""

import json

from scaleprotoseg.explain.resources import load_galleries


def test_galleries_of_final_and_of_its_stage(explain_runs):
    run = explain_runs["protoseg"]
    for stage in (None, "final", "finetune"):  # finetune: the last stage, whose weights final/ holds
        gallery, nearest = load_galleries(run, stage)
        assert gallery.available and nearest.available and not gallery.problem and not nearest.problem
        assert nearest.k == 3 and gallery.patch(0) is not None


def test_other_checkpoints_have_none(explain_runs):
    gallery, nearest = load_galleries(explain_runs["protoseg"], "joint")
    assert not gallery.available and not nearest.available
    assert "stage 'joint' has none" in gallery.problem and "stage 'joint' has none" in nearest.problem
    gallery, nearest = load_galleries(None)
    assert "no run directory" in gallery.problem and "no run directory" in nearest.problem


def test_unreadable_manifests_are_problems_not_errors(explain_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(explain_runs["protoseg"] / "final", run / "final")
    (run / "final" / "prototypes" / "manifest.json").write_text("{")
    (run / "final" / "nearest" / "manifest.json").write_text(json.dumps({"k": 3}))
    gallery, nearest = load_galleries(run)
    assert "could not be read" in gallery.problem and "could not be read" in nearest.problem
    shutil.rmtree(run / "final" / "nearest")
    assert "does not exist" in load_galleries(run)[1].problem
