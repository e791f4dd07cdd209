"""Bad files through the commands: each is refused with exit status != 0 and one ``error:`` line (or one problem
line of ``data check``) naming the file, never a traceback; files that are merely odd (non-UTF-8 names) work."""

import json
import os
import shutil

import numpy as np
import pytest

from scaleprotoseg.cli import main


def one_error(capsys, fragment: str) -> str:
    """The single ``error:`` line on stderr, which must contain ``fragment``."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, captured.err
    assert fragment in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# data check: one folder dataset per bad file


def _good_pair(fuzz, root, stem, size=(16, 16)):
    fuzz.png(root / "images" / f"{stem}.png", fuzz.rgb(size))
    fuzz.png(root / "masks" / f"{stem}.png", np.arange(size[0] * size[1]).reshape(size) % 2)


def _dataset(fuzz, tmp_path):
    root = fuzz.folder_dataset(
        tmp_path / "ds",
        {"a": np.arange(256).reshape(16, 16) % 2, "b": np.arange(256).reshape(16, 16) % 2},
        ["bg", "fg"],
    )
    return root


BAD_DATA = {
    "truncated png": lambda f, r: f.truncated(f.png(r / "images" / "a.png", f.rgb((64, 64)))),
    "truncated tiff": lambda f, r: (
        (r / "images" / "a.png").unlink(),
        f.truncated(f.tiff(r / "images" / "a.tif", f.rgb((16, 16)))),
    )[-1],
    "zero-byte image": lambda f, r: f.zero_bytes(r / "images" / "a.png"),
    "zero-byte mask": lambda f, r: f.zero_bytes(r / "masks" / "a.png"),
    "rgb mask": lambda f, r: f.png(r / "masks" / "a.png", f.rgb((16, 16))),
    "huge png header": lambda f, r: f.huge_png(r / "images" / "a.png"),
    "huge tiff header": lambda f, r: ((r / "images" / "a.png").unlink(), f.huge_tiff(r / "images" / "a.tif"))[-1],
    "label out of range": lambda f, r: f.png(r / "masks" / "a.png", np.full((16, 16), 7, np.uint8)),
    "size mismatch": lambda f, r: f.png(r / "masks" / "a.png", np.zeros((16, 12), np.uint8)),
}
EXPECTED = {
    "truncated png": "truncated",
    "truncated tiff": "a.tif",
    "zero-byte image": "unreadable",
    "zero-byte mask": "unreadable",
    "rgb mask": "expected a single-channel index",
    "huge png header": "megapixels",
    "huge tiff header": "megapixels",
    "label out of range": "label values 7",
    "size mismatch": "differs from image size",
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_data_check_names_the_bad_file(case, fuzz, tmp_path, capsys):
    root = _dataset(fuzz, tmp_path)
    bad = BAD_DATA[case](fuzz, root)
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(str(bad))]
    assert lines and EXPECTED[case] in lines[0], out


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_train_preflight_refuses_before_the_first_step(case, fuzz, tmp_path, capsys, tiny_config):
    """The same files stop ``train`` in its pre-flight check: one line naming the file, and no run is written."""
    import yaml

    from scaleprotoseg.config import to_dict

    root = _dataset(fuzz, tmp_path)
    bad = BAD_DATA[case](fuzz, root)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_config(root, "deeplabv2"))))
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--run-dir", str(run), "--device", "cpu", "--no-progress"]) == 1
    line = one_error(capsys, str(bad))
    assert "data check" in line
    assert not (run / "state.json").exists()


def test_data_check_binary_0_255_masks(fuzz, tmp_path, capsys):
    root = fuzz.folder_dataset(tmp_path / "bin", fuzz.binary_0_255_masks(), ["background", "cell"])
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "only the values 0 and 255" in out and "splits/train.txt" in out
    assert "data check: 4 sample(s) in 2 split(s): 2 problem(s)" in out


def test_data_check_non_utf8_names(fuzz, tmp_path, capsys):
    root = _dataset(fuzz, tmp_path)
    image = fuzz.non_utf8_name(root / "images")
    fuzz.truncated(fuzz.png(image, fuzz.rgb((64, 64))))
    fuzz.png(fuzz.non_utf8_name(root / "masks"), np.zeros((64, 64), np.uint8))
    assert main(["data", "check", str(root), "--split", "all", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "caf\ufffd.png: unreadable or truncated image" in out
    out.encode("utf-8")  # printable on a UTF-8 terminal


# ----------------------------------------------------------------------------------------------------------------
# predict, explain, evaluate, report on a trained run

BAD_IMAGES = {
    "truncated png": (lambda f, d: f.truncated(f.png(d / "x.png", f.rgb((64, 64))))),
    "truncated tiff": (lambda f, d: f.truncated(f.tiff(d / "x.tif", f.rgb((64, 64))), keep=0.3)),
    "zero-byte": (lambda f, d: f.zero_bytes(d / "x.png")),
    "huge png header": (lambda f, d: f.huge_png(d / "x.png")),
    "huge tiff header": (lambda f, d: f.huge_tiff(d / "x.tif")),
    "multi-page tiff": (lambda f, d: f.tiff(d / "x.tif", np.zeros((4, 16, 16), np.uint8), photometric="minisblack")),
    "all-nan float tiff": (lambda f, d: f.tiff(d / "x.tif", np.full((16, 16), np.nan, np.float32))),
}
IMAGE_EXPECTED = {
    "truncated png": "truncated",
    "truncated tiff": "x.tif",
    "zero-byte": "unreadable",
    "huge png header": "megapixels",
    "huge tiff header": "megapixels",
    "multi-page tiff": "expected one 2-D image",
    "all-nan float tiff": "NaN",
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_predict_refuses_bad_images(case, fuzz, trained_runs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = BAD_IMAGES[case](fuzz, tmp_path / "in")
    rc = main(["predict", str(trained_runs["scaleprotoseg"]), "--input", str(bad), "--output", str(tmp_path / "out")])
    assert rc == 1
    line = one_error(capsys, str(bad))
    assert IMAGE_EXPECTED[case] in line


@pytest.mark.parametrize("case", ["truncated png", "huge tiff header", "all-nan float tiff"])
def test_explain_refuses_bad_images(case, fuzz, trained_runs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = BAD_IMAGES[case](fuzz, tmp_path / "in")
    run = str(trained_runs["scaleprotoseg"])
    assert main(["explain", run, "--input", str(bad), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert IMAGE_EXPECTED[case] in one_error(capsys, str(bad))


def test_predict_never_overwrites_its_inputs(fuzz, trained_runs, tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    photo = fuzz.png(d / "a.png", fuzz.rgb((24, 24)))
    before = photo.read_bytes()
    assert main(["predict", str(trained_runs["scaleprotoseg"]), "--input", str(d), "--output", str(d)]) == 1
    one_error(capsys, "would overwrite the input")
    assert photo.read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["a.png"]
    # the same through another spelling of the folder
    alias = tmp_path / "alias"
    alias.symlink_to(d)
    assert main(["predict", str(trained_runs["scaleprotoseg"]), "--input", str(photo), "--output", str(alias)]) == 1
    one_error(capsys, "would overwrite the input")
    assert photo.read_bytes() == before


def test_predict_keeps_colliding_stems_apart(fuzz, trained_runs, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    fuzz.png(d / "a.png", fuzz.rgb((24, 24), seed=1))
    fuzz.tiff(d / "a.tif", fuzz.rgb((24, 24), seed=2))
    out = tmp_path / "out"
    assert main(["predict", str(trained_runs["scaleprotoseg"]), "--input", str(d), "--output", str(out)]) == 0
    assert "wrote 2 prediction(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.png.png", "a.png_color.png", "a.tif.png", "a.tif_color.png"]


def test_predict_and_explain_non_utf8_names(fuzz, trained_runs, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    image = fuzz.png(fuzz.non_utf8_name(d), fuzz.rgb((24, 24)))
    run = str(trained_runs["scaleprotoseg"])
    assert main(["predict", run, "--input", str(d), "--output", str(tmp_path / "pred")]) == 0
    assert os.fsencode(tmp_path / "pred") + b"/" + fuzz.NON_UTF8 + b".png" in [
        os.fsencode(p) for p in (tmp_path / "pred").iterdir()
    ]
    out = tmp_path / "ex"
    assert main(["explain", run, "--input", str(image), "--output", str(out), "--views", "nearest_patches"]) == 0
    assert json.loads((out / "manifest.json").read_text())["name"] == os.fsdecode(fuzz.NON_UTF8)
    capsys.readouterr()


def _copy_run(trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["scaleprotoseg"], run, symlinks=True)
    shutil.rmtree(run / "report", ignore_errors=True)
    return run


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_report_refuses_files_from_outside_the_run(how, trained_runs, tmp_path, capsys):
    run = _copy_run(trained_runs, tmp_path)
    secret = tmp_path / "secret.png"
    shutil.copy(run / "final" / "prototypes" / "proto_0000.png", secret)
    man_path = run / "final" / "prototypes" / "manifest.json"
    man = json.loads(man_path.read_text())
    entry = man["prototypes"][0]
    if how == "absolute":
        entry["file"] = str(secret)
    elif how == "dotdot":
        entry["file"] = "../../../secret.png"
    else:
        (run / "final" / "prototypes" / entry["file"]).unlink()
        (run / "final" / "prototypes" / entry["file"]).symlink_to(secret)
    man_path.write_text(json.dumps(man))
    out = tmp_path / "report"
    rc = main(["report", str(run), "--output", str(out), "--images", "0", "--no-eval", "--device", "cpu"])
    assert rc == 1
    line = one_error(capsys, "outside the run directory")
    assert "manifest.json" in line
    assert not any(p.name == "secret.png" for p in out.rglob("*"))


def test_report_refuses_analysis_links_out_of_the_run(trained_runs, tmp_path, capsys):
    run = _copy_run(trained_runs, tmp_path)
    (tmp_path / "private.json").write_text('{"token": "do not copy"}')
    (run / "analysis").mkdir(exist_ok=True)
    (run / "analysis" / "leak.json").symlink_to(tmp_path / "private.json")
    rc = main(["report", str(run), "--output", str(tmp_path / "r"), "--images", "0", "--no-eval", "--device", "cpu"])
    assert rc == 1
    one_error(capsys, "leak.json")
    assert "do not copy" not in "".join(p.read_text() for p in (tmp_path / "r").rglob("*.json"))


@pytest.mark.slow  # about a minute: the report explains the image with every view
def test_report_with_a_non_utf8_input_name(fuzz, trained_runs, tmp_path, capsys):
    run = _copy_run(trained_runs, tmp_path)
    image = fuzz.png(fuzz.non_utf8_name(tmp_path), fuzz.rgb((24, 24)))
    rc = main(["report", str(run), "--input", str(image), "--no-eval", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "caf\ufffd" in (run / "report" / "index.html").read_text(encoding="utf-8")


def test_evaluate_refuses_other_classes_and_names_bad_masks(fuzz, trained_runs, tmp_path, capsys):
    run = str(trained_runs["scaleprotoseg"])
    data = tmp_path / "data"
    shutil.copytree(trained_runs["root"], data)
    text = (data / "classes.yaml").read_text()
    (data / "classes.yaml").write_text(text.replace("name: square", "name: tmp").replace("name: disc", "name: square"))
    (data / "classes.yaml").write_text((data / "classes.yaml").read_text().replace("name: tmp", "name: disc"))
    assert main(["evaluate", run, "--data-root", str(data), "--no-progress", "--out", str(tmp_path / "e")]) == 1
    one_error(capsys, "classes differ")
    (data / "classes.yaml").write_text(text)
    val = (data / "splits" / "val.txt").read_text().split()[0]
    fuzz.png(data / "masks" / f"{val}.png", np.full((40, 40), 2, np.uint8) + (np.eye(40, dtype=np.uint8) * 3))
    rc = main(
        ["evaluate", run, "--data-root", str(data), "--no-progress", "--out", str(tmp_path / "e"), "--no-baselines"]
    )
    assert rc == 1
    one_error(capsys, str(data / "masks" / f"{val}.png"))
