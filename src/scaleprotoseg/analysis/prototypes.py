"""``prototypes``: prototype counts and val mIoU after each step of training (paper Table 2) and at each group
threshold alpha (supplement 9, Table 7), read from the run's stage checkpoints (:class:`PrototypesAnalysis`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from scaleprotoseg.analysis.registry import Analysis
from scaleprotoseg.analysis.results import MetricResult
from scaleprotoseg.analysis.sparsity import prototype_counts
from scaleprotoseg.checkpoint import CheckpointMeta, load_model

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

GROUP_ALPHAS = (0.0, 0.05, 0.1)
COLUMNS = ["step", "stage", "alpha", "prototypes", "group_avg", "miou"]


def _stage_names(ctx: AnalysisContext) -> list[tuple[str, str]]:
    """(name, kind) of the run's enabled stages, in order."""
    from scaleprotoseg.config import default_stages

    stages = ctx.cfg.train.stages or default_stages(ctx.info.method)
    return [(n, s.kind) for n, s in stages.items() if s.enabled]


def _evaluate(ctx: AnalysisContext, model: Any, dataset: Any) -> float:
    """Val mIoU (%) of ``model`` with the run's test-time settings, as ``scaleprotoseg evaluate``."""
    from scaleprotoseg.evaluation.evaluate import evaluate

    res = evaluate(
        model,
        dataset,
        num_classes=len(ctx.class_names),
        ignore_index=ctx.info.ignore_index,
        device=ctx.device,
        inference=ctx.inference,
        max_samples=ctx.options.max_images,
        progress=ctx.options.progress,
    )
    return 100.0 * float(res["miou"])


def _is_grouped(ctx: AnalysisContext, stage: str) -> bool:
    return bool(CheckpointMeta.read(ctx.run.checkpoint(stage).meta).structure.get("grouped"))


class PrototypesAnalysis(Analysis):
    """Rows ``initial``, ``project``, then ``pruned``/``finetuned`` (ProtoSeg) or ``grouped`` at each alpha
    (ScaleProtoSeg: the groups before thresholding, thresholded at alpha; Table 7's Group Avg)."""

    name = "prototypes"

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        from scaleprotoseg.models.prototypes import prototype_layout

        ctx.need_prototypes()
        stages = _stage_names(ctx)
        have = [(n, k) for n, k in stages if ctx.run.checkpoint(n).weights.is_file()]
        kinds = dict(have)
        split = ctx.split()
        ds = ctx.dataset(split)
        names = ctx.class_names
        initial = len(prototype_layout(len(names), ctx.cfg.model.prototypes_per_class, ctx.num_scales)[0])
        steps: list[dict[str, Any]] = []
        notes: list[str] = []

        def add(step: str, stage: str | None, prototypes: int, miou: float | None, **extra: Any) -> None:
            row = {"step": step, "stage": stage, "alpha": None, "prototypes": prototypes, "group_avg": None}
            steps.append({**row, "miou": miou, "per_class": None, **extra})

        def per_class(model: Any) -> dict[str, int]:
            counts = np.bincount(model.head.prototype_class.cpu().numpy(), minlength=len(names))
            return {n: int(k) for n, k in zip(names, counts)}

        add("initial", None, initial, None)
        for name, kind in have:
            if kind in ("projection", "pruning"):
                model = load_model(ctx.run.root, name, ctx.device).model
                step = "project" if kind == "projection" else "pruned"
                add(step, name, model.head.num_prototypes, _evaluate(ctx, model, ds), per_class=per_class(model))
        missing = [n for n, k in stages if k in ("projection", "pruning") and n not in kinds]
        if missing:
            notes.append(f"no checkpoint for stage(s) {', '.join(missing)}")
        order = [n for n, _ in stages]
        if ctx.info.method == "scaleprotoseg":
            # the groups before thresholding: the stage just before the threshold stage (group_joint), else the
            # last checkpoint with groups
            source = None
            threshold_stage = next((n for n, k in stages if k == "threshold"), None)
            if threshold_stage is not None:
                before = order[: order.index(threshold_stage)]
                source = next((n for n in reversed(before) if n in kinds), None)
            if source is None:
                source = next((n for n, _ in reversed(have) if _is_grouped(ctx, n)), None)
                if source is not None:
                    notes.append(f"no checkpoint just before the threshold stage; alphas applied to {source}")
            if source is not None and _is_grouped(ctx, source):
                base = load_model(ctx.run.root, source, ctx.device).model
                grouping = base.head.grouping
                counts = prototype_counts(grouping.weight.detach().cpu(), grouping.member_mask.cpu(), GROUP_ALPHAS)
                for alpha in GROUP_ALPHAS:
                    model = copy.deepcopy(base)
                    model.head.threshold_groups_(alpha)  # the inference layout follows
                    n_used = int(model.head.grouping.used_prototypes().numel())
                    if n_used != counts[alpha]["prototypes"]:  # pragma: no cover - two codings of one definition
                        raise RuntimeError(f"alpha {alpha}: {n_used} used prototypes vs {counts[alpha]['prototypes']}")
                    add(
                        "grouped",
                        source,
                        n_used,
                        _evaluate(ctx, model, ds),
                        alpha=alpha,
                        group_avg=counts[alpha]["group_avg"],
                        per_class={n: int(k) for n, k in zip(names, counts[alpha]["per_class"])},
                    )
            else:
                notes.append("no checkpoint with groups yet: the grouped rows are left out")
        else:
            last = next((n for n, k in reversed(have) if k == "train"), None)
            pruning = next((n for n, k in stages if k == "pruning"), None)
            if last is not None and pruning is not None and order.index(last) > order.index(pruning):
                model = load_model(ctx.run.root, last, ctx.device).model
                add("finetuned", last, model.head.num_prototypes, _evaluate(ctx, model, ds), per_class=per_class(model))
        alphas = list(GROUP_ALPHAS) if ctx.info.method == "scaleprotoseg" else []
        rows = [[s[c] for c in COLUMNS] for s in steps]
        return MetricResult(
            self.name,
            "Prototypes and mIoU per step (Tables 2, 7)",
            {"split": split, "steps": steps, "alphas": alphas, "notes": notes},
            list(COLUMNS),
            rows,
            ctx.meta(split=split, num_images=ctx.num_images(ds)),
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_prototype_steps

        return {"": plot_prototype_steps(result.summary)}
