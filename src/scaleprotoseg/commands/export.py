"""``scaleprotoseg export RUN --format FORMAT --out PATH``: a run's model as ONNX, TorchScript, a ``torch.export``
program (:mod:`scaleprotoseg.export`) or a shareable Hugging Face Hub directory (:mod:`scaleprotoseg.pretrained`)."""

from __future__ import annotations

import argparse
import logging

from scaleprotoseg.commands.options import add_config_options, add_stage, print_config, run_config

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "exported-program", "hub")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--format", choices=FORMATS, help="file format (required; hub: a model directory)")
    parser.add_argument("--out", help="file to write (required; a directory for --format hub)")
    add_stage(parser)
    parser.add_argument(
        "--outputs",
        default="logits",
        help="comma-separated outputs of the graph: logits, prototypes (activations), groups (default: logits)",
    )
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="input size (default: data.crop_size)"
    )
    parser.add_argument("--no-verify", action="store_true", help="do not run the file to compare it with PyTorch")
    add_config_options(parser, overrides=False)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        return print_config(run_config(args.run, args.stage, []))
    if not args.format or not args.out:
        raise ValueError(f"export: expected --format ({', '.join(FORMATS)}) and --out PATH")
    if args.format == "hub":
        from scaleprotoseg.pretrained import save_pretrained

        out = save_pretrained(args.run, args.out, stage=args.stage)
        logger.info(
            "wrote %s (model.safetensors, config.json, README.md); load it with from_pretrained(%r)", out, str(out)
        )
        logger.info(
            "to share it: hf upload USER/NAME %s  (huggingface_hub CLI, or scaleprotoseg.pretrained.upload)", out
        )
        return 0
    from scaleprotoseg.export import export_run

    result = export_run(
        args.run,
        args.out,
        args.format,
        stage=args.stage,
        outputs=args.outputs.split(","),
        size=None if args.size is None else (args.size[0], args.size[1]),
        verify=not args.no_verify,
    )
    size = f"1x3x{result.size[0]}x{result.size[1]}"
    logger.info("wrote %s (%s, input %s, outputs: %s)", result.path, result.format, size, ", ".join(result.outputs))
    if result.check is not None:
        worst = ", ".join(f"{k} {v:.2e}" for k, v in result.check.max_abs.items())
        logger.info("checked against PyTorch on a random input: max |difference| %s", worst)
    elif result.note:
        logger.info("%s", result.note)
    return 0
