"""``scaleprotoseg evaluate RUN``: mIoU, per-class IoU (CSV), pixel accuracy and confusion matrix of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--split", default=None, help="dataset split (default: the config's validation split)")
    parser.add_argument("--stage", default=None, help="evaluate this stage's checkpoint instead of final/")
    parser.add_argument(
        "--mode",
        choices=["whole", "sliding", "short_side"],
        default=None,
        help="inference mode (default: the config's data.test_mode)",
    )
    parser.add_argument("--test-size", type=int, default=None, help="short side / window size (default: config)")
    parser.add_argument("--msc", default=None, help="comma-separated input scales with max fusion, e.g. 0.5,0.75,1")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped prediction")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the config's data.root)")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/eval/<stage>-<split>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.data.registry import build_dataset
    from scaleprotoseg.engine import distributed as dist_utils
    from scaleprotoseg.evaluation.evaluate import evaluate
    from scaleprotoseg.evaluation.miou import write_results
    from scaleprotoseg.evaluation.plots import plot_confusion_matrix, plot_per_class_iou
    from scaleprotoseg.predict import load_run_model

    info_dist = dist_utils.init_distributed(args.device)
    device = dist_utils.resolve_device(args.device, info_dist)
    model, cfg, info = load_run_model(args.run, args.stage, device)
    d = cfg.data
    if args.data_root:
        d.root = args.data_root
    split = args.split or d.val_split
    dataset = build_dataset(d, split, train=False)
    msc = tuple(float(s) for s in args.msc.split(",")) if args.msc else tuple(d.msc_scales)
    res = evaluate(
        model,
        dataset,
        num_classes=len(info.class_names),
        ignore_index=info.ignore_index,
        device=device,
        mode=args.mode or d.test_mode,
        crop_size=tuple(d.crop_size),
        test_size=d.test_size if args.test_size is None else args.test_size,
        msc_scales=msc,
        flip=args.flip,
        max_samples=args.max_images,
        progress=not args.no_progress,
    )
    if not info_dist.is_main:
        return 0
    out = Path(args.out) if args.out else Path(args.run) / "eval" / f"{args.stage or 'final'}-{split}"
    write_results(res, info.class_names, out)
    plot_confusion_matrix(res["matrix"], info.class_names, out / "confusion_matrix.png")
    plot_per_class_iou(res["iou"], info.class_names, out / "per_class_iou.png")
    summary = {
        "run": str(args.run),
        "stage": args.stage or "final",
        "split": split,
        "miou": res["miou"],
        "pixel_accuracy": res["pixel_accuracy"],
        "num_images": res["num_images"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"mIoU {100 * res['miou']:.2f}  pixel accuracy {100 * res['pixel_accuracy']:.2f}  "
        f"({res['num_images']} images, {split}, {args.stage or 'final'})"
    )
    absent = [n for n, p in zip(info.class_names, res["present"]) if not p]
    if absent:
        print(f"absent from this split (not counted): {', '.join(absent)}")
    print(f"results in {out}")
    return 0
