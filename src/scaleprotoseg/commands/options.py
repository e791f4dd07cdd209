"""Options that several verbs share, declared once, and the glue that turns them into settings.

Every verb gets :func:`add_common` (``--debug``, ``-v``, ``-q``) from :mod:`scaleprotoseg.cli`; a verb adds the groups
it uses: :func:`add_device`, :func:`add_stage`, :func:`add_progress`, :func:`add_data_root`, :func:`add_config_options`
(``--set``, ``--print-config``) and :func:`add_inference_options` (``--mode``, ``--test-size``, ``--msc``,
``--msc-fusion``, ``--flip``, turned into one :class:`~scaleprotoseg.evaluation.inference.InferenceSettings` by
:func:`inference_settings`). Nothing heavy is imported here: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaleprotoseg.config import Config, DataConfig
    from scaleprotoseg.evaluation.inference import InferenceSettings

INFERENCE_MODES = ("whole", "sliding", "short_side", "fixed")
MSC_FUSIONS = ("features", "logits")


def add_common(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--debug``, ``-v/--verbose`` and ``-q/--quiet`` (also accepted before the verb). ``suppress``: a sub-command
    parser, whose defaults must not overwrite what its parent parsed."""
    debug: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    count: dict[str, Any] = debug or {"default": 0}
    group = parser.add_argument_group("output")
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error", **debug)
    group.add_argument("-v", "--verbose", action="count", help="more messages (-v: debug messages too)", **count)
    group.add_argument("-q", "--quiet", action="count", help="fewer messages (warnings and results only)", **count)


def add_device(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    shown = "the config's train.device" if default is None else default
    parser.add_argument("--device", default=default, help=f"auto, cpu, cuda or cuda:N (default: {shown})")


def add_stage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage", default=None, help="use this stage's checkpoint (e.g. joint, edit-001) instead of final/"
    )


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, help="dataset root (default: the config's data.root)")


def add_config_options(parser: argparse.ArgumentParser, *, run: bool = True, overrides: bool = True) -> None:
    """``--set KEY=VALUE`` (repeatable) and ``--print-config``. ``run``: the config is a trained run's, whose model
    and training are fixed, so only ``data.*`` keys may change. ``overrides``: False for a verb that reads the run's
    config without changing it (``--print-config`` only; ``args.overrides`` is then empty)."""
    example = "data.test_mode=sliding" if run else "train.stages.joint.steps=100"
    what = "a data.* value of the run's config" if run else "a config value"
    if overrides:
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"override {what} (YAML 1.2 value), e.g. --set {example} (repeatable)",
        )
    else:
        parser.set_defaults(overrides=[])
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (files merged, --set applied, paths absolute) as YAML and exit",
    )


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """The test-time settings of ``evaluate``, ``predict`` and ``explain`` (default: the run's data section)."""
    group = parser.add_argument_group("inference (default: the run's data.test_mode, test_size, msc_*)")
    group.add_argument("--mode", choices=INFERENCE_MODES, default=None, help="inference mode (data.test_mode)")
    group.add_argument(
        "--test-size", type=int, default=None, help="short side / square side / window size (data.test_size)"
    )
    group.add_argument("--msc", default=None, help="comma-separated input scales with max fusion, e.g. 0.5,0.75,1")
    group.add_argument(
        "--msc-fusion",
        choices=MSC_FUSIONS,
        default=None,
        help="what multi-scale inputs max-fuse: ASPP features (the release) or logits (data.msc_fusion)",
    )
    group.add_argument("--flip", action="store_true", help="average with the horizontally flipped prediction")


def inference_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of :class:`InferenceSettings` that the inference options set (checked: one-line errors)."""
    changes: dict[str, Any] = {"flip": bool(args.flip)}
    if args.mode:
        changes["mode"] = args.mode
    if args.test_size is not None:
        if args.test_size <= 0:
            raise ValueError(f"--test-size {args.test_size}: expected a positive size in pixels")
        changes["test_size"] = args.test_size
    if args.msc:
        try:
            scales = tuple(float(s) for s in args.msc.split(","))
        except ValueError:
            scales = ()
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"--msc {args.msc!r}: expected comma-separated positive scales, e.g. 0.5,0.75,1")
        changes["msc_scales"] = scales
    if args.msc_fusion:
        changes["msc_fusion"] = args.msc_fusion
    return changes


def inference_settings(args: argparse.Namespace, data_cfg: DataConfig) -> InferenceSettings:
    """The one record of test-time settings: the run's data section with the inference options on top."""
    from scaleprotoseg.evaluation.inference import InferenceSettings

    settings = InferenceSettings.from_config(data_cfg, **inference_changes(args))
    if settings.mode in ("short_side", "fixed") and settings.test_size <= 0:
        raise ValueError(f"--mode {settings.mode}: the run's data.test_size is 0; expected --test-size N")
    return settings


def check_run_overrides(overrides: list[str]) -> None:
    """Refuse a ``--set`` on a trained run that names anything but a ``data.*`` key (before any work is done)."""
    from scaleprotoseg.config import ConfigError

    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("data."):
            raise ConfigError(
                f"--set {item!r}: a trained run's model and training are fixed; expected a data.* key "
                "(e.g. data.root=DIR, data.test_mode=sliding)"
            )


def apply_run_overrides(cfg: Config, overrides: list[str], source: str) -> Config:
    """``cfg`` (a trained run's) with ``--set data.*`` values applied; other keys are refused (the weights fix the
    model, the run fixes its training)."""
    check_run_overrides(overrides)
    if not overrides:
        return cfg
    from scaleprotoseg.config import apply_overrides, build_config, to_dict

    changed = build_config(apply_overrides(to_dict(cfg), overrides), f"{source} with --set")
    cfg.data = changed.data
    return cfg


def run_config(run: str, stage: str | None, overrides: list[str]) -> Config:
    """The config a verb reading run ``run`` works with: the checkpoint's copy (``final/config.yaml``) or the run's
    ``config.yaml``, with ``--set data.*`` values applied."""
    from scaleprotoseg.config import load_config
    from scaleprotoseg.rundir import RunDir

    rd = RunDir(run)
    ckpt = rd.checkpoint(stage)
    path = ckpt.config if ckpt.config.is_file() else rd.config
    if not path.is_file():
        raise FileNotFoundError(f"{rd.config}: no such file; expected a run directory with its config.yaml")
    return apply_run_overrides(load_config(path), overrides, str(path))


def print_config(cfg: Config) -> int:
    """Write ``cfg`` as YAML to stdout (``--print-config``); returns the exit status 0."""
    import yaml

    from scaleprotoseg.config import to_dict

    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    sys.stdout.flush()
    return 0
