"""Inference cost of DeepLabv2, ProtoSeg and ScaleProtoSeg (stage 1, grouped, grouped + thresholded).

Table 1 (whole models): time per image (median of ``--repeats`` after ``--warmup``) and peak memory, batch 1, eval
mode, ``no_grad``, on the same backbone (ResNet-101 and EfficientNet-Lite0, random weights: the cost does not depend
on them), with a 19-class head at 512x1024 (Cityscapes) and a 150-class head at 512x512 (ADE20K). ProtoSeg has 10
prototypes per class for 19 classes and 12 for 150 (paper); ScaleProtoSeg 3 per scale x 4 scales. "grouped" has random
group weights projected on the simplex; "thresholded" has trained-like sparse groups (``--nonzero`` weights per row,
then ``threshold_(0.05)``). Ratios are to DeepLabv2 measured in the same run. Targets (ResNet-101): grouped
ScaleProtoSeg <= 1.10x DeepLabv2 with 19 classes and <= 1.25x with 150.

Table 2 (head only): the prototype-and-group part of the ScaleProtoSeg head after the ASPP, from features (1, 256,
h, w) to logits. Ours is the inference path (``PrototypeHead.logits_from_features``: one distance product per scale
into a reused channel-first buffer, Eq. 1 in place, one batched group product, prototypes that no group uses
skipped); "maps kept" is the plain forward that training runs. The reference is a per-class loop kept here, computed
the way the authors' release does it (per-scale distances, channels-last activations, then for each class: select
its prototypes' activations, apply its group weights, exponentiate; then the last layer). Outputs are checked equal
(allclose) before timing. Target: >= 5x faster with 150 classes.

On the 2-core CPU, ResNet-101 at 512x1024 takes several seconds per image: the defaults (3 repeats) keep the whole
script to a few minutes. ``--quick``: ResNet-18, 32x64 / 32x32 inputs, 1 repeat.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    add_common_args,
    finish_args,
    markdown_table,
    measure_interleaved,
    parse_list,
    parse_size,
    ratio_spread,
    report,
    verdict,
)

from scaleprotoseg.config import ModelConfig
from scaleprotoseg.models.heads import PrototypeHead, ScaleProtoSegHead
from scaleprotoseg.models.segmenter import Segmenter, build_model

PROTOSEG_PER_CLASS = {19: 10, 150: 12}  # paper: 10 prototypes per class (Cityscapes), 12 (ADE20K)
TARGETS = {19: 1.10, 150: 1.25}  # grouped ScaleProtoSeg / DeepLabv2 on ResNet-101
HEAD_TARGET = 5.0  # head only, 150 classes: reference / ours
VARIANTS = ("deeplabv2", "protoseg", "scaleprotoseg", "grouped", "thresholded")


# ----------------------------------------------------------------------------------------------------------------
# Models


def build(method: str, backbone: str, num_classes: int, device: torch.device) -> Segmenter:
    per_class = PROTOSEG_PER_CLASS.get(num_classes, 10) if method == "protoseg" else 3
    cfg = ModelConfig(method=method, backbone=backbone, pretrained=None, prototypes_per_class=per_class)
    return build_model(cfg, num_classes).to(device).eval()


@torch.no_grad()
def sparse_groups_(head: ScaleProtoSegHead, nonzero: int, generator: torch.Generator, alpha: float = 0.05) -> float:
    """Trained-like groups: each row keeps ``nonzero`` random members with random weights summing to 1, then weights
    below ``alpha`` are zeroed (no renormalisation). Returns the mean number of non-zero weights per row."""
    grouping = head.grouping
    C, N, K = grouping.weight.shape
    mask = grouping.member_mask.unsqueeze(1).expand(C, N, K).cpu()
    scores = torch.rand(C, N, K, generator=generator).masked_fill(~mask, -1.0)
    keep = torch.zeros(C, N, K, dtype=torch.bool)
    keep.scatter_(2, scores.topk(min(nonzero, K), dim=2).indices, True)
    keep &= mask
    w = torch.where(keep, torch.rand(C, N, K, generator=generator) + 0.1, torch.zeros(()))
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    grouping.weight.copy_(w.to(grouping.weight.device))
    head.threshold_groups_(alpha)  # the inference layout follows the new weights
    return float((grouping.weight > 0).sum(-1).float().mean())


def _weights_mb(model: Segmenter) -> float:
    return round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20, 1)


def _forward(model: Segmenter, x: torch.Tensor) -> None:
    """What ``evaluate`` and ``predict`` run: the class scores only (``Segmenter.logits``)."""
    with torch.no_grad():
        model.logits(x)


def bench_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All five variants of one (backbone, classes) are built together and timed in interleaved rounds."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(args.seed)
    for backbone in args.backbones:
        for num_classes in args.classes:
            H, W = args.sizes[num_classes]
            x = torch.randn(1, 3, H, W, generator=gen).to(args.device)
            models = {
                m: build(m, backbone, num_classes, args.device) for m in ("deeplabv2", "protoseg", "scaleprotoseg")
            }
            extra: dict[str, dict[str, Any]] = {}
            for variant in ("grouped", "thresholded"):
                model = copy.deepcopy(models["scaleprotoseg"])
                model.head.enable_groups()
                model.head.project_groups_()
                if variant == "thresholded":
                    nz = sparse_groups_(model.head, args.nonzero, gen)
                else:
                    nz = float((model.head.grouping.weight > 0).sum(-1).float().mean())
                models[variant] = model.to(args.device).eval()
                extra[variant] = {"nonzero_per_group": nz}
            fns = {v: partial(_forward, models[v], x) for v in VARIANTS}
            results = measure_interleaved(fns, args.device, args.repeats, args.warmup)
            base = results["deeplabv2"]["median_s"]
            for v in VARIANTS:
                r = {
                    "backbone": backbone,
                    "classes": num_classes,
                    "input": f"{H}x{W}",
                    "variant": v,
                    "prototypes": head.num_prototypes if isinstance(head := models[v].head, PrototypeHead) else 0,
                    "weights_mb": _weights_mb(models[v]),
                    **results[v],
                    **extra.get(v, {}),
                    "ratio_to_deeplabv2": results[v]["median_s"] / base,
                    "ratio_iqr": ratio_spread(results[v], results["deeplabv2"]),
                }
                rows.append(r)
                print(
                    f"  {backbone:<18} C={num_classes:<3} {v:<12} {r['median_s']:.4f} s "
                    f"(x{r['ratio_to_deeplabv2']:.3f})  peak {r['peak_mb']:.0f} MB",
                    flush=True,
                )
            del models, fns
    return rows


def model_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for num_classes, limit in TARGETS.items():
        match = [r for r in rows if r["backbone"] == "resnet101" and r["classes"] == num_classes]
        grouped = next((r for r in match if r["variant"] == "grouped"), None)
        ratio = grouped["ratio_to_deeplabv2"] if grouped else None
        out.append(
            {
                "target": f"grouped ScaleProtoSeg <= {limit:.2f}x DeepLabv2, ResNet-101, {num_classes} classes",
                "value": ratio,
                "met": None if ratio is None else bool(ratio <= limit),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Head only: ours against the per-class reference


def reference_setup(head: PrototypeHead) -> dict[str, Any]:
    """What the release keeps as module state: a one-hot prototype/class identity matrix and one (N, |P_c|) linear
    weight per class (columns in ascending prototype index), and the last layer."""
    P, C, N = head.num_prototypes, head.num_classes, head.groups_per_class
    identity = F.one_hot(head.prototype_class, C).float()  # (P, C)
    dense = head.grouping.dense_weight(P).view(C, N, P)
    weights = [dense[c][:, torch.nonzero(identity[:, c]).flatten()].clone() for c in range(C)]
    return {"identity": identity, "weights": weights, "last": head.h_group.detach().clone()}


def reference_distances(head: PrototypeHead, features: torch.Tensor) -> torch.Tensor:
    """Per-scale squared distances, one 1x1 convolution per scale (as the release), in the prototypes' order."""
    protos = head.prototypes.prototypes.detach()
    P, D = protos.shape
    B, _, h, w = features.shape
    dist = features.new_empty(B, P, h, w)
    for s in range(head.num_scales):
        idx = torch.nonzero(head.prototype_scale == s).flatten()
        x = features[:, s * D : (s + 1) * D]
        p = protos[idx]
        x2 = (x * x).sum(dim=1, keepdim=True)
        xp = F.conv2d(x, p.view(-1, D, 1, 1))
        p2 = (p * p).sum(dim=1).view(1, -1, 1, 1)
        dist[:, idx] = F.relu(x2 - 2 * xp + p2)
    return dist


