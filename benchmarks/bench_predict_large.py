"""Peak memory and time of ``Predictor.predict`` on one very large image (default 6000 x 6000), tiled and not.

With the ``whole`` test mode an image above ``Predictor.tile_above`` pixels is predicted in overlapping windows
(``scaleprotoseg predict --tile``), so the network's activations are bounded by the window, not the image. The model is
the nuclei sample config's ScaleProtoSeg (EfficientNet-Lite0, 2 classes) with random weights and ``test_mode: whole``:
memory and time do not depend on the weights. Target: the tiled prediction of a 6000 x 6000 image stays under 2 GB of
peak resident memory. The untiled run is measured only with ``--untiled`` (about 12 GB and several minutes on a 6000^2
image on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from common import PeakMemory, add_common_args, finish_args, markdown_table, report, rss_mb, verdict

from scaleprotoseg.checkpoint import CheckpointMeta
from scaleprotoseg.config import load_config
from scaleprotoseg.models.segmenter import build_model
from scaleprotoseg.predict import TILE_ABOVE, TILE_SIZE, Predictor

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "samples" / "nuclei_scaleprotoseg.yaml"
TARGET_MB = 2048


def build_predictor(device: torch.device, tile_size: int) -> Predictor:
    cfg = load_config(CONFIG, ["data.test_mode=whole", "model.pretrained=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=2).to(device).eval()
    info = SimpleNamespace(class_names=["background", "nucleus"], palette=[[0, 0, 0], [255, 0, 0]], ignore_index=255)
    meta = CheckpointMeta.of_model(model, stage="final", step=0, info=info, normalization=cfg.data.normalization)
    return Predictor(model, cfg, meta, device, tile_size=tile_size, tile_above=TILE_ABOVE if tile_size else 0)


def run_one(args: argparse.Namespace, tile_size: int) -> dict[str, Any]:
    predictor = build_predictor(args.device, tile_size)
    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, size=(args.size, args.size), dtype=np.uint8)  # a grey image, as the nuclei set
    before = rss_mb()
    with PeakMemory(args.device) as mem:
        t0 = time.perf_counter()
        labels = predictor.predict(image)
        seconds = time.perf_counter() - t0
    assert labels.shape == image.shape
    return {
        "size": args.size,
        "tiled": bool(tile_size) and predictor.tiled(args.size, args.size),
        "tile": tile_size,
        "seconds": seconds,
        "rss_before_mb": before,
        **mem.result(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, repeats=1, warmup=0)
    p.add_argument("--size", type=int, default=None, help="image side (default 6000; quick: 2200)")
    p.add_argument("--tile", type=int, default=TILE_SIZE, help=f"window side (default {TILE_SIZE})")
    p.add_argument("--untiled", action="store_true", help="also predict the image whole (needs about 12 GB)")
    args = finish_args(p.parse_args(argv))
    if args.size is None:
        args.size = 2200 if args.quick else 6000
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [run_one(args, args.tile)]
    if args.untiled:
        rows.append(run_one(args, 0))
    for r in rows:
        print(f"  {r['size']}^2 tiled={r['tiled']} {r['seconds']:.1f} s peak {r['peak_mb']:.0f} MB", flush=True)
    tiled = rows[0]
    targets = [
        {
            "target": f"predict of a {args.size}^2 image, tiled, peak RSS <= {TARGET_MB} MB",
            "value": tiled["peak_mb"],
            "met": bool(tiled["peak_mb"] <= TARGET_MB),
        }
    ]
    table = markdown_table(
        ["image", "tiled", "window", "s", "peak MB", "+MB in call"],
        [
            [f"{r['size']}x{r['size']}", r["tiled"], r["tile"] or "-", r["seconds"], r["peak_mb"], r["delta_mb"]]
            for r in rows
        ],
    )
    target_table = markdown_table(
        ["target", "value", "verdict"], [[t["target"], t["value"], verdict(t["met"])] for t in targets]
    )
    payload = {"rows": rows, "targets": targets}
    title = "Prediction of one large image (Predictor.predict, whole test mode)"
    return report("predict_large", title, [table, "### Targets\n\n" + target_table], payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
