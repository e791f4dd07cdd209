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


def test_gallery_files_must_resolve_inside_the_run(tmp_path):
    import json

    import pytest

    from scaleprotoseg.explain.resources import NearestGallery, PrototypeGallery, RunPathError, confine

    run = tmp_path / "run"
    d = run / "final" / "prototypes"
    d.mkdir(parents=True)
    (d / "proto_0000.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    (d / "link.png").symlink_to(tmp_path / "outside.png")
    files = {0: "proto_0000.png", 1: str(tmp_path / "outside.png"), 2: "../../../outside.png", 3: "link.png"}
    (d / "manifest.json").write_text(
        json.dumps({"prototypes": [{"prototype": p, "file": f} for p, f in files.items()]})
    )
    gallery = PrototypeGallery.load(d, run)
    assert gallery.path(0) == d / "proto_0000.png"
    for p in (1, 2, 3):
        with pytest.raises(RunPathError, match=rf"manifest.json: .* outside the run directory {run.resolve()}"):
            gallery.path(p)
    with pytest.raises(RunPathError):
        NearestGallery(d, {0: {}}, root=run).image("../../../outside.png")
    assert confine(d / "proto_0000.png", run) == d / "proto_0000.png"
