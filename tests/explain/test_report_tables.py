"""The report's table helper and sections: labelled columns with units, percentages with 2 decimals, no raw JSON in
a cell, weighted loss terms that add up to the total, the command as typed, captions that do not repeat."""

import re
from types import SimpleNamespace

import pytest

from scaleprotoseg.explain.html import Column, Raw, data_table, figure, kv_table, percent, plain, render_json


def _cells(html: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", html)]


def test_column_formats_and_header_units():
    cols = [
        Column("class"),
        Column("mIoU", "%", "fraction%", 2),
        Column("IoU", "%", "%", 2),
        Column("pixels", kind="int"),
        Column("loss", kind="float", digits=3),
    ]
    html = data_table(cols, [["a", 0.421349, 42.1349, 950625, 0.123456], ["b", None, float("nan"), 3.0, None]])
    assert '<th>mIoU <span class="unit">(%)</span></th>' in html and "<th>class</th>" in html
    assert _cells(html) == ["a", "42.13", "42.13", "950,625", "0.123", "b", "–", "–", "3", "–"]
    assert html.startswith('<div class="scroll">')  # a wide table scrolls inside its container
    with pytest.raises(ValueError, match="3 columns"):
        data_table(cols[:3], [["a", 1.0]])


def test_no_cell_holds_raw_json():
    values = [{"0.6": 0.34, "0.7": 0.12}, [1, 2, 3], [[0, 1], [1, 2]], {"a": {"b": [1, 2]}}, [], {}]
    html = data_table([Column("v")], [[v] for v in values])
    cells = _cells(html)
    assert cells[0] == "0.6: 0.34; 0.7: 0.12" and cells[1] == "1, 2, 3" and cells[3] == "a: b: 1, 2"
    assert not [c for c in cells if c.startswith(("{", "[")) or '"' in c]
    assert not [c for c in _cells(kv_table({"x": {"0.6": 1}, "y": [1, 2]})) if c.startswith(("{", "["))]
    # the generic JSON renderer: nested lists of mappings and matrices get headers and text cells
    html = render_json({"pairs": [{"class": 0, "iou": {"0.6": 0.29, "0.7": 0.16}}], "m": [[1, 2], [3, 4]]})
    assert not [c for c in _cells(html) if c.startswith(("{", "["))]
    assert "<th>column 0</th>" in html and "0.6: 0.29; 0.7: 0.16" in html
    assert plain("x" * 500, limit=50).endswith("…") and len(plain("x" * 500, limit=50)) == 50


def test_percent_always_two_decimals():
    assert percent(0.42) == "42.00 %" and percent(1) == "100.00 %" and percent(None) == "–"
    assert percent(float("nan")) == "–" and percent(True) == "–"


def test_figure_enlarges_on_click_without_script():
    html = figure("assets/a.png", "a caption")
    thumb, box = re.findall(r'id="([fz]-[0-9a-f]+)"', html)
    assert f'href="#{box}"' in html and f'href="#{thumb}"' in html  # thumbnail -> enlarged view -> back
    assert html.count('src="assets/a.png"') == 2 and "<script" not in html
    assert 'class="lightbox"' in html and "a caption" in html


def _cfg(**weights):
    from scaleprotoseg.config import LossConfig

    return SimpleNamespace(loss=LossConfig(**weights))


def test_loss_table_terms_are_weighted_and_add_up():
    from scaleprotoseg.explain.report import _loss_table

    ends = {
        "warmup": {"loss": {"ce": 0.535959, "diversity": 0.424742, "l1_proto": 12.0, "total": 0.643345}},
        "group_warmup": {"loss": {"ce": 0.192283, "entropy": 0.641564, "l1_group": 3.0, "total": 0.227361}},
        "projection": {"prototypes_before": 24},
    }
    html = _loss_table(_cfg(), ends, ["warmup", "projection", "group_warmup"])
    headers = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", html)]
    assert headers == [
        "stage",
        "ce (× 1)",
        "diversity (× 0.25)",
        "l1_proto (× 0.0001)",
        "entropy (× 0.05)",
        "l1_group (× 0.001)",
        "total (weighted sum)",
    ]
    rows = [_cells(r) for r in re.findall(r"<tr>(.*?)</tr>", html.split("<tbody>")[1])]
    assert [r[0] for r in rows] == ["warmup", "group_warmup"]  # stages without loss terms are left out
    for r in rows:
        terms = [float(c) for c in r[1:-1] if c != "–"]
        assert sum(terms) == pytest.approx(float(r[-1]), abs=2e-4)  # weighted terms add up to the total
    assert rows[0][2] == "0.1062"  # 0.25 x 0.424742, not the unweighted 0.4247
    assert _loss_table(_cfg(), {"projection": {}}, ["projection"]) == ""


def test_stage_table_is_narrow_and_in_percent():
    from scaleprotoseg.explain.report import _stages_table

    stages = {
        "joint": SimpleNamespace(enabled=True, kind="train", steps=300),
        "projection": SimpleNamespace(enabled=True, kind="projection", steps=0),
        "threshold": SimpleNamespace(enabled=True, kind="threshold", steps=0),
        "off": SimpleNamespace(enabled=False, kind="train", steps=1),
    }
    cfg = SimpleNamespace(train=SimpleNamespace(stages=stages))
    ends = {
        "joint": {"loss": {"ce": 0.08, "total": 0.0873}, "val_miou": 0.909126, "val_pixel_accuracy": 0.96186},
        "projection": {"prototypes_before": 24, "prototypes_after": 22, "duplicates_removed": 2, "val_miou": 0.9},
        "threshold": {"alpha": 0.05, "weights_zeroed": 9, "prototypes_used": 16, "val_miou": 0.91},
    }
    html = _stages_table(cfg, ends, {"joint", "projection"})
    assert html.count("</th>") == 8  # one column per kind of information, not one per flattened metric
    rows = [_cells(r) for r in re.findall(r"<tr>(.*?)</tr>", html.split("<tbody>")[1])]
    assert rows[0][:7] == ["joint", "train", "300", "done", "90.91", "96.19", "0.0873"]
    assert rows[1][-1] == "24 → 22 prototypes, 2 duplicate(s) removed" and rows[1][3] == "done"
    assert rows[2][3] == "not run" and rows[2][-1] == "α = 0.05: 9 weights set to 0, 16 prototypes used"
    assert len(rows) == 3


def test_typed_command():
    from scaleprotoseg.explain.report import typed_command

    argv = ["/work/src/scaleprotoseg/__main__.py", "train", "-c", "my config.yaml", "--run-dir", "runs/a"]
    assert typed_command({"argv": argv}) == "scaleprotoseg train -c 'my config.yaml' --run-dir runs/a"
    assert typed_command({"command": "/venv/bin/scaleprotoseg train -c c.yaml"}) == "scaleprotoseg train -c c.yaml"
    assert typed_command({"command": "/tmp/venv/bin/pytest -q tests/x.py"}) is None  # not the command line
    assert typed_command({"argv": ["/venv/lib/pytest/__main__.py", "-q"]}) is None  # python -m pytest
    assert typed_command({"command": ""}) is None and typed_command({}) is None


def test_environment_info_records_argv_and_cwd(tmp_path, monkeypatch):
    from scaleprotoseg.config import load_config
    from scaleprotoseg.engine.trainer import environment_info

    monkeypatch.chdir(tmp_path)
    env = environment_info(load_config(None), ["/x/scaleprotoseg", "train", "-c", "a.yaml"])
    assert env["argv"] == ["/x/scaleprotoseg", "train", "-c", "a.yaml"] and env["cwd"] == str(tmp_path)
    assert "argv" not in environment_info(load_config(None))  # the Python API: no command line to record


def test_analysis_columns_are_labelled():
    from scaleprotoseg.explain.report import analysis_column

    assert analysis_column("group-overlap", "iou_%").header == "IoU between groups (%)"
    area = analysis_column("components", "mean_area", {"area_unit": "feature cells"})
    assert area.header == "area per component (feature cells, mean over maps)"
    assert analysis_column("equivariance", "ratio_groups").kind == "fraction%"
    assert analysis_column("equivariance", "pairs").header == "quasi-equivariant pairs"
    assert analysis_column("new", "hit_rate_%").header == "hit rate (%)"
    assert analysis_column("new", "some_count").header == "some count"


def test_view_captions_do_not_repeat():
    from scaleprotoseg.explain.report import view_caption

    assert view_caption("prototype_maps", "class_000_bg/prototype_maps.png") == "prototype maps"
    assert view_caption("nearest_patches", "c/nearest_patches_p0006.png") == "nearest patches · p0006"
    assert view_caption("group_graph", "c/other.png") == "group graph · other"


def test_raw_cells_stay_html():
    html = data_table([Column("x", kind="html")], [[Raw("<b>bold</b>")], ["<i>"]])
    assert "<td><b>bold</b></td>" in html and "&lt;i&gt;" in html


def test_commands_first_start_then_resumes(tmp_path):
    import json

    from scaleprotoseg.explain.report import _commands
    from scaleprotoseg.rundir import RunDir

    run = RunDir(tmp_path)
    run.append_history("start", command="/v/bin/scaleprotoseg train -c a.yaml --run-dir r")
    run.append_history("resume", command="/v/bin/scaleprotoseg train --resume r")
    env = {"argv": ["/v/bin/scaleprotoseg", "train", "--resume", "r"], "cwd": "/work/x"}
    rows = _commands(run, env)
    assert "scaleprotoseg train -c a.yaml --run-dir r" in rows["command"]
    assert "resume" in rows["later commands"] and "scaleprotoseg train --resume r" in rows["later commands"]
    assert "/work/x" in rows["working directory"]
    only_env = _commands(RunDir(tmp_path / "fresh"), env)
    assert "scaleprotoseg train --resume r" in only_env["command"] and "later commands" not in only_env
    assert json.dumps(_commands(RunDir(tmp_path / "fresh"), {})) == "{}"
