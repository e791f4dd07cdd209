"""``scaleprotoseg explain RUN --input IMAGE|DIR --output DIR``: prototype, group, nearest-patch and failure views of
a prediction (paper Figures 4-5, 11-35), with a ``manifest.json`` listing every figure.

One image is explained into ``DIR``; a folder of images (searched as ``predict`` searches it) into ``DIR/<name>/``
per image, named as ``predict`` names its outputs. ``--label`` is a mask file for one image, or a folder of masks
``<name>.png`` for a folder (images without a mask get no failure view)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scaleprotoseg.commands.options import (
    add_config_options,
    add_device,
    add_inference_options,
    add_stage,
    apply_run_overrides,
    check_run_overrides,
    inference_settings,
    print_config,
    run_config,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--input", help="the image to explain, or a folder of images (required)")
    parser.add_argument("--output", help="output directory (required; a folder's images get a subfolder each)")
    parser.add_argument(
        "--label",
        default=None,
        help="ground-truth index mask (the model's class indices) -> failure view of badly segmented classes; "
        "for a folder --input, a folder of masks <name>.png",
    )
    add_stage(parser)
    parser.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names or indices to explain (default: every class in the prediction)",
    )
    parser.add_argument(
        "--patches",
        default=None,
        help="feature-grid cells 'row,col;row,col' for the nearest-prototypes view (pixel y, x lies in about "
        "cell y // output_stride, x // output_stride; the manifest's grid gives the exact size; default: 3 cells "
        "of each class region)",
    )
    parser.add_argument(
        "--iou-threshold",
        type=float,
        default=0.2,
        help="classes whose IoU on the image is below this get a failure view (default 0.2)",
    )
    parser.add_argument(
        "--top-prototypes",
        type=int,
        default=3,
        help="most used prototypes per class shown with their nearest training patches",
    )
    parser.add_argument(
        "--views",
        default=None,
        help="comma-separated subset of prototype_maps, group_maps, group_graph, nearest_patches, "
        "nearest_prototypes (default: all)",
    )
    parser.add_argument("--max-side", type=int, default=512, help="long side of the image in the figures")
    add_inference_options(parser)
    add_device(parser)
    add_config_options(parser)


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.commands.predict import list_images, output_names, require_input_output
    from scaleprotoseg.predict import Predictor

    if args.print_config:
        return print_config(run_config(args.run, args.stage, args.overrides))
    check_run_overrides(args.overrides)
    require_input_output(args, "explain", "IMAGE|DIR")
    src, out = Path(args.input), Path(args.output)
    files = list_images(src)
    label = Path(args.label) if args.label else None
    if label is not None and src.is_dir() and not label.is_dir():
        raise ValueError(f"--label {label}: --input {src} is a folder; expected a folder of masks <name>.png")
    if label is not None and src.is_file() and not label.is_file():
        raise FileNotFoundError(f"--label {label} is not a file; expected the index mask of --input {src}")
    predictor = Predictor.from_run(args.run, args.stage, args.device)
    predictor.cfg = apply_run_overrides(predictor.cfg, args.overrides, args.run)
    predictor.inference = inference_settings(args, predictor.cfg.data)
    if src.is_file():
        _explain_one(args, predictor, src, out, label, "")
        logger.info("manifest: %s", out / "manifest.json")
        return 0
    for f, rel in zip(files, output_names(files, src)):
        mask = label / rel.parent / f"{f.stem}.png" if label is not None else None
        _explain_one(args, predictor, f, out / rel, mask if mask is not None and mask.is_file() else None, f"{rel}: ")
    logger.info("manifests: %d in %s (<name>/manifest.json)", len(files), out)
    return 0


def _explain_one(args: argparse.Namespace, predictor, src: Path, out: Path, label: Path | None, prefix: str) -> None:
    """Explain one image into ``out`` and log what was written (``prefix``: the image's name within a folder)."""
    from scaleprotoseg.data.io import read_image, read_label
    from scaleprotoseg.explain.explainer import explain_image

    manifest = explain_image(
        predictor,
        read_image(src),
        out,
        label=read_label(label) if label is not None else None,
        run_dir=args.run,
        classes=args.classes,
        patches=args.patches,
        iou_threshold=args.iou_threshold,
        top_prototypes=args.top_prototypes,
        max_side=args.max_side,
        name=src.stem,
        views=[v.strip() for v in args.views.split(",") if v.strip()] if args.views else None,
    )
    n = sum(len(v["files"]) for c in manifest["classes"] for v in c["views"].values())
    fails = manifest["failure"]["cases"] if manifest.get("failure") else []
    line = f"{prefix}explained {len(manifest['classes'])} class(es) with {n} figure(s)"
    if manifest.get("failure") is not None:
        line += f"; {len(fails)} class(es) below IoU {args.iou_threshold:g}"
    logger.info("%s", line)
    for note in manifest.get("notes", []):
        logger.info("%snote: %s", prefix, note)
