"""``scaleprotoseg evaluate RUN``: mIoU, per-class IoU (CSV), pixel accuracy and confusion matrix of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scaleprotoseg.commands.options import (
    add_config_options,
    add_data_root,
    add_device,
    add_inference_options,
    add_progress,
    add_stage,
    apply_run_overrides,
    inference_settings,
    print_config,
    run_config,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--split", default=None, help="dataset split (default: the config's validation split)")
    add_stage(parser)
    add_inference_options(parser)
    add_data_root(parser)
    parser.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    add_device(parser)
    parser.add_argument("--out", default=None, help="output directory (default: RUN/eval/<stage>-<split>)")
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the majority-class and Otsu threshold baselines (baselines.json) on the same split",
    )
    parser.add_argument(
        "--forest",
        action="store_true",
        help="add the pixel-forest baseline (random forest on filter features; needs scikit-learn)",
    )
    parser.add_argument(
        "--without",
        default=None,
        metavar="P1,P2",
        help="switch off prototypes (p3 or 3) and groups (g1) first, as `explore` does; results go to "
        "eval/<stage>-<split>-without-<list> beside the unedited model's mIoU",
    )
    add_config_options(parser)
    add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.checkpoint import load_model
    from scaleprotoseg.data.registry import build_dataset
    from scaleprotoseg.engine import distributed as dist_utils
    from scaleprotoseg.evaluation.evaluate import evaluate
    from scaleprotoseg.evaluation.split import evaluate_split
    from scaleprotoseg.rundir import BASELINES, RunDir

    if args.print_config:
        return print_config(run_config(args.run, args.stage, args.overrides))
    info_dist = dist_utils.init_distributed(args.device)
    device = dist_utils.resolve_device(args.device, info_dist)
    loaded = load_model(args.run, args.stage, device)
    model, cfg, info = loaded.model, apply_run_overrides(loaded.config, args.overrides, args.run), loaded.meta
    ablation = None
    if args.without:
        from scaleprotoseg.explore.decision import Ablation
        from scaleprotoseg.explore.edits import apply_ablation

        ablation = Ablation.parse(args.without)
        if ablation.empty:
            raise ValueError(f"--without {args.without!r}: names nothing; expected e.g. p3,p7,g1")
        base_model = model
        model = apply_ablation(model, ablation)[0]
    d = cfg.data
    if args.data_root:
        d.root = args.data_root
    split = args.split or d.val_split
    dataset = build_dataset(d, split, train=False)
    check_same_classes(list(dataset.info.class_names), list(info.class_names), d.root, args.run)
    settings = inference_settings(args, d)
    out = Path(args.out) if args.out else RunDir(args.run).eval_dir(args.stage, split)
    if ablation is not None and not args.out:
        out = out.with_name(f"{out.name}-without-{ablation.label()}")
    done = evaluate_split(
        model,
        dataset,
        class_names=info.class_names,
        out_dir=out if info_dist.is_main else None,
        ignore_index=info.ignore_index,
        device=device,
        inference=settings,
        max_samples=args.max_images,
        progress=not args.no_progress,
        summary={"run": str(args.run), "stage": args.stage or "final", "split": split},
    )
    if not info_dist.is_main:
        return 0
    res, summary = done.result, done.summary
    print(
        f"mIoU {100 * res['miou']:.2f}  pixel accuracy {100 * res['pixel_accuracy']:.2f}  "
        f"({res['num_images']} images, {split}, {args.stage or 'final'})"
    )
    if ablation is not None:
        base = evaluate(
            base_model,
            dataset,
            num_classes=len(info.class_names),
            ignore_index=info.ignore_index,
            device=device,
            inference=settings,
            max_samples=args.max_images,
            progress=not args.no_progress,
        )
        summary.update(without=ablation.to_dict(), miou_unedited=base["miou"], miou_change=res["miou"] - base["miou"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"without {ablation.label()}: mIoU {100 * res['miou']:.2f} vs {100 * base['miou']:.2f} unedited "
            f"({100 * (res['miou'] - base['miou']):+.2f})"
        )
    absent = [n for n, p in zip(info.class_names, res["present"]) if not p]
    if absent:
        print(f"absent from this split (not counted): {', '.join(absent)}")
    if not args.no_baselines:
        try:
            summary["baselines"] = _baselines(
                d, dataset, res["miou"], out / BASELINES, args.max_images, split, args.forest
            )
        except Exception as err:  # the model's results are written already; a baseline must not fail the command
            if args.debug:
                raise
            print(f"baselines: not computed ({type(err).__name__}: {err})")
        else:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results in {out}")
    return 0


def check_same_classes(data_names: list[str], run_names: list[str], root: str, run: str) -> None:
    """Refuse a dataset whose class names (or count) differ from the model's: its IoUs would carry wrong names."""
    if data_names == run_names:
        return
    if len(data_names) != len(run_names):
        why = f"{len(data_names)} classes, the run's model has {len(run_names)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(data_names, run_names)) if a != b)
        why = f"class {i} is {data_names[i]!r}, the run's model calls it {run_names[i]!r}"
    raise ValueError(
        f"{root}: the dataset's classes differ from those of run {run} ({why}); expected the classes the model was "
        f"trained on: {', '.join(run_names)}"
    )


def _baselines(
    data_cfg, dataset, model_miou: float, path: Path, max_images: int, split: str, forest: bool = False
) -> dict[str, float | None]:
    """Score the baselines on the evaluated split, print the comparison, write ``path``; ``{name: mIoU}``."""
    import dataclasses
    import math

    from scaleprotoseg.data.registry import build_dataset
    from scaleprotoseg.evaluation.baselines import baseline_report

    try:  # the images the model was trained on (max_train_samples), read whole without augmentation
        train = build_dataset(
            dataclasses.replace(data_cfg, max_val_samples=data_cfg.max_train_samples), data_cfg.train_split, train=False
        )
    except Exception as err:  # e.g. a test-only copy of the data: keep the baselines that need no training
        print(f"baselines: no training split ({type(err).__name__}: {err}); only those that need no training")
        train = None
    extra = {"split": split, "train_split": data_cfg.train_split if train is not None else None}
    results, lines = baseline_report(
        train, dataset, model_miou, path, max_images=max_images, extra=extra, forest=forest
    )
    for line in lines:
        print(line)
    return {r.name: (r.miou if math.isfinite(r.miou) else None) for r in results}
