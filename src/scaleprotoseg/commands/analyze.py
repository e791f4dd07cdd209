"""``scaleprotoseg analyze RUN METRIC...``: interpretability metrics of a trained run (paper section 4.2, Tables 2-4,
7, 9, 10, Figures 3 and 7). Each metric writes ``RUN/analysis/<metric>.{json,csv,png}``; see docs/analysis.md.

``scaleprotoseg analyze aggregate RUN RUN... --out DIR``: several runs (seeds) as mean +- std in the layout of
Tables 1, 3-6 and 10 (:mod:`scaleprotoseg.analysis.aggregate`).

``scaleprotoseg analyze compare RUN_A RUN_B``: the group activations of both runs side by side on run A's first
validation images (Figure 6, :mod:`scaleprotoseg.analysis.groups_compare`), into ``RUN_A/analysis/``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scaleprotoseg.analysis.runner import METRICS
from scaleprotoseg.commands.options import (
    add_config_options,
    add_data_root,
    add_device,
    add_progress,
    add_stage,
    apply_run_overrides,
    check_run_overrides,
    print_config,
    run_config,
)

logger = logging.getLogger(__name__)

AGGREGATE = "aggregate"
COMPARE = "compare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="run directory, 'aggregate' followed by several run directories, or 'compare' followed by two"
    )
    parser.add_argument(
        "metrics",
        nargs="+",
        metavar="METRIC",
        help=f"one or more of {', '.join(METRICS)}, or all (every metric that applies to the run); after "
        "'aggregate': the run directories",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="dataset split (default: the config's validation split; equivariance: its train split)",
    )
    add_data_root(parser)
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N images (0: all)")
    add_stage(parser)
    add_device(parser)
    parser.add_argument(
        "--parts-dataset",
        default=None,
        help="part-annotated dataset for consistency/stability: cityscapes_panoptic_parts, "
        "pascal_panoptic_parts or folder_parts (default: the run's dataset if it has parts)",
    )
    parser.add_argument(
        "--parts-root",
        default=None,
        help="part annotations: the Pascal-Panoptic-Parts label folder, Cityscapes' "
        "gtFinePanopticParts folder, or a folder_parts directory",
    )
    parser.add_argument(
        "--count-background",
        action="store_true",
        help="consistency/stability: count the background component as a part keypoint, as the "
        "authors' release does (a bug kept for comparison)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the stability noise")
    parser.add_argument("--noise-std", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: data.num_workers)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/analysis; aggregate: ./aggregate)")
    add_config_options(parser)
    add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.analysis.results import format_table
    from scaleprotoseg.analysis.runner import AnalysisContext, AnalysisOptions, MissingInput, run_metrics, save_result
    from scaleprotoseg.analysis.stability import NOISE_STD
    from scaleprotoseg.engine.distributed import resolve_device
    from scaleprotoseg.rundir import RunDir

    if args.run == AGGREGATE and not (Path(AGGREGATE) / "config.yaml").is_file():  # not a run named 'aggregate'
        return _aggregate(args.metrics, Path(args.out or AGGREGATE))
    if args.run == COMPARE and not (Path(COMPARE) / "config.yaml").is_file():  # not a run named 'compare'
        return _compare(args)
    if args.print_config:
        return print_config(run_config(args.run, args.stage, args.overrides))
    check_run_overrides(args.overrides)
    unknown = [m for m in args.metrics if m not in (*METRICS, "all")]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; expected any of {', '.join(METRICS)} or all")
    if args.max_images < 0:
        raise ValueError(f"--max-images {args.max_images}: expected 0 (all) or a positive count")
    noise = NOISE_STD if args.noise_std is None else float(args.noise_std)
    if noise < 0:
        raise ValueError(f"--noise-std {noise}: expected a non-negative standard deviation")
    every = "all" in args.metrics
    metrics = list(METRICS) if every else list(dict.fromkeys(args.metrics))
    options = AnalysisOptions(
        split=args.split,
        data_root=args.data_root,
        max_images=args.max_images,
        stage=args.stage,
        parts_dataset=args.parts_dataset,
        parts_root=args.parts_root,
        seed=args.seed,
        count_background=args.count_background,
        noise_std=noise,
        progress=not args.no_progress,
        num_workers=args.workers,
    )
    ctx = AnalysisContext.open(args.run, resolve_device(args.device), options, metrics)
    ctx.cfg = apply_run_overrides(ctx.cfg, args.overrides, args.run)
    out = Path(args.out) if args.out else RunDir(args.run).analysis
    failed = []
    for analysis, result in run_metrics(ctx, metrics):
        metric = analysis.name
        if isinstance(result, Exception):
            if isinstance(result, MissingInput) and not every:
                print(f"{metric}: error: {result}", file=sys.stderr)
                failed.append(metric)
            else:
                logger.info("%s: skipped (%s run): %s", metric, ctx.info.method, result)
            continue
        paths = save_result(analysis, result, out)
        print(f"\n{result.title}")
        print(format_table(result.columns, result.rows))
        logger.info("-> %s", ", ".join(str(p) for p in paths.values()))
    return 1 if failed else 0


def _aggregate(runs: list[str], out: Path) -> int:
    """``analyze aggregate RUN...``: read every run, write and print the tables."""
    from scaleprotoseg.analysis.aggregate import build_tables, read_run, table_markdown, write_aggregate

    records = [read_run(r) for r in runs]
    paths = write_aggregate(records, out)
    for table in build_tables(records):
        print(table_markdown(table) + "\n")
    logger.info("-> %s (%d runs)", paths["tables"], len(records))
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``analyze compare RUN_A RUN_B``: Figure 6, written into RUN_A's analysis folder (or --out)."""
    from scaleprotoseg.analysis.groups_compare import DEFAULT_IMAGES, GroupsCompareAnalysis
    from scaleprotoseg.analysis.results import format_table
    from scaleprotoseg.analysis.runner import AnalysisContext, AnalysisOptions, save_result
    from scaleprotoseg.engine.distributed import resolve_device
    from scaleprotoseg.rundir import RunDir

    if len(args.metrics) != 2:
        raise ValueError(f"analyze compare: got {len(args.metrics)} run(s); expected two: RUN_A RUN_B")
    if args.max_images < 0:
        raise ValueError(f"--max-images {args.max_images}: expected 0 (default: {DEFAULT_IMAGES}) or a positive count")
    options = AnalysisOptions(
        split=args.split, data_root=args.data_root, stage=args.stage, seed=args.seed, progress=not args.no_progress
    )
    device = resolve_device(args.device)
    run_a, run_b = (AnalysisContext.open(r, device, options) for r in args.metrics)
    analysis = GroupsCompareAnalysis(run_b, args.max_images or DEFAULT_IMAGES)
    result = analysis.compute(run_a)
    paths = save_result(analysis, result, Path(args.out) if args.out else RunDir(args.metrics[0]).analysis)
    print(f"\n{result.title}")
    print(format_table(result.columns, result.rows))
    logger.info("-> %s", ", ".join(str(p) for p in paths.values()))
    return 0
