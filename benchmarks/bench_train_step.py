"""Training step time: ScaleProtoSeg stage 1 (joint) and stage 2 (group_joint) against a DeepLabv2 step.

One optimizer step as the trainer makes it (``engine/trainer.py``), on a batch of ``--batch`` random crops of
``--crop`` pixels (CPU default: 2 x 321; 513 for the paper's Cityscapes crops) with blob-shaped labels, on the same
backbone (default ResNet-101, random weights), ``--classes`` classes (19):

- DeepLabv2: backbone + ASPP trainable, cross-entropy (the paper's ``train`` stage).
- stage 1 (``joint``): backbone + ASPP + prototypes trainable; CE + diversity + L1 on h_proto.
- stage 2 (``group_joint``): group weights + h_group trainable, backbone/ASPP/prototypes frozen by
  ``Segmenter.set_trainable`` (``requires_grad=False``); CE + group entropy + L1 on h_group, then the rows are
  projected back on the simplex. No input of the backbone requires grad, so autograd records nothing there: the
  script checks it (``backbone_output_requires_grad`` must be false) and also times the same step with the backbone
  run explicitly under ``torch.no_grad`` for comparison.

The stage definitions (trainable groups, learning rates, schedule, loss terms) are the library's defaults
(:func:`scaleprotoseg.config.default_stages`); the optimizer and schedule come from ``engine.optim`` and the losses
from :func:`scaleprotoseg.losses.compute_losses`, so the step is the one training runs. Each step: zero_grad, forward,
losses, backward, optimizer step, scheduler step (+ simplex projection in stage 2); float32 unless ``--amp`` (CUDA:
bfloat16 autocast, as the trainer with ``train.amp``). Median of ``--repeats`` steps after ``--warmup``, the steps of
the three models timed in interleaved rounds. Targets: stage 1 <= 1.15x DeepLabv2; stage 2 <= 0.6x stage 1.
``--quick``: ResNet-18, 2 x 49 crops, 1 repeat.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from common import (
    add_common_args,
    blob_labels,
    finish_args,
    markdown_table,
    measure_interleaved,
    ratio_spread,
    report,
    verdict,
)

from scaleprotoseg.config import LossConfig, ModelConfig, StageConfig, default_stages
from scaleprotoseg.engine.optim import build_optimizer, build_scheduler
from scaleprotoseg.losses import compute_losses
from scaleprotoseg.models.heads import ScaleProtoSegHead
from scaleprotoseg.models.segmenter import Segmenter, build_model

STAGE1_TARGET = 1.15  # stage 1 / DeepLabv2
STAGE2_TARGET = 0.60  # stage 2 / stage 1
IGNORE = 255


def make_step(
    model: Segmenter,
    stage: StageConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_cfg: LossConfig,
    *,
    backbone_no_grad: bool = False,
    amp: bool = False,
) -> tuple[Callable[[], dict[str, float]], dict[str, float]]:
    """One optimizer step of ``stage`` as the trainer makes it, and the dict where each step leaves its loss terms;
    ``backbone_no_grad`` runs the backbone explicitly under ``torch.no_grad`` (only valid when it is frozen)."""
    head = model.head
    unknown = model.set_trainable(stage.trainable)
    if unknown:
        raise ValueError(f"the {model.method} model has no parameter group(s) {unknown}")
    optimizer = build_optimizer(model, stage)
    scheduler = build_scheduler(optimizer, stage)
    terms = stage.losses or ["ce"]
    model.train()
    last: dict[str, float] = {}

    def step() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            if backbone_no_grad:
                with torch.no_grad():
                    feats = model.backbone(x)
                output = head(feats)
            else:
                output = model(x)
        output = output.map(lambda t: t.float())
        losses = compute_losses(output, y, head, loss_cfg, terms, ignore_index=IGNORE)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        if isinstance(head, ScaleProtoSegHead) and head.grouping is not None and "groups" in stage.trainable:
            head.project_groups_()
        last.update({k: float(v.detach()) for k, v in losses.items()})
        return last

    return step, last


def graph_check(model: Segmenter, x: torch.Tensor) -> dict[str, bool]:
    """Which parts of the forward pass autograd records (with the current requires_grad flags)."""
    with torch.enable_grad():
        feats = model.backbone(x)
        out = model.head(feats)
    return {
        "backbone_output_requires_grad": bool(feats.requires_grad),
        "features_require_grad": bool(out.features is not None and out.features.requires_grad),
        "activations_require_grad": bool(out.activations is not None and out.activations.requires_grad),
        "logits_require_grad": bool(out.logits.requires_grad),
    }


def profile_step(name: str, step: Callable[[], Any], device: torch.device, rows: int) -> None:
    """Print the ``rows`` costliest operators of 3 steps (``--profile``), by device time on a GPU, else by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### profile of 3 steps: {name}\n", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build the three models (stage 2 on a copy of the stage-1 model), then time their steps in interleaved rounds."""
    gen = torch.Generator().manual_seed(args.seed)
    B, S = args.batch, args.crop
    x = torch.randn(B, 3, S, S, generator=gen).to(args.device)
    y = blob_labels(B, S, S, args.classes, (max(2, args.classes // 2), args.classes), generator=gen).to(args.device)
    loss_cfg = LossConfig()
    mcfg = {"backbone": args.backbone, "pretrained": None}
    stages = default_stages("scaleprotoseg")
    torch.manual_seed(args.seed)
    deeplab = build_model(ModelConfig(method="deeplabv2", **mcfg), args.classes).to(args.device)
    scale = build_model(ModelConfig(method="scaleprotoseg", **mcfg), args.classes).to(args.device)
    grouped = copy.deepcopy(scale)
    grouped.head.enable_groups()
    grouped.to(args.device)
    plan = [  # name, model, stage name, stage, options
        ("DeepLabv2", deeplab, "train", default_stages("deeplabv2")["train"], {}),
        ("ScaleProtoSeg stage 1 (joint)", scale, "joint", stages["joint"], {}),
        ("ScaleProtoSeg stage 2 (group_joint)", grouped, "group_joint", stages["group_joint"], {}),
        ("stage 2, backbone under no_grad", grouped, "group_joint", stages["group_joint"], {"backbone_no_grad": True}),
    ]
    steps, lasts, info = {}, {}, {}
    for name, model, stage_name, stage, kw in plan:
        steps[name], lasts[name] = make_step(model, stage, x, y, loss_cfg, amp=args.amp, **kw)
        info[name] = {
            "step": name,
            "stage": stage_name,
            "trainable": list(stage.trainable),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "losses": list(stage.losses or ["ce"]),
            **graph_check(model, x),
        }
    results = measure_interleaved(steps, args.device, args.repeats, args.warmup)
    if args.profile:
        for name in (plan[0][0], plan[1][0]):
            profile_step(name, steps[name], args.device, args.profile)
    rows = []
    for name, *_ in plan:
        rows.append({**info[name], "last_losses": dict(lasts[name]), **results[name]})
        print(f"  {name:<36} {results[name]['median_s']:.4f} s  peak {results[name]['peak_mb']:.0f} MB", flush=True)
    base, stage1 = rows[0]["median_s"], rows[1]["median_s"]
    for r in rows:
        r["ratio_to_deeplabv2"] = r["median_s"] / base
        r["ratio_to_stage1"] = r["median_s"] / stage1
        r["iqr_to_deeplabv2"] = ratio_spread(r, rows[0])
        r["iqr_to_stage1"] = ratio_spread(r, rows[1])
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, repeats=3, warmup=1)
    p.add_argument("--backbone", default=None, help="default resnet101 (quick: resnet18)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=None, help="square crop size (default 321; the paper's Cityscapes 513)")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA, as the trainer does (train.amp)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print the ROWS costliest operators")
    args = finish_args(p.parse_args(argv))
    if args.amp and args.device.type != "cuda":
        raise ValueError("--amp needs --device cuda (the trainer uses mixed precision on CUDA only)")
    if args.backbone is None:
        args.backbone = "resnet18" if args.quick else "resnet101"
    if args.crop is None:
        args.crop = 49 if args.quick else 321
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = run(args)
    stage1, stage2 = rows[1], rows[2]
    targets = [
        {
            "target": f"stage 1 step <= {STAGE1_TARGET:.2f}x DeepLabv2 step",
            "value": stage1["ratio_to_deeplabv2"],
            "met": bool(stage1["ratio_to_deeplabv2"] <= STAGE1_TARGET),
        },
        {
            "target": f"stage 2 step <= {STAGE2_TARGET:.2f}x stage 1 step",
            "value": stage2["ratio_to_stage1"],
            "met": bool(stage2["ratio_to_stage1"] <= STAGE2_TARGET),
        },
        {
            "target": "stage 2 builds no autograd graph through the backbone",
            "value": stage2["backbone_output_requires_grad"],
            "met": not stage2["backbone_output_requires_grad"],
        },
    ]
    table = markdown_table(
        [
            "step",
            "trainable",
            "loss terms",
            "s / step",
            "x DeepLabv2",
            "(per-round IQR)",
            "x stage 1",
            "(per-round IQR)",
            "backbone graph",
            "peak MB",
            "+MB",
        ],
        [
            [
                r["step"],
                "+".join(r["trainable"]),
                "+".join(r["losses"]),
                r["median_s"],
                r["ratio_to_deeplabv2"],
                r["iqr_to_deeplabv2"],
                r["ratio_to_stage1"],
                r["iqr_to_stage1"],
                r["backbone_output_requires_grad"],
                r["peak_mb"],
                r["delta_mb"],
            ]
            for r in rows
        ],
    )
    target_table = markdown_table(
        ["target", "value", "verdict"], [[t["target"], t["value"], verdict(t["met"])] for t in targets]
    )
    title = (
        f"Training step: {args.backbone}, batch {args.batch} x {args.crop}x{args.crop}, {args.classes} classes, "
        f"{'bf16 autocast' if args.amp else 'float32'}, optimizer step included"
    )
    payload = {
        "settings": {
            "backbone": args.backbone,
            "batch": args.batch,
            "crop": args.crop,
            "classes": args.classes,
            "amp": args.amp,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "weights": "random init",
        },
        "steps": rows,
        "targets": targets,
    }
    return report("train_step", title, [table, "### Targets\n\n" + target_table], payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
