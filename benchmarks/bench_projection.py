"""Prototype projection (``projection.project_prototypes``): throughput and peak memory against the number of images.

ScaleProtoSeg (19 classes, 228 prototypes) on a ResNet-18 backbone (``--backbone``: resnet101, efficientnet_lite0,
...; random weights) projects over 8, 16, 32 and 64 synthetic training images of 321x321 with blob-shaped labels. The
images are generated on the fly from their index, so the dataset itself holds nothing: the projection keeps only a
running best per prototype, so its peak memory must not grow with the number of images. The table gives images per
second and the peak memory of each run, and the least-squares slope of the peak against the number of images
(MiB per image); "flat" means the fitted growth over the whole range is below max(16 MiB, 25 % of the smallest peak
increase): allocator noise stays under it, while keeping anything per image (a 321x321 label map is 0.8 MiB, the
features of one image 1.7 MiB) over 8..64 images exceeds it. ``--quick``: 2, 4 and 8 images of 65x65.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from common import PeakMemory, add_common_args, blob_labels, finish_args, markdown_table, parse_list, report, verdict
from torch.utils.data import Dataset

from scaleprotoseg.config import ModelConfig
from scaleprotoseg.models.segmenter import build_model
from scaleprotoseg.prototypes.projection import project_prototypes

IGNORE = 255


class SyntheticImages(Dataset):
    """``n`` random normalised images with blob labels, each made from its index on request (nothing is stored)."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int = 0) -> None:
        self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        S = self.size
        label = blob_labels(1, S, S, self.num_classes, (3, min(12, self.num_classes)), generator=g)[0]
        return {"image": torch.randn(3, S, S, generator=g), "label": label, "name": f"synthetic_{i:05d}", "index": i}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = ModelConfig(method="scaleprotoseg", backbone=args.backbone, pretrained=None)
    model = build_model(cfg, args.classes).to(args.device).eval()
    # The warm-up projects as many images as the middle run: PyTorch's CPU kernels grow their caches over the first
    # few dozen images (15 MB here) and the allocator keeps the high-water mark, which the first measured run would
    # otherwise count as growth.
    warm = SyntheticImages(sorted(args.sizes)[len(args.sizes) // 2], args.size, args.classes, seed=args.seed + 7)
    warnings.filterwarnings("ignore", message=".*have no labelled cell.*")  # few images: some classes are absent
    project_prototypes(model, warm, device=args.device, ignore_index=IGNORE, progress=False)
    rows = []
    for n in args.sizes:
        data = SyntheticImages(n, args.size, args.classes, seed=args.seed)
        with PeakMemory(args.device) as mem:
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
            t0 = time.perf_counter()
            result = project_prototypes(model, data, device=args.device, ignore_index=IGNORE, progress=False)
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
            seconds = time.perf_counter() - t0
        sourced = sum(s is not None for s in result.sources)
        rows.append(
            {
                "images": n,
                "seconds": seconds,
                "images_per_s": n / seconds,
                "prototypes": result.num_prototypes,
                "prototypes_sourced": sourced,
                **mem.result(),
            }
        )
        print(f"  {n:>4} images  {n / seconds:.2f} img/s  peak {mem.peak_mb:.0f} MB", flush=True)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, repeats=1, warmup=1)
    p.add_argument("--backbone", default="resnet18", help="resnet18 (default), efficientnet_lite0, resnet101, ...")
    p.add_argument("--images", type=lambda s: parse_list(s, int), default=None, help="default 8,16,32,64")
    p.add_argument("--size", type=int, default=None, help="square image side (default 321)")
    p.add_argument("--classes", type=int, default=19)
    args = finish_args(p.parse_args(argv))
    args.sizes = args.images or ([2, 4, 8] if args.quick else [8, 16, 32, 64])
    if args.size is None:
        args.size = 65 if args.quick else 321
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = run(args)
    xs = [r["images"] for r in rows]
    peak_slope = slope(xs, [r["peak_mb"] for r in rows])
    delta_slope = slope(xs, [r["delta_mb"] for r in rows])
    growth = delta_slope * (max(xs) - min(xs))
    allowance = max(16.0, 0.25 * min(r["delta_mb"] for r in rows))
    flat = bool(growth <= allowance)
    table = markdown_table(
        ["images", "seconds", "images / s", "peak MB", "+MB during projection", "prototypes with a source"],
        [
            [r["images"], r["seconds"], r["images_per_s"], r["peak_mb"], r["delta_mb"], r["prototypes_sourced"]]
            for r in rows
        ],
    )
    summary = markdown_table(
        ["slope of peak (MB / image)", "slope of +MB (MB / image)", "fitted growth over range (MB)", "flat"],
        [[peak_slope, delta_slope, growth, verdict(flat)]],
    )
    title = f"Projection: {args.backbone}, {args.classes} classes, {args.size}x{args.size} images"
    payload = {
        "settings": {
            "backbone": args.backbone,
            "classes": args.classes,
            "image_size": args.size,
            "images": args.sizes,
            "weights": "random init",
        },
        "runs": rows,
        "peak_slope_mb_per_image": peak_slope,
        "delta_slope_mb_per_image": delta_slope,
        "fitted_growth_mb": growth,
        "flat_allowance_mb": allowance,
        "memory_flat": flat,
        "targets": [{"target": "peak memory flat in the number of images", "value": growth, "met": flat}],
    }
    return report("projection", title, [table, summary], payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
