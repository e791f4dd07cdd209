"""``scaleprotoseg report RUN``: a static, self-contained HTML report of a run (summary, metrics, analyses,
prototypes and groups per class, explained images) in ``RUN/report/index.html``."""

from __future__ import annotations

import argparse
import logging

from scaleprotoseg.commands.options import add_config_options, add_device, add_stage, print_config, run_config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--output", default=None, help="output directory (default: RUN/report)")
    parser.add_argument(
        "--images",
        type=int,
        default=3,
        help="explain the first N validation images when the data is available (default 3)",
    )
    parser.add_argument(
        "--input", nargs="+", default=None, help="image file(s) to explain instead of validation images"
    )
    add_stage(parser)
    parser.add_argument(
        "--no-eval", action="store_true", help="do not compute a validation evaluation when RUN/eval has none"
    )
    add_device(parser)
    add_config_options(parser, overrides=False)


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.explain.report import build_report

    if args.print_config:
        return print_config(run_config(args.run, args.stage, []))
    index = build_report(
        args.run,
        args.output,
        images=args.images,
        inputs=args.input,
        stage=args.stage,
        device=args.device,
        evaluate_missing=not args.no_eval,
    )
    logger.info("report: %s", index)
    return 0
