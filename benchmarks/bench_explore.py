"""Response times of ``scaleprotoseg explore`` on the CPU: what a user waits for after each action.

The demo-like model (ScaleProtoSeg on dilated EfficientNet-Lite0, output stride 8, ASPP rates 1-4 x 32 channels,
3 prototypes per class and scale, 3 groups per class with sparse trained-like weights, random weights otherwise: the
cost does not depend on them), on a square image, 2 classes (the nuclei demo) and 19 (Cityscapes-sized head):

- open: the one forward pass per image (the activations are cached);
- click: the decision at a pixel (``ExploreSession.cell``: a gather and the decomposition of the predicted class);
- switch off: a prototype switched off, the prediction of the whole image recomputed from the cached activations,
  the changed pixels counted and the new prediction encoded as the PNG the page shows.

Targets (512 x 512, 2 classes): click < 0.3 s, switch off < 1 s. ``--quick``: 64 x 64, 1 repeat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from itertools import count
from typing import Any

import numpy as np
import torch
from common import add_common_args, finish_args, markdown_table, measure, parse_list, report, verdict

from scaleprotoseg.checkpoint import CheckpointMeta
from scaleprotoseg.config import load_config
from scaleprotoseg.explore.app import encode_png
from scaleprotoseg.explore.decision import Ablation
from scaleprotoseg.explore.session import ExploreSession
from scaleprotoseg.models.segmenter import build_model

CLICK_TARGET, SWITCH_TARGET = 0.3, 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, repeats=5, warmup=1)
    p.add_argument("--size", type=int, default=512, help="image side (default 512)")
    p.add_argument("--classes", default="2,19", help="comma-separated class counts (default 2,19)")
    args = finish_args(p.parse_args(argv))
    if args.quick:
        args.size = 64
    args.classes = parse_list(args.classes, int)
    return args


def make_session(num_classes: int, device: torch.device) -> ExploreSession:
    sets = [
        "model.method=scaleprotoseg",
        "model.backbone=efficientnet_lite0",
        "model.pretrained=null",
        "model.output_stride=8",
        "model.aspp_rates=[1, 2, 3, 4]",
        "model.aspp_channels=32",
        "model.prototypes_per_class=3",
        "model.groups_per_class=3",
        "data.test_mode=whole",
    ]
    cfg = load_config(None, sets)
    model = build_model(cfg.model, num_classes)
    head = model.head
    with torch.no_grad():
        head.enable_groups()
        head.grouping.weight.uniform_(-0.5, 1)
        head.grouping.project_()
        head.grouping.threshold_(0.05)
    model.to(device).eval()
    palette = np.random.default_rng(0).integers(0, 255, (num_classes, 3)).astype(np.uint8)
    names = [f"class{i}" for i in range(num_classes)]
    meta = CheckpointMeta("scaleprotoseg", "bench", names, palette, 255, "imagenet", 8, model.structure())
    return ExploreSession(model, cfg, meta, device=device)


def run_case(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    session = make_session(num_classes, args.device)
    rng = np.random.default_rng(args.seed)
    size = args.size
    images = count()

    def open_image() -> Any:
        next(images)
        return session.analyse(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "bench")

    opened = measure(open_image, args.device, args.repeats, args.warmup)
    state = open_image()
    session.prediction(state)  # the page shows the prediction before the first click
    pixels = rng.integers(0, size, (10_000, 2))
    clicks = count()

    def click() -> Any:
        y, x = pixels[next(clicks)]
        return session.cell(state, int(y), int(x))

    clicked = measure(click, args.device, args.repeats, args.warmup)
    used = torch.nonzero(session.tables.group_weight.sum(0) > 0).flatten().tolist()
    offs = count()

    def switch_off() -> Any:
        ablation = Ablation.of([used[next(offs) % len(used)]])
        state.predictions = {k: v for k, v in state.predictions.items() if k.empty}  # never answered from the cache
        changes = session.changes(state, ablation)
        return changes["changed_pixels"], encode_png(session.meta.palette[session.prediction(state, ablation)])

    switched = measure(switch_off, args.device, args.repeats, args.warmup)
    return {
        "classes": num_classes,
        "size": size,
        "prototypes": session.tables.num_prototypes,
        "groups": session.tables.num_groups,
        "grid": list(state.grid),
        "open_s": opened["median_s"],
        "click_s": clicked["median_s"],
        "switch_off_s": switched["median_s"],
        "peak_mb": opened.get("peak_mb"),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [run_case(args, c) for c in args.classes]
    table = markdown_table(
        ["classes", "image", "grid", "prototypes", "groups", "open s", "click s", "switch off s"],
        [
            [
                r["classes"],
                f"{r['size']}x{r['size']}",
                "x".join(map(str, r["grid"])),
                r["prototypes"],
                r["groups"],
                r["open_s"],
                r["click_s"],
                r["switch_off_s"],
            ]
            for r in rows
        ],
    )
    demo = next((r for r in rows if r["classes"] == 2), rows[0])
    where = f"{demo['size']}x{demo['size']}, {demo['classes']} classes"
    targets = [
        {"target": f"click < {CLICK_TARGET} s ({where})", "value": demo["click_s"]}
        | {"met": bool(demo["click_s"] < CLICK_TARGET)},
        {"target": f"switch a prototype off < {SWITCH_TARGET} s ({where})", "value": demo["switch_off_s"]}
        | {"met": bool(demo["switch_off_s"] < SWITCH_TARGET)},
    ]
    target_table = markdown_table(
        ["target", "value", "verdict"], [[t["target"], t["value"], verdict(t["met"])] for t in targets]
    )
    payload = {"settings": {"repeats": args.repeats, "warmup": args.warmup}, "cases": rows, "targets": targets}
    title = "Explorer response times (EfficientNet-Lite0 ScaleProtoSeg)"
    return report("explore", title, [table, "### Targets\n\n" + target_table], payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
