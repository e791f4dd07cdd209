"""``scaleprotoseg explain RUN --input IMAGE --output DIR``: prototype, group, nearest-patch and failure views of
one prediction (paper Figures 4-5, 11-35), with a ``manifest.json`` listing every figure."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--input", required=True, help="the image to explain")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--label",
        default=None,
        help="ground-truth index mask (the model's class indices) -> failure view of badly segmented classes",
    )
    parser.add_argument("--stage", default=None, help="explain this stage's checkpoint instead of final/")
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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.data.io import read_image, read_label
    from scaleprotoseg.explain.explainer import explain_image
    from scaleprotoseg.predict import Predictor

    src = Path(args.input)
    if not src.is_file():
        raise FileNotFoundError(f"--input {src} is not a file; expected an image")
    predictor = Predictor.from_run(args.run, args.stage, args.device)
    image = read_image(src)
    label = read_label(args.label) if args.label else None
    manifest = explain_image(
        predictor,
        image,
        args.output,
        label=label,
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
    line = f"explained {len(manifest['classes'])} class(es) with {n} figure(s)"
    if manifest.get("failure") is not None:
        line += f"; {len(fails)} class(es) below IoU {args.iou_threshold:g}"
    print(line)
    for note in manifest.get("notes", []):
        print(f"note: {note}")
    print(f"manifest: {Path(args.output) / 'manifest.json'}")
    return 0
