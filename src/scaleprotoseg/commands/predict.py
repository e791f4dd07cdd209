"""``scaleprotoseg predict RUN --input IMAGE|DIR --output DIR``: index and colour PNGs for any image size."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--input", required=True, help="an image file or a directory of images")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--stage", default=None, help="use this stage's checkpoint instead of final/")
    parser.add_argument(
        "--format",
        default="index",
        choices=["index", "cityscapes", "voc", "ade20k", "coco_stuff"],
        help="label ids to write: the model's own (index) or a public benchmark's",
    )
    parser.add_argument("--no-color", action="store_true", help="do not write colour PNGs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true")


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--input {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        return files
    raise FileNotFoundError(f"--input {path} does not exist")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from scaleprotoseg.data.formats import export_labels
    from scaleprotoseg.data.io import read_image, write_image, write_index_png
    from scaleprotoseg.predict import Predictor

    predictor = Predictor.from_run(args.run, args.stage, args.device)
    src = Path(args.input)
    files = list_images(src)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for f in tqdm(files, desc="predict", disable=len(files) < 2):
        rel = f.relative_to(src).with_suffix("") if src.is_dir() else Path(f.stem)
        image = read_image(f)
        labels = predictor.predict(image)
        target = out / rel.parent
        target.mkdir(parents=True, exist_ok=True)
        ids, palette = export_labels(labels, args.format, predictor.info.palette)
        write_index_png(target / f"{rel.name}.png", ids, palette)
        if not args.no_color:
            write_image(target / f"{rel.name}_color.png", predictor.colorize(labels))
    print(f"wrote {len(files)} prediction(s) to {out}")
    return 0
