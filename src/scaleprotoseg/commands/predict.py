"""``scaleprotoseg predict RUN --input IMAGE|DIR --output DIR``: index and colour PNGs for any image size.

Outputs are named after the input's stem (``a.jpg`` -> ``a.png``, ``a_color.png``); when two inputs of a folder share
a stem (``a.png``, ``a.tif``) both keep their suffix (``a.png.png``, ``a.tif.png``). Nothing is written when an output
would replace an input file or another output; images above ``--tile-above`` pixels are predicted in tiles. The
test-time settings are the run's unless the inference options (as ``evaluate``'s) say otherwise."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scaleprotoseg.commands.options import (
    add_config_options,
    add_device,
    add_inference_options,
    add_progress,
    add_stage,
    apply_run_overrides,
    check_run_overrides,
    inference_settings,
    print_config,
    run_config,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--input", help="an image file or a directory of images (required)")
    parser.add_argument("--output", help="output directory (required)")
    add_stage(parser)
    parser.add_argument(
        "--format",
        default="index",
        choices=["index", "cityscapes", "voc", "ade20k", "coco_stuff"],
        help="label ids to write: the model's own (index) or a public benchmark's",
    )
    parser.add_argument("--no-color", action="store_true", help="do not write colour PNGs")
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="N",
        help="predict large images in overlapping N x N windows (default: Predictor.tile_size, 1024; 0: never)",
    )
    parser.add_argument(
        "--tile-above",
        type=int,
        default=None,
        metavar="PIXELS",
        help="tile images with more pixels than this (default: Predictor.tile_above, 2048 x 2048; whole test mode)",
    )
    add_inference_options(parser)
    add_device(parser)
    add_config_options(parser)
    add_progress(parser)


def require_input_output(args: argparse.Namespace, verb: str, what: str) -> None:
    """``--input`` and ``--output`` are required unless ``--print-config`` is given (one-line error)."""
    missing = [opt for opt, value in (("--input", args.input), ("--output", args.output)) if not value]
    if missing:
        raise ValueError(f"{verb}: {' and '.join(missing)} missing; expected --input {what} --output DIR")


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--input {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        return files
    raise FileNotFoundError(f"--input {path} does not exist")


def output_names(files: list[Path], src: Path) -> list[Path]:
    """Output path (relative, without suffix) of each input: its stem, or its full name where stems collide."""
    rels = [f.relative_to(src) if src.is_dir() else Path(f.name) for f in files]
    stems: dict[Path, int] = {}
    for r in rels:
        stems[r.with_suffix("")] = stems.get(r.with_suffix(""), 0) + 1
    return [r.with_suffix("") if stems[r.with_suffix("")] == 1 else r for r in rels]


def plan_outputs(files: list[Path], src: Path, out: Path, color: bool) -> list[tuple[Path, Path, Path | None]]:
    """``(input, index PNG, colour PNG or None)`` per input; refuses (ValueError) an output that would replace an
    input file or another output."""
    from scaleprotoseg.data.io import printable

    inputs = {f.resolve(): f for f in files}
    planned: list[tuple[Path, Path, Path | None]] = []
    seen: dict[Path, Path] = {}
    for f, rel in zip(files, output_names(files, src)):
        index = out / rel.parent / f"{rel.name}.png"
        colour = out / rel.parent / f"{rel.name}_color.png" if color else None
        for target in (index, colour):
            if target is None:
                continue
            real = target.resolve()
            if real in inputs:
                raise ValueError(
                    f"{printable(target)}: predicting {printable(f)} would overwrite the input "
                    f"{printable(inputs[real])}; expected an --output folder apart from the inputs"
                )
            if real in seen:
                raise ValueError(
                    f"{printable(target)}: the outputs of {printable(seen[real])} and {printable(f)} have the same "
                    "name; expected inputs whose names differ (rename one, or use --no-color)"
                )
            seen[real] = f
        planned.append((f, index, colour))
    return planned


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from scaleprotoseg.data.formats import export_labels
    from scaleprotoseg.data.io import read_image, write_image, write_index_png
    from scaleprotoseg.predict import Predictor

    if args.print_config:
        return print_config(run_config(args.run, args.stage, args.overrides))
    check_run_overrides(args.overrides)
    require_input_output(args, "predict", "IMAGE|DIR")
    src = Path(args.input)
    files = list_images(src)
    out = Path(args.output)
    planned = plan_outputs(files, src, out, not args.no_color)
    tiling = {k: v for k, v in (("tile_size", args.tile), ("tile_above", args.tile_above)) if v is not None}
    predictor = Predictor.from_run(args.run, args.stage, args.device, **tiling)
    predictor.cfg = apply_run_overrides(predictor.cfg, args.overrides, args.run)
    predictor.inference = inference_settings(args, predictor.cfg.data)
    written = 0
    for f, index, colour in tqdm(planned, desc="predict", disable=len(planned) < 2 or args.no_progress):
        image = read_image(f)
        labels = predictor.predict(image)
        ids, palette = export_labels(labels, args.format, predictor.info.palette)
        write_index_png(index, ids, palette)
        if colour is not None:
            write_image(colour, predictor.colorize(labels))
        written += 1
    logger.info("wrote %d prediction(s) to %s", written, out)
    return 0
