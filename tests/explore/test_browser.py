"""The explorer in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Skipped where either is missing. Screenshots go to ``$SCALEPROTOSEG_ARTEFACTS/explore/`` (default: the test's
temporary directory).
"""

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARGS += ["--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (test extra)")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


@pytest.mark.slow
def test_click_a_pixel_then_switch_a_prototype_off(browser_page, live_server, trained_runs, tmp_path):
    from scaleprotoseg.data.io import read_image
    from scaleprotoseg.explore.app import create_app
    from scaleprotoseg.explore.session import ExploreSession

    artefacts = Path(os.environ.get("SCALEPROTOSEG_ARTEFACTS", tmp_path)) / "explore"
    artefacts.mkdir(parents=True, exist_ok=True)
    run = tmp_path / "run"
    shutil.copytree(trained_runs["scaleprotoseg"], run)
    session = ExploreSession.from_run(run)
    server = live_server(create_app(session))
    page = browser_page
    page.goto(server.url)
    page.wait_for_selector("#image-select option[value*=img06]", state="attached")
    page.select_option("#image-select", label="val: img06")
    page.wait_for_function("document.getElementById('cell-info').textContent.includes('grid')")
    page.click("#img", position={"x": 300, "y": 280})
    page.wait_for_selector(".class-block")
    page.screenshot(path=str(artefacts / "decomposition.png"), full_page=True)

    cell = [int(v) for v in page.get_attribute("#cell-pos", "data-cell").split(",")]
    predicted = int(page.get_attribute("#predicted", "data-class"))
    block = page.locator(".class-block").first
    assert int(block.get_attribute("data-class")) == predicted
    logit = float(block.get_attribute("data-logit"))
    contributions = [
        float(v) for v in block.locator("tr.term").evaluate_all("rs => rs.map(r => r.dataset.contribution)")
    ]
    assert sum(contributions) == pytest.approx(logit, abs=1e-4)
    state = session.analyse(read_image(trained_runs["root"] / "images" / "img06.png"))  # cached: the page's
    assert float(state.logits[predicted, cell[0], cell[1]]) == pytest.approx(logit, abs=1e-4)  # the model's own
    assert re.search(r"logit -?\d", block.locator("h3").inner_text())

    pred_src = page.get_attribute("#pred", "src")
    page.locator(".members button[data-toggle=p]").first.click()
    page.wait_for_selector("#changed-pixels")
    page.wait_for_function("document.getElementById('pred').complete")
    assert "without=p" in page.get_attribute("#pred", "src") != pred_src
    assert page.locator("#ablation .chip").count() == 1
    changed = int(page.get_attribute("#changed-pixels", "data-changed"))
    from scaleprotoseg.explore.decision import Ablation

    off = Ablation.parse(page.locator("#ablation .chip").first.inner_text().rstrip(" ×"))
    assert changed == session.changes(state, off)["changed_pixels"]
    page.wait_for_selector(".class-block")
    page.screenshot(path=str(artefacts / "switched_off.png"), full_page=True)

    page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.txt: not an image" in page.inner_text("#error")
    page.screenshot(path=str(artefacts / "bad_upload.png"), full_page=True)
