"""The HTML report: every image and link resolves to a file inside the report, it renders in headless Chromium, and
the generic JSON renderer makes tables."""

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest


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


class _Tables(HTMLParser):
    """The header texts and cell texts of every table of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.cells: list[str] = []
        self._open: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td"):
            self._open, self._text = tag, []

    def handle_data(self, data):
        if self._open:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == self._open:
            (self.headers if tag == "th" else self.cells).append("".join(self._text).strip())
            self._open = None


def header_texts(html: str) -> list[str]:
    t = _Tables()
    t.feed(html)
    return t.headers


def cell_texts(html: str) -> list[str]:
    t = _Tables()
    t.feed(html)
    return t.cells


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
        "Training",
        "Loss terms",
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


def test_report_of_protoseg_without_data(explain_runs, tmp_path):
    from scaleprotoseg.explain.report import build_report

    index = build_report(explain_runs["protoseg"], tmp_path / "report", images=0, evaluate_missing=False)
    check_references(index)
    html = index.read_text()
    assert "h_proto" in html and "No sample explained" in html
    assert "No evaluation of the validation split" in html and "--no-eval" in html


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
    headers = ["stage", "entropy before (Eq. 8, 0-1)", "entropy after (Eq. 8, 0-1)", "mean |Δw|", "max |Δw|"]
    assert header_texts(html) == [*headers, "‖Δw‖_F", "max |Δh_group|"]
    assert "<tr><td>group_warmup</td>" in html and "<tr><td>group_joint</td>" in html and "<td>joint</td>" not in html
    assert '<td class="num">0.125</td><td class="num">0.53</td>' in html
    assert "random initialisation" not in html
    small = {**rec, "weight_change_max": 0.03}
    html = _groups_table({"group_warmup": {"groups": small}, "group_joint": {"groups": small}}, stages)
    assert "no group weight by more than 0.06" in html and "random initialisation" in html
    assert _groups_table({"joint": {"loss": {}}}, stages) == ""


def test_report_tables_hold_no_raw_json_and_have_units(scaleprotoseg_report):
    html = scaleprotoseg_report.read_text()
    cells = cell_texts(html)
    assert len(cells) > 50
    raw = [c for c in cells if c.startswith(("{", "[")) or '": ' in c]
    assert not raw, raw[:5]
    headers = header_texts(html)
    assert "validation mIoU (%)" in headers and "IoU (%)" in headers and "total (weighted sum)" in headers
    # the components analysis: its CSV columns labelled, the area in feature cells
    assert "area per component (feature cells, mean over maps)" in headers
    assert not any(h in headers for h in ("mean_area", "pooled_area", "p_th"))


def test_report_headline_is_the_validation_split(scaleprotoseg_report):
    """The fixture evaluated the train split last; the headline is the validation split all the same, evaluated by
    the report through evaluate_split into eval/final-val, and the train split is listed below it."""
    import json

    run = scaleprotoseg_report.parent.parent
    val = json.loads((run / "eval" / "final-val" / "metrics.json").read_text())
    train = json.loads((run / "eval" / "final-train" / "metrics.json").read_text())
    summary = json.loads((run / "eval" / "final-val" / "summary.json").read_text())
    assert summary["split"] == "val" and summary["by"] == "report" and summary["inference"]["mode"] == "whole"
    html = scaleprotoseg_report.read_text()
    headline = html.split('<p class="headline">')[1].split("</p>")[0]
    assert f"Validation mIoU <b>{100 * val['miou']:.2f} %</b>" in headline
    assert "(evaluated by this report)" in html
    others = html.split("Other evaluations in the run")[1].split("</table>")[0]
    assert "final-train" in others and "not the validation split" in others
    assert f"{100 * train['miou']:.2f}" in others


def test_report_command_is_not_a_temporary_path(scaleprotoseg_report):
    html = scaleprotoseg_report.read_text()
    row = html.split("<th>command</th>")[1].split("</tr>")[0]
    # the tiny run was trained through the Python API from pytest: no command to paste, and no path either
    assert "Python API" in row and "/tmp" not in row and "pytest" not in row


def test_report_at_1400px_in_chromium(scaleprotoseg_report, tmp_path):
    """Headless Chromium at 1400 px: the page is not wider than the window (wide tables scroll inside their
    container), no table cell shows raw JSON, the stylesheet is applied, and a click on a thumbnail enlarges it."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[*args, "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(scaleprotoseg_report.resolve().as_uri())
        page.wait_for_load_state("load")
        widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"the page is {widths[0]} px wide in a {widths[1]} px window"
        too_wide = page.evaluate(
            """[...document.querySelectorAll('table')].filter(t => {
                   const box = t.parentElement.getBoundingClientRect();
                   return box.right > window.innerWidth || box.width > document.querySelector('main').clientWidth;
               }).length"""
        )
        assert too_wide == 0
        cells = page.evaluate("[...document.querySelectorAll('td, th')].map(c => c.textContent.trim())")
        assert len(cells) > 50
        assert not [c for c in cells if c.startswith(("{", "["))]
        assert page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor") == "rgb(31, 42, 58)"
        page.screenshot(path=str(tmp_path / "report_1400.png"), full_page=False)
        graph = page.locator("figure.large a.zoom").first
        box_id = graph.get_attribute("href")[1:]
        assert page.evaluate(f"getComputedStyle(document.getElementById('{box_id}')).display") == "none"
        graph.click()
        assert page.evaluate(f"getComputedStyle(document.getElementById('{box_id}')).display") == "flex"
        page.screenshot(path=str(tmp_path / "report_1400_enlarged.png"))
        browser.close()
    assert (tmp_path / "report_1400.png").stat().st_size > 10_000
