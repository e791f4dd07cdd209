"""The HTML report: every image and link resolves to a file inside the report, it renders in headless Chromium, and
the generic JSON renderer makes tables."""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "a":
            self.links.append(a.get("href", ""))


def check_references(index: Path) -> _Refs:
    """Every ``<img src>`` and ``<a href>`` of ``index`` is a relative path to a non-empty file inside the report
    directory (or an in-page anchor that exists); no script, stylesheet link or remote URL."""
    html = index.read_text()
    refs = _Refs()
    refs.feed(html)
    root = index.parent.resolve()
    for ref in refs.imgs + refs.links:
        assert ref, "empty src/href"
        if ref.startswith("#"):
            assert ref[1:] in refs.ids, ref
            continue
        assert not urlparse(ref).scheme, f"{ref} is not a relative path"
        target = (index.parent / unquote(ref)).resolve()
        assert target.is_relative_to(root), f"{ref} points outside the report"
        assert target.is_file() and target.stat().st_size > 0, f"{ref} does not resolve to a file"
    assert "script" not in refs.tags and "link" not in refs.tags
    assert "http://" not in html and "https://" not in html
    return refs


def test_report_images_and_links_resolve(scaleprotoseg_report):
    index = scaleprotoseg_report
    refs = check_references(index)
    html = index.read_text()
    for heading in (
        "Run summary",
        "Training stages",
        "Evaluation",
        "Per-class IoU",
        "Interpretability analyses",
        "Prototypes and groups",
        "Explained images",
        "sparsity",
        "Failure",
    ):
        assert heading in html, heading
    assert len(refs.imgs) > 20
    assert any(src.endswith("sparsity_hist.png") for src in refs.imgs)  # the analysis PNG next to its JSON
    assert any(src.endswith("_graph.png") for src in refs.imgs)  # a group graph per class
    assert any("samples/" in src and "nearest_patches" in src for src in refs.imgs)
    assert "<th>active</th>" in html  # the analysis JSON's list of rows became a table
    # the Groups table: one row per stage that trained the groups; its numbers stay out of the stage table
    assert "<h3>Groups</h3>" in html and "<th>max |Δh_group|</th>" in html
    assert "<td>group_warmup</td>" in html.split("<h3>Groups</h3>")[1].split("</table>")[0]
    assert "groups.entropy_before" not in html
    # the tiny run's 2 + 2 group steps at lr 2.5e-4 cannot move the groups: the report says so
    assert "close to their random initialisation" in html


def test_report_renders_in_headless_chromium(scaleprotoseg_report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            "Chromium is not installed at /usr/bin/chromium; install it with "
            "`apt-get update && apt-get install -y chromium` to render the report in a browser"
        )
    shot = tmp_path / "report.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        scaleprotoseg_report.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (2000, 1280, 3)
    assert img.std() > 20  # not a blank page
    # the dark header band of the stylesheet is there, i.e. the inline CSS was applied
    assert img[20:60, 20:400].mean() < 80
    shutil.copy(shot, scaleprotoseg_report.parent.parent / "report_screenshot.png")
    print(f"screenshot: {scaleprotoseg_report.parent.parent / 'report_screenshot.png'}")


def test_report_of_protoseg_without_data(explain_runs, tmp_path):
    from scaleprotoseg.explain.report import build_report

    index = build_report(explain_runs["protoseg"], tmp_path / "report", images=0, evaluate_missing=False)
    check_references(index)
    html = index.read_text()
    assert "h_proto" in html and "No sample explained" in html and "No evaluation found" in html


def test_render_json_tables_and_escaping():
    from scaleprotoseg.explain.html import render_json

    html = render_json(
        {
            "tau": 0.005,
            "scales": [1, 2],
            "rows": [{"class": "<cow>", "n": 3}, {"class": "b", "m": None}],
            "matrix": [[1, 2], [3, 4]],
            "nested": {"x": {"y": 1.5}},
        }
    )
    assert "<th>tau</th>" in html and "0.005" in html
    assert "<th>class</th><th>n</th><th>m</th>" in html
    assert "&lt;cow&gt;" in html and "<cow>" not in html
    assert '<td class="num">4</td>' in html
    assert "<h5>x</h5>" in html
    assert render_json([]) == '<p class="note">(empty)</p>'


def test_groups_table_rows_and_barely_moved_note():
    from scaleprotoseg.explain.report import _groups_table

    stages = [("joint", None), ("group_warmup", None), ("group_joint", None)]
    rec = {
        "entropy_before": 0.71,
        "entropy_after": 0.48,
        "weight_change_mean": 0.125,
        "weight_change_max": 0.53,
        "weight_change_frobenius": 1.55,
        "h_group_change_max": 0.0,
    }
    ends = {"joint": {"loss": {"ce": 1.0}}, "group_warmup": {"groups": rec}, "group_joint": {"groups": rec}}
    html = _groups_table(ends, stages)
    headers = ["stage", "entropy before", "entropy after", "mean |Δw|", "max |Δw|", "‖Δw‖_F", "max |Δh_group|"]
    assert "".join(f"<th>{h}</th>" for h in headers) in html
    assert "<tr><td>group_warmup</td>" in html and "<tr><td>group_joint</td>" in html and "<td>joint</td>" not in html
    assert '<td class="num">0.125</td><td class="num">0.53</td>' in html
    assert "random initialisation" not in html
    small = {**rec, "weight_change_max": 0.03}
    html = _groups_table({"group_warmup": {"groups": small}, "group_joint": {"groups": small}}, stages)
    assert "no group weight by more than 0.06" in html and "random initialisation" in html
    assert _groups_table({"joint": {"loss": {}}}, stages) == ""
