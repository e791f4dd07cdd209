"""``scaleprotoseg explore RUN``: a local web app to ask, for any pixel, why this class (extra ``explore``).

``--finetune edit-NNN`` instead runs the short ``group_joint`` fine-tune of a saved edit and exits.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (ScaleProtoSeg or ProtoSeg)")
    parser.add_argument("--images", default=None, help="a folder of images to offer beside the validation split")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--stage", default=None, help="explore this stage's checkpoint (e.g. edit-001) not final/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--finetune",
        metavar="EDIT",
        default=None,
        help="fine-tune the saved edit EDIT (e.g. edit-001) with a short group_joint, save it as EDIT-finetune, exit",
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of --finetune (default 100)")
    parser.add_argument("--debug", action="store_true")


def run(args: argparse.Namespace) -> int:
    from scaleprotoseg.explore.edits import finetune_edit

    if args.finetune:
        out = finetune_edit(args.run, args.finetune, steps=args.steps, device=args.device)
        print(f"fine-tuned edit saved in {out}; measure it with: scaleprotoseg evaluate {args.run} --stage {out.name}")
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
    print(f"exploring {args.run} at http://{args.host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
