"""``scaleprotoseg report RUN``: a static, self-contained HTML report of a run (summary, metrics, analyses,
prototypes and groups per class, explained images) in ``RUN/report/index.html``."""

from __future__ import annotations

import argparse


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
    parser.add_argument("--stage", default=None, help="report on this stage's checkpoint instead of final/")
    parser.add_argument(
        "--no-eval", action="store_true", help="do not compute a validation evaluation when RUN/eval has none"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.explain.report import build_report

    index = build_report(
        args.run,
        args.output,
        images=args.images,
        inputs=args.input,
        stage=args.stage,
        device=args.device,
        evaluate_missing=not args.no_eval,
    )
    print(f"report: {index}")
    return 0
