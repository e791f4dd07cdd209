import json
import shutil

import pytest
import torch

from scaleprotoseg.checkpoint import load_model
from scaleprotoseg.cli import main
from scaleprotoseg.data.io import read_image
from scaleprotoseg.explain.resources import load_galleries
from scaleprotoseg.explore.decision import Ablation, ExploreError
from scaleprotoseg.explore.edits import finetune_edit, list_edits, save_edit
from scaleprotoseg.explore.session import ExploreSession


@pytest.fixture
def run_copy(trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["scaleprotoseg"], run)
    return run


def _files(root):
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def test_an_edit_is_a_new_stage_that_predicts_what_the_what_if_showed(run_copy, trained_runs):
    session = ExploreSession.from_run(run_copy)
    used = torch.nonzero(session.tables.group_weight.sum(0) > 0).flatten().tolist()
    ablation = Ablation.of(used[:1], [1])
    before = _files(run_copy.parent)
    record = save_edit(run_copy, ablation, author="ann", reason="fires on the border")
    assert record.stage == "edit-001" and record.base == "final"
    assert (record.removed_prototypes, record.removed_groups) == (used[:1], [1])
    assert used[0] not in record.kept_prototypes and record.author == "ann" and record.created
    new = _files(run_copy.parent) - before
    assert new and all(str(p).startswith("run/checkpoints/edit-001/") for p in new)  # nothing written elsewhere
    assert json.loads((run_copy / "checkpoints/edit-001/edit.json").read_text())["reason"] == "fires on the border"

    loaded = load_model(run_copy, "edit-001")
    assert loaded.meta.stage == "edit-001"
    assert loaded.projection is not None and loaded.projection.num_prototypes == len(record.kept_prototypes)
    image = read_image(trained_runs["root"] / "images" / "img06.png")
    state = session.analyse(image)
    edited = ExploreSession(loaded.model, loaded.config, loaded.meta)
    torch.testing.assert_close(
        edited.grid_logits(edited.analyse(image)), session.grid_logits(state, ablation), rtol=1e-3, atol=1e-3
    )  # float32 sums in another order (the exported model's blockwise path): 3.5e-4 at most on logits near 2.4
    assert "placeholders" in (load_galleries(run_copy, "edit-001")[0].problem or "")

    assert save_edit(run_copy, Ablation.of([], [0])).stage == "edit-002"
    assert [e.stage for e in list_edits(run_copy)] == ["edit-001", "edit-002"]
    from scaleprotoseg.explain.report import _edits_section
    from scaleprotoseg.rundir import RunDir

    html = _edits_section(RunDir(run_copy), "val")
    assert "edit-001" in html and "fires on the border" in html and "not evaluated" in html
    with pytest.raises(ExploreError, match="removes nothing"):
        save_edit(run_copy, Ablation())


def test_finetune_after_an_edit_keeps_removed_groups_off(run_copy):
    save_edit(run_copy, Ablation.of([], [1]), author="ann")
    state = (run_copy / "state.json").read_text()
    out = finetune_edit(run_copy, "edit-001", steps=1, progress=False)
    assert out == run_copy / "checkpoints" / "edit-001-finetune"
    assert (run_copy / "state.json").read_text() == state
    head = load_model(run_copy, "edit-001-finetune").model.head
    assert float(head.h_group.detach()[:, 1].abs().sum()) == 0
    assert float(head.grouping.weight.detach().view(-1, head.grouping.weight.shape[-1])[1].abs().sum()) == 0
    rec = json.loads((out / "edit.json").read_text())
    assert rec["base"] == "edit-001" and rec["effect"]["finetune_steps"] == 1
    with pytest.raises(ExploreError, match="is not an edit"):
        finetune_edit(run_copy, "joint", steps=1)


def test_evaluate_without_measures_the_effect(run_copy, capsys):
    assert main(["evaluate", str(run_copy), "--without", "g0,g1", "--no-baselines", "--no-progress"]) == 0
    summary = json.loads((run_copy / "eval" / "final-val-without-g0,g1" / "summary.json").read_text())
    assert summary["without"] == {"prototypes": [], "groups": [0, 1]}
    assert summary["miou_change"] == pytest.approx(summary["miou"] - summary["miou_unedited"])
    assert "without g0,g1: mIoU" in capsys.readouterr().out
    assert main(["evaluate", str(run_copy), "--without", "p999", "--no-baselines"]) == 1
