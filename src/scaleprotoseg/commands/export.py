"""``scaleprotoseg export RUN --format FORMAT --out PATH``: a run's model as ONNX, TorchScript, a ``torch.export``
program (:mod:`scaleprotoseg.export`) or a shareable Hugging Face Hub directory (:mod:`scaleprotoseg.pretrained`)."""

from __future__ import annotations

import argparse

FORMATS = ("onnx", "torchscript", "exported-program", "hub")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--format", required=True, choices=FORMATS, help="file format (hub: a model directory)")
    parser.add_argument("--out", required=True, help="file to write (a directory for --format hub)")
    parser.add_argument("--stage", default=None, help="export this stage's checkpoint instead of final/")
    parser.add_argument(
        "--outputs",
        default="logits",
        help="comma-separated outputs of the graph: logits, prototypes (activations), groups (default: logits)",
    )
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="input size (default: data.crop_size)"
    )
    parser.add_argument("--no-verify", action="store_true", help="do not run the file to compare it with PyTorch")
    parser.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.format == "hub":
        from scaleprotoseg.pretrained import save_pretrained

        out = save_pretrained(args.run, args.out, stage=args.stage)
        print(f"wrote {out} (model.safetensors, config.json, README.md); load it with from_pretrained({str(out)!r})")
        print(f"to share it: hf upload USER/NAME {out}  (huggingface_hub CLI, or scaleprotoseg.pretrained.upload)")
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
    print(
        f"wrote {result.path} ({result.format}, input 1x3x{result.size[0]}x{result.size[1]}, outputs: "
        f"{', '.join(result.outputs)})"
    )
    if result.check is not None:
        worst = ", ".join(f"{k} {v:.2e}" for k, v in result.check.max_abs.items())
        print(f"checked against PyTorch on a random input: max |difference| {worst}")
    elif result.note:
        print(result.note)
    return 0
