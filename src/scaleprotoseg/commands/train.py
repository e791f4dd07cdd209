"""``scaleprotoseg train``: all stages of a config into a run directory, then the nearest training patches of the
final model for the explanations; ``--resume`` continues where it stopped (also an unfinished export). One process
works in a run directory at a time (its lock); a resume keeps the run's config unless ``--allow-changes`` is given,
and every start, resume and allowed change is recorded in the run's ``history.jsonl``. The messages of the command
and of the trainer (with the loss terms of every ``train.log_every`` step) also go to the run's ``train.log``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from scaleprotoseg.commands.options import add_config_options, add_device, add_progress, print_config
from scaleprotoseg.rundir import RunDir

if TYPE_CHECKING:
    from scaleprotoseg.config import Config

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config file (see configs/)")
    add_config_options(parser, run=False)
    parser.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this directory from its last checkpoint")
    parser.add_argument("--stages", help="comma-separated subset of stages to run, e.g. group_warmup,group_joint")
    add_device(parser, default=None)
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="let --resume (or --stages on an existing run) change the run's config; the change goes to history.jsonl",
    )
    parser.add_argument("--stop-at", metavar="STAGE:STEP", help="stop after this optimizer step (resume later)")
    add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.config import load_config
    from scaleprotoseg.engine import distributed as dist_utils

    if args.resume:
        run = RunDir(args.resume)
        if not run.config.is_file():
            raise FileNotFoundError(f"--resume {run.root}: no config.yaml there; is it a run directory?")
        cfg = load_config(run.config, args.overrides)
    else:
        if not args.config:
            raise ValueError("train: give a config with -c CONFIG (or --resume RUN)")
        cfg = load_config(args.config, args.overrides)
        run = RunDir(args.run_dir or Path("runs") / cfg.name)
    if args.print_config:
        return print_config(cfg)
    stop_at = None
    if args.stop_at:
        stage, _, step = args.stop_at.rpartition(":")
        if not stage or not step.isdigit():
            raise ValueError(f"--stop-at {args.stop_at!r}: expected STAGE:STEP, e.g. joint:100")
        stop_at = (stage, int(step))
    from scaleprotoseg.data.check import require_preflight

    require_preflight(cfg.data, str(run.config if args.resume else args.config))  # headers, before the first step
    dist_utils.init_distributed(args.device or cfg.train.device)
    # The main process holds the run directory; the other ranks of a distributed run work under its lock.
    main = dist_utils.current().is_main
    with run.lock() if main else nullcontext(), train_log(run) if main else nullcontext():
        return _train(args, run, cfg, stop_at)


@contextmanager
def train_log(run: RunDir) -> Iterator[logging.Handler]:
    """Append the package's messages (debug ones too: the loss terms of the logged steps) to the run's
    ``train.log`` while training, and the error that stops a run."""
    run.root.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.train_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package = logging.getLogger("scaleprotoseg")
    package.addHandler(handler)
    try:
        yield handler
    except BaseException as err:
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"stopped by {type(err).__name__}: {err}"
        handler.handle(logging.LogRecord(logger.name, logging.ERROR, __file__, 0, why, None, None))
        raise
    finally:
        package.removeHandler(handler)
        handler.close()


def _train(args: argparse.Namespace, run: RunDir, cfg: Config, stop_at: tuple[str, int] | None) -> int:
    from scaleprotoseg.config import config_changes, load_config
    from scaleprotoseg.engine.trainer import StopRequested, Trainer
    from scaleprotoseg.explain.nearest import export_final_nearest

    changes: dict[str, list] = {}
    if not args.resume and run.state_file.is_file() and not args.stages and run.has_progress():
        raise ValueError(
            f"run directory {run.root} already holds a run; use --resume {run.root} to continue it, "
            "--stages to re-run chosen stages, or another --run-dir"
        )
    if run.config.is_file() and (args.resume or args.stages):
        changes = config_changes(load_config(run.config), cfg)
        if changes and not args.allow_changes:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in ((k, *v) for k, v in changes.items()))
            raise ValueError(
                f"{run.config}: this would change the run's config ({listed}); "
                "add --allow-changes to continue with the new values (recorded in history.jsonl)"
            )
    trainer = Trainer(cfg, run.root, device=args.device, progress=not args.no_progress, stop_at=stop_at)
    if trainer.dist.is_main:
        event = "resume" if args.resume else ("stages" if args.stages else "start")
        run.append_history(event, command=" ".join(sys.argv), **({"changes": changes} if changes else {}))
        logger.info("%s of run %s (%s) on %s", event, run.root, cfg.name, trainer.device)
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        results = trainer.run_stages(only, argv=sys.argv)
    except StopRequested as stop:
        logger.info("%s; continue with: scaleprotoseg train --resume %s", stop, run.root)
        return 0
    if trainer.dist.is_main and run.read_state().get("final") == "model":
        # the step after training: nearest training patches for the explanations (also when a resume finds it undone)
        export_final_nearest(run, device=trainer.device)
        run.write_state({**run.read_state(), "final": "done"})
    if trainer.dist.is_main:
        for r in results:
            miou = r.metrics.get("val_miou")
            extra = f"  val mIoU {100 * miou:.2f}" if miou is not None else ""
            print(f"{r.name:>14} [{r.kind}]{extra}")
        logger.info("run directory: %s  (final model in %s)", run.root, run.final)
    return 0
