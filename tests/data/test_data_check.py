import numpy as np
import yaml
from PIL import Image

from scaleprotoseg.cli import main
from scaleprotoseg.data import check_dataset


def _good_folder(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.yaml").write_text("classes: [background, thing, other]\nignore_index: 255\n")
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, (8, 10)).astype(np.uint8)
    lab[0] = 255
    rgb = rng.integers(0, 255, (8, 10, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(root / "images" / "good.png")
    Image.fromarray(rgb[..., 0]).save(root / "images" / "gray.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(root / "images" / "deep16.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 10), 128, np.uint8)])).save(root / "images" / "alpha.png")
    for stem in ("good", "gray", "deep16", "alpha"):
        Image.fromarray(lab).save(root / "masks" / f"{stem}.png")
    (root / "splits" / "train.txt").write_text("good\ngray\n")
    (root / "splits" / "val.txt").write_text("deep16\nalpha\n")
    return rgb, lab


def test_good_folder_passes_including_gray_16bit_rgba(tmp_path, capsys):
    _good_folder(tmp_path)
    assert check_dataset(tmp_path, progress=False) == []
    assert main(["data", "check", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 sample(s) in 2 split(s): OK" in out


def test_every_bad_file_is_named(tmp_path, capsys):
    rgb, lab = _good_folder(tmp_path)
    img, msk = tmp_path / "images", tmp_path / "masks"
    # truncated PNG
    Image.fromarray(rgb).save(img / "trunc.png")
    data = (img / "trunc.png").read_bytes()
    (img / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(lab).save(msk / "trunc.png")
    # unreadable (not an image at all)
    (img / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    Image.fromarray(lab).save(msk / "garbage.png")
    # label size differs from the image size
    Image.fromarray(rgb).save(img / "size.png")
    Image.fromarray(lab[:, :7]).save(msk / "size.png")
    # label values outside the classes (ignore aside)
    Image.fromarray(rgb).save(img / "values.png")
    bad = lab.copy()
    bad[3, 3] = 7
    Image.fromarray(bad).save(msk / "values.png")
    # an RGB mask where an index is expected
    Image.fromarray(rgb).save(img / "rgbmask.png")
    Image.fromarray(np.dstack([lab, lab, lab])).save(msk / "rgbmask.png")
    # listed but missing mask / image
    Image.fromarray(rgb).save(img / "nomask.png")
    Image.fromarray(lab).save(msk / "noimage.png")
    stems = ["good", "trunc", "garbage", "size", "values", "rgbmask", "nomask", "noimage"]
    (tmp_path / "splits" / "train.txt").write_text("\n".join(stems) + "\n")
    # a split with no files
    (tmp_path / "splits" / "empty.txt").write_text("# nothing here\n")

    rc = main(["data", "check", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.strip().splitlines()
    problems, summary = [ln for ln in lines[:-1] if not ln.startswith("  pixels in ")], lines[-1]
    assert "problem(s)" in summary

    def line_for(fragment):
        hits = [ln for ln in problems if fragment in ln]
        assert hits, f"{fragment} not reported in:\n{out}"
        return hits[0]

    assert "truncated" in line_for(str(img / "trunc.png"))
    assert "unreadable" in line_for(str(img / "garbage.jpg"))
    assert "differs from image size" in line_for(str(msk / "size.png"))
    assert "label values 7" in line_for(str(msk / "values.png"))
    assert "RGB" in line_for(str(msk / "rgbmask.png"))
    assert "no mask" in line_for(str(msk / "nomask"))
    assert "no image" in line_for(str(img / "noimage"))
    assert "lists no files" in line_for(str(tmp_path / "splits" / "empty.txt"))
    for fine in ("good.png", "gray.png", "deep16.png", "alpha.png"):
        assert not any(fine in ln for ln in problems), out
    assert len(problems) == 8


def test_missing_classes_yaml_and_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    problems = check_dataset(tmp_path, progress=False)
    assert len(problems) == 1 and problems[0].path.endswith("classes.yaml")
    assert main(["data", "check", str(tmp_path / "nope"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_config_file_checks_train_and_val(tmp_path, capsys, synthetic_folder):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "folder", "root": str(synthetic_folder)}}))
    assert main(["data", "check", str(cfg), "--no-progress"]) == 0
    assert "8 sample(s) in 2 split(s): OK" in capsys.readouterr().out
    cfg.write_text(yaml.safe_dump({"data": {"name": "folder", "root": str(synthetic_folder), "val_split": "test"}}))
    assert main(["data", "check", str(cfg), "--no-progress"]) == 1
    assert "split 'test' is not defined" in capsys.readouterr().out


def test_config_with_registered_dataset_reports_bad_samples(tmp_path, capsys):
    import tifffile

    em = tmp_path / "em"
    em.mkdir()
    tifffile.imwrite(em / "train-volume.tif", np.zeros((30, 8, 8), np.uint8))
    tifffile.imwrite(em / "train-labels.tif", np.zeros((30, 8, 9), np.uint8))  # wrong size
    cfg = tmp_path / "em.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "isbi_em", "root": str(em)}}))
    assert main(["data", "check", str(cfg), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "train-labels.tif" in out and "differs from image stack" in out


def _content_folder(root, masks, classes="[background, thing, other]"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.yaml").write_text(f"classes: {classes}\nignore_index: 255\n")
    for stem, lab in masks.items():
        Image.fromarray(np.zeros((*lab.shape, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(lab.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    (root / "splits" / "train.txt").write_text("a\nb\n")
    (root / "splits" / "val.txt").write_text("c\n")
    return root


def test_class_counts_absent_classes_and_mostly_ignored_splits(tmp_path, capsys):
    lab = np.zeros((10, 10), np.uint8)
    lab[:5] = 1
    lab[:, :2] = 2
    val = np.full((10, 10), 255, np.uint8)
    val[0] = 1
    root = _content_folder(tmp_path, {"a": lab, "b": lab, "c": val})
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    val_txt = str(root / "splits" / "val.txt")
    assert f"{val_txt}: split 'val': the ignore index 255 covers 90% of the pixels" in out
    assert f"{val_txt}: split 'val': class(es) 'background' (0), 'other' (2) never occur" in out
    assert "pixels in train: background 80 (40.0%), thing 80 (40.0%), other 40 (20.0%), ignore(255) 0" in out
    assert "pixels in val: background 0 (0.0%), thing 10 (10.0%), other 0 (0.0%), ignore(255) 90 (90.0%)" in out
    assert out.strip().splitlines()[-1].endswith(": 2 problem(s)")
    assert main(["data", "check", str(root), "--no-progress", "--lenient"]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and out.strip().endswith("OK, 2 warning(s)")


def test_preflight_reads_headers_and_a_sample_of_labels(tmp_path, synthetic_folder):
    from dataclasses import replace

    from scaleprotoseg.config import load_config
    from scaleprotoseg.data.check import PreflightError, preflight, require_preflight

    cfg = load_config(None, [f"data.root={synthetic_folder}"]).data
    assert preflight(cfg) == []
    val = (synthetic_folder / "splits" / "val.txt").read_text().split()
    bad_image = synthetic_folder / "images" / f"{val[-1]}.png"
    data = bad_image.read_bytes()
    bad_image.write_bytes(data[: len(data) // 2])
    bad_mask = synthetic_folder / "masks" / f"{val[0]}.png"
    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(bad_mask)
    problems = [str(p) for p in preflight(cfg)]
    assert len(problems) == 2
    assert problems[0].startswith(f"{bad_image}: truncated PNG")
    assert problems[1].startswith(f"{bad_mask}: label values 9 are outside the classes 0..2")
    assert [str(p) for p in preflight(replace(cfg, preflight_labels=0))] == problems[:1]  # headers only
    assert preflight(replace(cfg, preflight=False)) == []
    try:
        require_preflight(cfg, "run.yaml")
    except PreflightError as err:
        msg = str(err)
    assert "\n" not in msg and msg.startswith(f"{bad_image}: truncated PNG") and "(and 1 more problem(s))" in msg
    assert "scaleprotoseg data check run.yaml" in msg
