"""Group activations of two runs on the same images, side by side (supplement 10, Figure 6: the groups of one class
with and without the entropy term L_ent of Eq. 5).

For each of the first few validation images of run A, the class shown is the one run A predicts on most feature
cells (a class named ``background`` is passed over when another class is predicted); each run's groups of that
class (``head.group_class == c``) are drawn as their activation maps (Eq. 2) over the image, run A's then run B's
in one row. Both runs must have groups and the same classes. Each run reads the image with its own input
normalisation. The caption names the runs and their effective entropy weight (``loss.entropy``, or 0 when no
enabled stage uses the entropy loss): Figure 6 compares lambda_ent = 0 with lambda_ent = 0.05.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from scaleprotoseg.analysis.registry import Analysis
from scaleprotoseg.analysis.results import MetricResult

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext
    from scaleprotoseg.config import Config

NAME = "groups-compare"
DEFAULT_IMAGES = 3
BACKGROUND = "background"


def entropy_weight(cfg: Config, method: str) -> float:
    """lambda_ent as trained: ``loss.entropy`` when some enabled stage lists the ``entropy`` loss, else 0."""
    from scaleprotoseg.config import default_stages

    stages = cfg.train.stages or default_stages(method)
    used = any(s.enabled and "entropy" in s.losses for s in stages.values())
    return float(cfg.loss.entropy) if used else 0.0


def check_comparable(a: AnalysisContext, b: AnalysisContext) -> None:
    """One-line ValueError unless both runs have groups and the same classes."""
    for ctx in (a, b):
        if not ctx.grouped:
            raise ValueError(
                f"run {ctx.run.root} ({ctx.info.method}, stage {ctx.info.stage}) has no groups; expected two "
                "ScaleProtoSeg runs after the group stages"
            )
    if a.class_names != b.class_names:
        raise ValueError(
            f"runs {a.run.root} and {b.run.root} have different classes ({', '.join(a.class_names)} vs "
            f"{', '.join(b.class_names)}); expected runs of one dataset"
        )


def shown_class(prediction: np.ndarray, class_names: list[str]) -> int:
    """The class predicted on most cells of ``prediction`` (h, w); ``background`` only when nothing else is."""
    counts = np.bincount(prediction.reshape(-1), minlength=len(class_names))
    if class_names and class_names[0].lower() == BACKGROUND and counts[1:].sum() > 0:
        counts[0] = 0
    return int(np.argmax(counts))


def _run_record(ctx: AnalysisContext) -> dict[str, Any]:
    return {
        "run": str(ctx.run.root),
        "name": ctx.name,
        "stage": ctx.options.stage or "final",
        "entropy": entropy_weight(ctx.cfg, ctx.info.method),
        "groups_per_class": int(ctx.head.groups_per_class),
    }


class GroupsCompareAnalysis(Analysis):
    """Figure 6 for run A (the context given to :meth:`compute`) against ``other`` (run B) on ``num_images``
    validation images of run A (``--max-images``, default 3)."""

    name = NAME

    def __init__(self, other: AnalysisContext, num_images: int = DEFAULT_IMAGES) -> None:
        if num_images < 1:
            raise ValueError(f"groups-compare: {num_images} images; expected at least 1")
        self.other = other
        self.num_images = num_images

    def panels(self, a: AnalysisContext) -> list[dict[str, Any]]:
        """Per image: ``index``, ``name``, ``class``, ``image`` (uint8 (H, W, 3)) and, for ``a`` and ``b``, the
        ``groups`` of the class (indices into each head) and their ``maps`` (N, h, w) from that run's forward."""
        from scaleprotoseg.data.registry import build_dataset

        b = self.other
        check_comparable(a, b)
        split = a.split()
        ds_a = a.dataset(split)
        ds_b = ds_a
        if b.cfg.data.normalization != a.cfg.data.normalization:  # the same images, run B's input normalisation
            data = copy.deepcopy(a.cfg.data)
            data.normalization = b.cfg.data.normalization
            ds_b = build_dataset(data, split, train=False, seed=a.options.seed)
        out = []
        for index in range(min(self.num_images, len(ds_a))):
            out_a = a.forward(ds_a[index]["image"])
            c = shown_class(out_a.logits[0].argmax(0).cpu().numpy(), a.class_names)
            image, _, name = ds_a.load_raw(index)
            panel: dict[str, Any] = {"index": index, "name": name, "class": c, "image": image}
            for key, ctx, maps in (
                ("a", a, out_a.group_activations),
                ("b", b, b.forward(ds_b[index]["image"]).group_activations),
            ):
                assert maps is not None  # check_comparable: both runs have groups
                groups = np.nonzero(ctx.head.group_class.cpu().numpy() == c)[0]
                panel[key] = {"groups": groups, "maps": maps[0, groups].float().cpu().numpy()}
            out.append(panel)
        return out

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        panels = self.panels(ctx)
        runs = {"a": _run_record(ctx), "b": _run_record(self.other)}
        names = ctx.class_names
        rows: list[list[Any]] = []
        images = []
        for p in panels:
            record: dict[str, Any] = {"index": p["index"], "name": p["name"], "class": names[p["class"]]}
            for key in ("a", "b"):
                side = p[key]
                record[f"groups_{key}"] = side["groups"]
                record[f"max_{key}"] = side["maps"].reshape(len(side["groups"]), -1).max(1)
                record[f"mean_{key}"] = side["maps"].reshape(len(side["groups"]), -1).mean(1)
                for g, mx, mean in zip(side["groups"], record[f"max_{key}"], record[f"mean_{key}"]):
                    rows.append([p["name"], names[p["class"]], runs[key]["name"], int(g), float(mean), float(mx)])
            images.append(record)
        return MetricResult(
            self.name,
            "Group activations of two runs (Figure 6)",
            {"split": ctx.split(), "runs": runs, "images": images},
            ["image", "class", "run", "group", "mean_activation", "max_activation"],
            rows,
            ctx.meta(split=ctx.split(), num_images=len(panels), other=str(self.other.run.root)),
            plot_data={"panels": panels, "class_names": names},
        )

    def figures(self, result: MetricResult) -> dict[str, Any]:
        from scaleprotoseg.analysis.plots import plot_group_comparison

        runs = result.summary["runs"]
        labels = {k: f"{r['name']} (loss.entropy={r['entropy']:g})" for k, r in runs.items()}
        return {"": plot_group_comparison(result.plot_data["panels"], labels, result.plot_data["class_names"])}