def reference_groups_to_logits(state: dict[str, Any], activations: torch.Tensor) -> torch.Tensor:
    """The per-class loop: for each class, its prototypes' activations times its group weights, exponentiated;
    all groups concatenated, then the last layer."""
    B, P, h, w = activations.shape
    act = activations.permute(0, 2, 3, 1).reshape(-1, P)
    identity = state["identity"]
    outs = []
    for c in range(identity.shape[1]):
        members = torch.nonzero(identity[:, c]).flatten()
        if len(members) == 0:
            continue
        outs.append(torch.exp(F.linear(act[:, members], state["weights"][c])))
    logits = F.linear(torch.cat(outs, dim=1), state["last"])
    return logits.view(B, h, w, -1).permute(0, 3, 1, 2)


def reference_head(head: PrototypeHead, state: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
    dist = reference_distances(head, features)
    act = torch.log((dist + 1) / (dist + head.prototypes.eps))
    return reference_groups_to_logits(state, act)


def ours_groups_to_logits(head: PrototypeHead, activations: torch.Tensor) -> torch.Tensor:
    """What :meth:`PrototypeHead.forward` does after the activations."""
    return torch.einsum("cg,bghw->bchw", head.h_group, head.grouping(activations))


def ours_head_maps(head: PrototypeHead, features: torch.Tensor) -> torch.Tensor:
    """What :meth:`PrototypeHead.forward` does after the ASPP and sigmoid (every map kept, as training needs)."""
    _, act = head.prototypes(features)
    return ours_groups_to_logits(head, act)


def ours_head(head: PrototypeHead, features: torch.Tensor) -> torch.Tensor:
    """What inference runs after the ASPP and sigmoid: :meth:`PrototypeHead.logits_from_features`."""
    return head.logits_from_features(features)


def bench_head(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    for num_classes in args.classes:
        H, W = args.sizes[num_classes]
        h, w = -(-H // 8), -(-W // 8)
        head = ScaleProtoSegHead(8, num_classes, dim=64, prototypes_per_class=3)
        head.enable_groups()
        nz = sparse_groups_(head, args.nonzero, gen)
        used = int(head.grouping.used_prototypes().numel())
        with torch.no_grad():
            head.h_group.add_(0.01 * torch.randn(head.h_group.shape, generator=gen))
        head = head.to(args.device).eval()
        if head.grouping.mode != "ratio":
            raise ValueError("the reference loop implements the 'ratio' group activation only")
        features = torch.rand(1, head.num_scales * 64, h, w, generator=gen).to(args.device)
        state = reference_setup(head)
        with torch.no_grad():
            ref = reference_head(head, state, features)
            _, act = head.prototypes(features)
        scale = float(ref.abs().max())
        parts = (
            ("features -> logits", partial(ours_head, head, features), partial(reference_head, head, state, features)),
            (
                "features -> logits, maps kept",
                partial(ours_head_maps, head, features),
                partial(reference_head, head, state, features),
            ),
            (
                "activations -> logits",
                partial(ours_groups_to_logits, head, act),
                partial(reference_groups_to_logits, state, act),
            ),
        )
        for part, fn_ours, fn_ref in parts:
            with torch.no_grad():
                ours, ref_part = fn_ours(), fn_ref()
            max_diff = float((ref_part - ours).abs().max())
            equal = bool(torch.allclose(ours, ref_part, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))
            if not equal:
                raise AssertionError(
                    f"head outputs differ ({num_classes} classes, {part}): max |ours - reference| = {max_diff:.3g} "
                    f"(max |reference| = {scale:.3g})"
                )
            with torch.no_grad():  # interleaved: a change of machine load affects both alike
                timed = measure_interleaved(
                    {"ours": fn_ours, "ref": fn_ref}, args.device, args.head_repeats, args.warmup
                )
            r_ours, r_ref = timed["ours"], timed["ref"]
            speedup = r_ref["median_s"] / r_ours["median_s"]
            speedup_iqr = ratio_spread(r_ref, r_ours)
            rows.append(
                {
                    "classes": num_classes,
                    "grid": f"{h}x{w}",
                    "prototypes": head.num_prototypes,
                    "used": used,
                    "part": part,
                    "ours_s": r_ours["median_s"],
                    "reference_s": r_ref["median_s"],
                    "speedup": speedup,
                    "speedup_iqr": speedup_iqr,
                    "ours_peak_delta_mb": r_ours["delta_mb"],
                    "reference_peak_delta_mb": r_ref["delta_mb"],
                    "allclose": equal,
                    "max_abs_diff": max_diff,
                    "nonzero_per_group": nz,
                    "ours": r_ours,
                    "reference": r_ref,
                }
            )
            print(f"  head C={num_classes:<3} {part:<30} ours {r_ours['median_s']:.5f} s  x{speedup:.1f}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, repeats=3, warmup=1)
    p.add_argument("--backbones", type=parse_list, default=None, help="default resnet101,efficientnet_lite0")
    p.add_argument("--classes", type=lambda s: parse_list(s, int), default=[19, 150])
    p.add_argument("--size19", type=parse_size, default=None, help="input of the 19-class head (default 512x1024)")
    p.add_argument("--size150", type=parse_size, default=None, help="input of the 150-class head (default 512x512)")
    p.add_argument("--head-repeats", type=int, default=None, help="timed calls of the head-only part (default 10)")
    p.add_argument("--nonzero", type=int, default=4, help="non-zero weights per group row when thresholded")
    p.add_argument("--skip-models", action="store_true", help="head-only table only")
    args = finish_args(p.parse_args(argv))
    if args.backbones is None:
        args.backbones = ["resnet18"] if args.quick else ["resnet101", "efficientnet_lite0"]
    size19 = args.size19 or ((32, 64) if args.quick else (512, 1024))
    size150 = args.size150 or ((32, 32) if args.quick else (512, 512))
    args.sizes = {c: size19 if c <= 19 else size150 for c in args.classes}
    if args.head_repeats is None:
        args.head_repeats = 1 if args.quick else 10
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [] if args.skip_models else bench_models(args)
    head_rows = bench_head(args)
    tables = []
    if rows:
        tables.append(
            "### Whole model, batch 1, eval, no_grad\n\n"
            + markdown_table(
                [
                    "backbone",
                    "classes",
                    "input",
                    "variant",
                    "prototypes",
                    "s / image",
                    "x DeepLabv2",
                    "per-round IQR",
                    "weights MB",
                    "peak MB",
                    "+MB in call",
                ],
                [
                    [
                        r["backbone"],
                        r["classes"],
                        r["input"],
                        r["variant"],
                        r["prototypes"] or "-",
                        r["median_s"],
                        r["ratio_to_deeplabv2"],
                        r["ratio_iqr"],
                        r["weights_mb"],
                        r["peak_mb"],
                        r["delta_mb"],
                    ]
                    for r in rows
                ],
            )
        )
    targets = model_targets(rows) if rows else []
    head_150 = next((r for r in head_rows if r["classes"] == 150 and r["part"] == "features -> logits"), None)
    targets.append(
        {
            "target": f"head (features -> logits) >= {HEAD_TARGET:.0f}x faster than the per-class loop, 150 classes",
            "value": head_150["speedup"] if head_150 else None,
            "met": None if head_150 is None else bool(head_150["speedup"] >= HEAD_TARGET),
        }
    )
    tables.append(
        "### ScaleProtoSeg head after the ASPP: ours vs per-class reference loop\n\n"
        + markdown_table(
            [
                "classes",
                "grid",
                "prototypes",
                "used by groups",
                "part",
                "ours s",
                "reference s",
                "speedup",
                "per-round IQR",
                "allclose",
                "max abs diff",
            ],
            [
                [
                    r["classes"],
                    r["grid"],
                    r["prototypes"],
                    r["used"],
                    r["part"],
                    r["ours_s"],
                    r["reference_s"],
                    r["speedup"],
                    r["speedup_iqr"],
                    r["allclose"],
                    r["max_abs_diff"],
                ]
                for r in head_rows
            ],
        )
    )
    tables.append(
        "### Targets\n\n"
        + markdown_table(
            ["target", "value", "verdict"], [[t["target"], t["value"], verdict(t["met"])] for t in targets]
        )
    )
    payload = {
        "settings": {
            "backbones": args.backbones,
            "classes": args.classes,
            "sizes": {str(k): list(v) for k, v in args.sizes.items()},
            "repeats": args.repeats,
            "warmup": args.warmup,
            "head_repeats": args.head_repeats,
            "nonzero": args.nonzero,
            "weights": "random init (timing does not depend on the weights)",
        },
        "models": rows,
        "head": head_rows,
        "targets": targets,
        "equality_checks_passed": all(r["allclose"] for r in head_rows),
    }
    return report("inference", "Inference: time per image and peak memory", tables, payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
