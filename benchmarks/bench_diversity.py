"""Diversity loss (paper Eqs. 3-6): ``losses.diversity_loss`` against a naive loop kept here as the reference.

The reference loops in Python over images, classes present, scales and prototype pairs, like the authors' release:
for each (image, class with >= 2 labelled cells, scale), the log-softmax of each of the class's prototypes' squared
distances over the class's cells, then for each pair the (half, by default) symmetric KL divergence; the loss is
``mean(exp(-D))`` over all terms. Both are run forward + backward on the same distances and must agree to 1e-5
(asserted; the gradients are compared too). Shapes: Cityscapes training (2 images, 65x65 cells, 19 classes, 228
prototypes = 4 scales x 19 x 3) and ADE20K (2 images, 65x65, 150 classes, 1800 prototypes = 4 x 150 x 3) with
blob-shaped labels (10-16 classes per image for Cityscapes, 15-25 for ADE20K, a void disc). Target: >= 20x faster.
``--quick``: 17x17 cells, 1 repeat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from common import add_common_args, blob_labels, finish_args, markdown_table, measure, report, verdict

from scaleprotoseg.losses import diversity_loss
from scaleprotoseg.models.prototypes import prototype_layout

TARGET = 20.0
SHAPES = {  # name: (classes, classes present per image (min, max))
    "cityscapes": (19, (10, 16)),
    "ade20k": (150, (15, 25)),
}
IGNORE = 255


def naive_diversity(
    distances: torch.Tensor,
    labels: torch.Tensor,
    prototype_class: torch.Tensor,
    prototype_scale: torch.Tensor,
    num_classes: int,
    num_scales: int,
    *,
    jeffreys: str = "half",
) -> torch.Tensor:
    """The reference: one Python iteration per (image, class, scale, pair), as the release computes it."""
    B, P = distances.shape[:2]
    flat = distances.permute(0, 2, 3, 1).reshape(B, -1, P)  # (B, cells, P)
    lab = labels.reshape(B, -1)
    terms = []
    for b in range(B):
        for c in torch.unique(lab[b]).tolist():
            if c < 0 or c >= num_classes:
                continue  # void
            mask = lab[b] == c
            if int(mask.sum()) < 2:
                continue
            for s in range(num_scales):
                members = torch.nonzero((prototype_class == c) & (prototype_scale == s)).flatten().tolist()
                logp = [F.log_softmax(torch.masked_select(flat[b, :, i], mask), dim=0) for i in members]
                for j in range(len(members)):
                    for k in range(j + 1, len(members)):
                        kl_jk = F.kl_div(logp[k], logp[j], log_target=True, reduction="sum")  # KL(p_j || p_k)
                        kl_kj = F.kl_div(logp[j], logp[k], log_target=True, reduction="sum")  # KL(p_k || p_j)
                        d = kl_jk + kl_kj
                        terms.append(d / 2.0 if jeffreys == "half" else d)
    if not terms:
        return distances.sum() * 0.0
    return torch.exp(-torch.stack(terms)).mean()


def run_shape(args: argparse.Namespace, name: str) -> dict[str, Any]:
    num_classes, present = SHAPES[name]
    gen = torch.Generator().manual_seed(args.seed)
    h = w = args.cells
    num_scales, per = 4, 3
    cls, scale = prototype_layout(num_classes, per, num_scales)
    P = len(cls)
    labels = blob_labels(args.batch, h, w, num_classes, present, generator=gen, ignore_index=IGNORE)
    base = (torch.rand(args.batch, P, h, w, generator=gen) * 4.0).to(args.device)
    labels, cls, scale = labels.to(args.device), cls.to(args.device), scale.to(args.device)

    def ours(d: torch.Tensor) -> torch.Tensor:
        return diversity_loss(d, labels, cls, scale, num_classes, num_scales, jeffreys=args.jeffreys)

    def naive(d: torch.Tensor) -> torch.Tensor:
        return naive_diversity(d, labels, cls, scale, num_classes, num_scales, jeffreys=args.jeffreys)

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        d = base.detach().clone().requires_grad_(True)
        loss = fn(d)
        loss.backward()
        return float(loss.detach()), d.grad

    v_ours, g_ours = fwd_bwd(ours)
    v_naive, g_naive = fwd_bwd(naive)
    value_diff = abs(v_ours - v_naive)
    grad_diff = float((g_ours - g_naive).abs().max())
    grad_scale = float(g_naive.abs().max())
    if value_diff > 1e-5:
        raise AssertionError(
            f"{name}: diversity loss {v_ours!r} (ours) vs {v_naive!r} (naive): |diff| {value_diff:.3g}"
        )
    if not torch.allclose(g_ours, g_naive, rtol=1e-4, atol=1e-5 * max(grad_scale, 1e-12)):
        raise AssertionError(f"{name}: gradients differ, max |diff| {grad_diff:.3g} (max |grad| {grad_scale:.3g})")

    leaf = base.detach().clone().requires_grad_(True)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            leaf.grad = None
            fn(leaf).backward()

        return call

    r_ours = measure(step(ours), args.device, args.repeats, args.warmup)
    r_naive = measure(step(naive), args.device, args.naive_repeats, 0)  # the equality check above warmed it up
    present_counts = [len([c for c in torch.unique(labels[b]).tolist() if c != IGNORE]) for b in range(args.batch)]
    row = {
        "shape": name,
        "batch": args.batch,
        "cells": f"{h}x{w}",
        "classes": num_classes,
        "prototypes": P,
        "classes_present": present_counts,
        "jeffreys": args.jeffreys,
        "value_ours": v_ours,
        "value_naive": v_naive,
        "value_abs_diff": value_diff,
        "grad_max_abs_diff": grad_diff,
        "equal": True,
        "ours_s": r_ours["median_s"],
        "naive_s": r_naive["median_s"],
        "speedup": r_naive["median_s"] / r_ours["median_s"],
        "ours": r_ours,
        "naive": r_naive,
    }
    print(f"  {name:<11} ours {row['ours_s']:.4f} s  naive {row['naive_s']:.4f} s  x{row['speedup']:.1f}", flush=True)
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, repeats=10, warmup=1)
    p.add_argument("--naive-repeats", type=int, default=None, help="timed calls of the naive loop (default 2)")
    p.add_argument("--cells", type=int, default=None, help="feature grid side (default 65: 513 crops)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shapes", default="cityscapes,ade20k", help="any of " + ", ".join(SHAPES))
    p.add_argument("--jeffreys", choices=("half", "full"), default="half")
    args = finish_args(p.parse_args(argv))
    if args.cells is None:
        args.cells = 17 if args.quick else 65
    if args.naive_repeats is None:
        args.naive_repeats = 1 if args.quick else 2
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown}; expected any of {', '.join(SHAPES)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [run_shape(args, name) for name in args.shapes]
    targets = [
        {"target": f"{r['shape']}: >= {TARGET:.0f}x faster than the naive loop", "value": r["speedup"]}
        | {"met": bool(r["speedup"] >= TARGET)}
        for r in rows
    ]
    table = markdown_table(
        [
            "shape",
            "B x cells",
            "classes",
            "prototypes",
            "present/image",
            "ours s",
            "naive s",
            "speedup",
            "value diff",
            "grad diff",
        ],
        [
            [
                r["shape"],
                f"{r['batch']} x {r['cells']}",
                r["classes"],
                r["prototypes"],
                ",".join(map(str, r["classes_present"])),
                r["ours_s"],
                r["naive_s"],
                r["speedup"],
                r["value_abs_diff"],
                r["grad_max_abs_diff"],
            ]
            for r in rows
        ],
    )
    target_table = markdown_table(
        ["target", "value", "verdict"], [[t["target"], t["value"], verdict(t["met"])] for t in targets]
    )
    payload = {
        "settings": {
            "cells": args.cells,
            "batch": args.batch,
            "jeffreys": args.jeffreys,
            "repeats": args.repeats,
            "naive_repeats": args.naive_repeats,
            "warmup": args.warmup,
            "timed": "forward + backward",
        },
        "shapes": rows,
        "targets": targets,
        "equality_checks_passed": all(r["equal"] for r in rows),
    }
    title = "Diversity loss, forward + backward: vectorised vs naive loop"
    return report("diversity", title, [table, "### Targets\n\n" + target_table], payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
