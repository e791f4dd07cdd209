import numpy as np
import pytest
import torch

from scaleprotoseg.checkpoint import CheckpointMeta
from scaleprotoseg.data.io import read_image
from scaleprotoseg.explore import session as session_module
from scaleprotoseg.explore.decision import Ablation, ExploreError
from scaleprotoseg.explore.session import ExploreSession, ImageCatalog
from scaleprotoseg.models.segmenter import build_model
from scaleprotoseg.predict import Predictor


@pytest.fixture(scope="module")
def explored(trained_runs):
    run = trained_runs["scaleprotoseg"]
    session = ExploreSession.from_run(run)
    image = read_image(trained_runs["root"] / "images" / "img06.png")
    return session, session.analyse(image, "img06"), image, run


def test_a_click_reproduces_the_model_logits_of_its_cell(explored):
    session, state, image, _ = explored
    x = Predictor(session.model, session.cfg, session.meta, torch.device("cpu")).preprocess(image)
    with torch.no_grad():
        out = session.model(x)
    for y, x_ in [(0, 0), (17, 23), (39, 39)]:
        d = session.cell(state, y, x_, classes=[0, 1, 2])
        r, c = d["cell"]
        assert (r, c) == (y * state.grid[0] // 40, x_ * state.grid[1] // 40)
        assert d["predicted"] == int(out.logits[0, :, r, c].argmax())
        assert [e["class"] for e in d["classes"]][0] == d["predicted"]
        assert sorted(e["class"] for e in d["classes"]) == [0, 1, 2]
        for entry in d["classes"]:
            logit = float(out.logits[0, entry["class"], r, c])
            assert entry["logit"] == pytest.approx(logit, rel=1e-5, abs=1e-5)
            assert sum(t["contribution"] for t in entry["terms"]) == pytest.approx(logit, rel=1e-5, abs=1e-5)
            assert {t["group"] for t in entry["terms"]} <= set(range(session.tables.num_groups))


def test_prediction_is_the_predictors(explored):
    session, state, image, run = explored
    expected = Predictor.from_run(run).predict(image)
    assert state.size == image.shape[:2]
    assert (session.prediction(state) == expected).mean() > 0.999
    assert session.analyse(image, "again") is state  # cached: the model does not run again


def test_switching_off_recomputes_from_the_cache(explored):
    session, state, _, _ = explored
    tables = session.tables
    used = torch.nonzero(tables.group_weight.sum(0) > 0).flatten().tolist()
    ablation = Ablation.of(used)  # every prototype a group uses: all groups empty, every score 0
    assert torch.count_nonzero(session.grid_logits(state, ablation)) == 0
    one = Ablation.of([], [int(torch.argmax(tables.last_layer[0]))])
    ch = session.changes(state, one)
    assert ch["changed_pixels"] == int((session.prediction(state) != session.prediction(state, one)).sum())
    assert sum(t["pixels"] for t in ch["transitions"]) == ch["changed_pixels"]
    d = session.cell(state, 5, 5, ablation=one)
    assert all(t["group"] not in one.groups for e in d["classes"] for t in e["terms"])
    assert session.group_map(state, 0).shape == state.grid
    assert session.prototype_map(state, 0).shape == state.grid


def test_bad_requests_name_the_problem(explored, monkeypatch):
    session, state, _, _ = explored
    with pytest.raises(ExploreError, match="outside the image of 40 x 40"):
        session.cell(state, 40, 0)
    with pytest.raises(ExploreError, match="prototype 999 does not exist"):
        session.prototype_info(999)
    with pytest.raises(ExploreError, match="is not loaded"):
        session.image("nope")
    with pytest.raises(ExploreError, match="img"):
        session.analyse(np.zeros((4,), np.uint8), "img")
    monkeypatch.setattr(session_module, "MAX_PIXELS", 100)
    with pytest.raises(ExploreError, match="big: 20 x 20 pixels is too large"):
        session.analyse(np.zeros((20, 20, 3), np.uint8), "big")


def test_models_without_prototypes_or_groups(trained_runs, tiny_config):
    cfg = tiny_config(trained_runs["root"], "deeplabv2")
    model = build_model(cfg.model, 3)
    meta = CheckpointMeta("deeplabv2", "train", ["a", "b", "c"], np.zeros((3, 3), np.uint8), 255, "imagenet", 8, {})
    with pytest.raises(ExploreError, match="deeplabv2 model has no prototypes"):
        ExploreSession(model, cfg, meta)
    protoseg = ExploreSession.from_run(trained_runs["protoseg"])
    assert not protoseg.describe()["grouped"]
    assert any("no groups" in n for n in protoseg.notes)
    state = protoseg.analyse(read_image(trained_runs["root"] / "images" / "img07.png"))
    d = protoseg.cell(state, 10, 10)
    assert sum(t["contribution"] for t in d["classes"][0]["terms"]) == pytest.approx(d["classes"][0]["logit"], abs=1e-5)
    with pytest.raises(ExploreError, match="no groups"):
        protoseg.group_map(state, 0)


def test_catalog_lists_and_reads_only_listed_images(trained_runs, tmp_path):
    session = ExploreSession.from_run(trained_runs["scaleprotoseg"])
    (tmp_path / "a.png").write_bytes((trained_runs["root"] / "images" / "img00.png").read_bytes())
    (tmp_path / "notes.txt").write_text("x")
    catalog = ImageCatalog(session.cfg, tmp_path)
    entries = catalog.entries()
    assert {"source": "val", "name": "img06"} in entries and {"source": "folder", "name": "a.png"} in entries
    assert all(e["name"] != "notes.txt" for e in entries)
    assert catalog.read("folder", "a.png").shape == (40, 40, 3)
    assert catalog.read("val", "img07").shape == (40, 40, 3)
    for source, name in [("folder", "../a.png"), ("folder", "notes.txt"), ("val", "img00"), ("disk", "a.png")]:
        with pytest.raises(ExploreError):
            catalog.read(source, name)
