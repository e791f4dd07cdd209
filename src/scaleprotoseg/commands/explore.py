"""``scaleprotoseg explore RUN``: a local web app to ask, for any pixel, why this class (extra ``explore``).

``--finetune edit-NNN`` instead runs the short ``group_joint`` fine-tune of a saved edit and exits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scaleprotoseg.commands.options import add_config_options, add_device, add_stage, print_config, run_config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (ScaleProtoSeg or ProtoSeg)")
    parser.add_argument("--images", default=None, help="a folder of images to offer beside the validation split")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    add_stage(parser)
    add_device(parser, default="cpu")
    parser.add_argument(
        "--finetune",
        metavar="EDIT",
        default=None,
        help="fine-tune the saved edit EDIT (e.g. edit-001) with a short group_joint, save it as EDIT-finetune, exit",
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of --finetune (default 100)")
    add_config_options(parser, overrides=False)


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.explore.edits import finetune_edit

    if args.print_config:
        return print_config(run_config(args.run, args.stage, []))
    if args.finetune:
        out = finetune_edit(args.run, args.finetune, steps=args.steps, device=args.device)
        logger.info(
            "fine-tuned edit saved in %s; measure it with: scaleprotoseg evaluate %s --stage %s",
            out,
            args.run,
            out.name,
        )
        return 0
    try:
        import uvicorn

        from scaleprotoseg.explore.app import create_app
    except ImportError as err:
        raise RuntimeError(
            f"explore needs the extra 'explore' ({err.name} is missing): pip install 'scaleprotoseg[explore]'"
        ) from err
    from scaleprotoseg.explore.session import ExploreSession, ImageCatalog

    folder = Path(args.images) if args.images else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder; expected a folder of images")
    session = ExploreSession.from_run(args.run, args.stage, args.device)
    app = create_app(session, ImageCatalog(session.cfg, folder))
    logger.info("exploring %s at http://%s:%d/  (Ctrl-C to stop)", args.run, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
