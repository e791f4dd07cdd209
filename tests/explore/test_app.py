import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from scaleprotoseg.explore import app as app_module  # noqa: E402
from scaleprotoseg.explore import session as session_module  # noqa: E402
from scaleprotoseg.explore.app import create_app  # noqa: E402
from scaleprotoseg.explore.session import ExploreSession, ImageCatalog  # noqa: E402


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(trained_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_runs["scaleprotoseg"], run)
    session = ExploreSession.from_run(run)
    return TestClient(create_app(session, ImageCatalog(session.cfg))), run


def test_pick_click_switch_off_and_save(client):
    c, run = client
    assert c.get("/").status_code == 200 and "scaleprotoseg explore" in c.get("/").text
    assert c.get("/static/app.js").status_code == 200
    model = c.get("/api/model").json()
    assert model["grouped"] and {"source": "val", "name": "img06"} in model["images"]
    opened = c.post("/api/open", json={"source": "val", "name": "img06"}).json()
    assert opened["size"] == [40, 40]
    key = opened["key"]
    d = c.get(f"/api/cell/{key}", params={"y": 20, "x": 20, "classes": "0,1,2"}).json()
    for entry in d["classes"]:
        assert sum(t["contribution"] for t in entry["terms"]) == pytest.approx(entry["logit"], abs=1e-5)
    pred = Image.open(io.BytesIO(c.get(f"/api/prediction/{key}.png").content))
    assert pred.size == (40, 40)
    ch = c.get(f"/api/changes/{key}", params={"without": "g0,g1,g2"}).json()
    assert ch["changed_pixels"] >= 0 and "mask" not in ch
    r = c.get(f"/api/map/{key}/group/0.png")
    assert r.status_code == 200 and "X-Range" in r.headers
    info = c.get("/api/prototype/0").json()
    assert info["has_patch"] and c.get("/api/patch/prototype/0.png").status_code == 200
    for e in info["nearest"]:
        assert c.get(f"/api/patch/nearest/0/{e['patch']}").status_code == 200
    rec = c.post("/api/edits", json={"without": "g1", "author": "ann", "reason": "test", "key": key}).json()
    assert rec["stage"] == "edit-001" and rec["effect"]["image"] == "img06"
    assert [e["stage"] for e in c.get("/api/edits").json()] == ["edit-001"]


def test_bad_input_gets_a_message(client, monkeypatch):
    c, run = client
    r = c.post("/api/upload", params={"name": "notes.txt"}, content=b"hello, not an image")
    assert r.status_code == 400 and "notes.txt: not an image" in r.json()["error"]
    ok = c.post("/api/upload", params={"name": "a.png"}, content=_png_bytes(np.zeros((30, 20, 3), np.uint8)))
    assert ok.status_code == 200 and ok.json()["size"] == [30, 20]
    monkeypatch.setattr(app_module, "MAX_PIXELS", 100)
    monkeypatch.setattr(session_module, "MAX_PIXELS", 100)
    r = c.post("/api/upload", params={"name": "big.png"}, content=_png_bytes(np.zeros((30, 20, 3), np.uint8)))
    assert r.status_code == 400 and "too large" in r.json()["error"]
    for url in [
        "/api/patch/nearest/0/..%2F..%2Fmeta.json",
        "/api/patch/nearest/0/meta.json",
        "/api/prototype/999",
        "/api/cell/nokey?y=1&x=1",
    ]:
        r = c.get(url)
        assert r.status_code in (400, 404), url
    r = c.post("/api/open", json={"source": "val", "name": "../../config.yaml"})
    assert r.status_code == 400 and "not in the validation split" in r.json()["error"]
    r = c.post("/api/edits", json={"without": ""})
    assert r.status_code == 400 and "removes nothing" in r.json()["error"]


def test_a_run_without_groups_says_so(trained_runs):
    session = ExploreSession.from_run(trained_runs["protoseg"])
    c = TestClient(create_app(session))
    model = c.get("/api/model").json()
    assert not model["grouped"] and any("no groups" in n for n in model["notes"])
    key = c.post("/api/open", json={"source": "val", "name": "img06"}).json()["key"]
    r = c.get(f"/api/map/{key}/group/0.png")
    assert r.status_code == 400 and "no groups" in r.json()["error"]
    r = c.get(f"/api/changes/{key}", params={"without": "g0"})
    assert r.status_code == 400 and "no groups" in r.json()["error"]
