"""Drivers of ``scaleprotoseg analyze``: stream a dataset through a trained run and feed the accumulators of this
package, then write ``<metric>.json``, ``<metric>.csv`` (the main table) and ``<metric>.png`` (see docs/analysis.md).

Metrics (paper section 4.2 and supplement 9-12):

- ``consistency``, ``stability``: part-annotated images (Tables 3-4); grouped runs score only the prototypes used
  by some group after thresholding.
- ``sparsity``: active prototypes per class with last-layer weights thresholded at 0.005 (Tables 3-4), average
  absolute last-layer weight and extra parameters over DeepLabv2 (Table 10).
- ``prototypes``: prototype counts and val mIoU after projection, pruning, grouping at several alphas (Tables 2, 7).
- ``group-overlap``: IoU between binarised group activations of the same class (Table 9); grouped runs only.
- ``components``: connected components of binarised prototype activations per scale (Figure 3).
- ``equivariance``: quasi-equivariant prototypes across scales on downsampled training images (supplement 11,
  Figure 7); multi-scale runs only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleprotoseg.analysis.results import MetricResult
from scaleprotoseg.analysis.stability import NOISE_STD
from scaleprotoseg.checkpoint import CheckpointMeta, load_model
from scaleprotoseg.models.heads import PrototypeHead
from scaleprotoseg.rundir import RunDir

METRICS = ("sparsity", "prototypes", "consistency", "stability", "components", "group-overlap", "equivariance")
CONSISTENCY_PERCENTILES = (70.0, 80.0, 90.0)
COMPONENT_QUANTILES = (0.8, 0.9, 0.99)
EQUIVARIANCE_QUANTILES = (0.6, 0.7)
EQUIVARIANT_PAIRS_SHOWN = 4  # pairs drawn in equivariance-pairs.png (Figures 8-10), the highest IoU first
GROUP_ALPHAS = (0.0, 0.05, 0.1)


class NotApplicable(Exception):
    """The metric does not apply to this run (the message is the one-line reason)."""


class MissingInput(NotApplicable):
    """The metric applies but lacks an input the user must give (e.g. part annotations)."""


@dataclass
class AnalysisOptions:
    """What ``scaleprotoseg analyze`` passes to the drivers (see ``commands/analyze.py`` for each option)."""

    split: str | None = None
    data_root: str | None = None
    max_images: int = 0
    stage: str | None = None
    parts_dataset: str | None = None
    parts_root: str | None = None
    seed: int = 0
    count_background: bool = False
    noise_std: float = NOISE_STD
    progress: bool = True
    num_workers: int | None = None


def _new_figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on the Agg canvas (no pyplot), as ``analysis.plots`` draws them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


# ------------------------------------------------------------------------------------------------------------------
# The analyser


class Analyzer:
    """A trained run (``final/`` or ``options.stage``) and the per-metric drivers (see the module docstring)."""

    def __init__(self, run: str | Path, device: torch.device, options: AnalysisOptions | None = None) -> None:
        self.run = Path(run)
        self.device = device
        self.opts = options or AnalysisOptions()
        loaded = load_model(self.run, self.opts.stage, device)
        self.model, self.cfg, self.info = loaded.model, loaded.config, loaded.meta
        if self.opts.data_root:
            self.cfg.data.root = self.opts.data_root
        self.cfg.data.max_val_samples = 0  # a training-time shortcut; analyses take --max-images
        self.num_workers = self.cfg.data.num_workers if self.opts.num_workers is None else self.opts.num_workers

    # -- what the run has ----------------------------------------------------------------------------------------
    @property
    def head(self) -> Any:
        return self.model.head

    @property
    def has_prototypes(self) -> bool:
        return isinstance(self.head, PrototypeHead)

    @property
    def grouped(self) -> bool:
        return isinstance(self.head, PrototypeHead) and self.head.grouped

    @property
    def num_scales(self) -> int:
        return self.head.num_scales if isinstance(self.head, PrototypeHead) else 1

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    def _need_prototypes(self) -> None:
        if not self.has_prototypes:
            raise NotApplicable(f"{self.info.method} runs have no prototypes")

    def used_prototype_mask(self) -> np.ndarray:
        """(P,) bool: every prototype (ProtoSeg) or those some group uses after thresholding (ScaleProtoSeg)."""
        P = self.head.num_prototypes
        if not self.grouped:
            return np.ones(P, dtype=bool)
        mask = np.zeros(P, dtype=bool)
        mask[self.head.grouping.used_prototypes().cpu().numpy()] = True
        return mask

    def meta(self, **extra: Any) -> dict[str, Any]:
        return {
            "run": str(self.run),
            "method": self.info.method,
            "stage": self.opts.stage or "final",
            "checkpoint_stage": self.info.stage,
            "seed": self.opts.seed,
            **extra,
        }

    # -- data ----------------------------------------------------------------------------------------------------
    def split(self, default: str | None = None) -> str:
        return self.opts.split or default or self.cfg.data.val_split

    def dataset(self, split: str) -> Any:
        from scaleprotoseg.data.registry import build_dataset

        return build_dataset(self.cfg.data, split, train=False, seed=self.opts.seed)

    def parts_dataset(self) -> Any:
        """The part-annotated dataset: ``--parts-dataset``/``--parts-root``, or the run's own if it has parts."""
        from scaleprotoseg.data import folder_parts  # noqa: F401  (registers folder_parts)
        from scaleprotoseg.data.registry import build_dataset, get_dataset_class

        d = copy.deepcopy(self.cfg.data)
        name = self.opts.parts_dataset or d.name
        cls = get_dataset_class(name)
        if not getattr(cls, "has_parts", False):
            raise MissingInput(
                f"needs part annotations; dataset {name!r} has none: pass --parts-dataset "
                "cityscapes_panoptic_parts|pascal_panoptic_parts|folder_parts and --parts-root DIR"
            )
        if name != d.name:
            d.name, d.options = name, {}
        if self.opts.parts_root:
            root = str(Path(self.opts.parts_root).resolve())
            options = cls.option_names() if hasattr(cls, "option_names") else []
            if "parts_root" in options:
                d.options["parts_root"] = root
            elif "parts_dir" in options:
                d.options["parts_dir"] = root  # an absolute path replaces <root>/<parts_dir>
            else:
                d.root = root
        ds = build_dataset(d, self.split(), train=False, seed=self.opts.seed)
        if ds.info.num_classes != len(self.class_names):
            raise ValueError(
                f"part dataset {name!r} ({d.root}) has {ds.info.num_classes} classes but the run {self.run} has "
                f"{len(self.class_names)}; expected the run's classes ({', '.join(self.class_names[:5])}, ...)"
            )
        if not ds.part_names:
            raise ValueError(f"part dataset {name!r} ({d.root}) names no parts for any class; expected part_names")
        return ds

    def items(self, dataset: Any, desc: str) -> Iterator[dict[str, Any]]:
        """Dataset items one by one (native size), the first ``--max-images`` only, with a progress bar."""
        from torch.utils.data import DataLoader, Subset
        from tqdm import tqdm

        n = len(dataset)
        if self.opts.max_images > 0:
            n = min(n, self.opts.max_images)
        loader = DataLoader(Subset(dataset, range(n)), batch_size=None, shuffle=False, num_workers=self.num_workers)
        yield from tqdm(loader, total=n, desc=desc, disable=not self.opts.progress, dynamic_ncols=True)

    @torch.inference_mode()
    def forward(self, image: torch.Tensor) -> Any:
        """ModelOutput of one normalised image (3, H, W) or batch (1, 3, H, W), on the feature grid."""
        x = image if image.dim() == 4 else image.unsqueeze(0)
        return self.model(x.to(self.device, dtype=torch.float32))

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t[0].float().cpu().numpy()

    # -- consistency and stability (Tables 3-4) ------------------------------------------------------------------
    def part_metrics(self, consistency: bool = True, stability: bool = True) -> dict[str, MetricResult]:
        """Consistency and/or stability in one pass over the part-annotated images (section 4.2, supplement 6)."""
        from scaleprotoseg.analysis.consistency import ConsistencyAccumulator
        from scaleprotoseg.analysis.plots import plot_consistency_stability
        from scaleprotoseg.analysis.stability import StabilityAccumulator, add_gaussian_noise

        self._need_prototypes()
        ds = self.parts_dataset()
        parts = {int(c): list(range(1, len(n) + 1)) for c, n in ds.part_names.items() if n}
        P = self.head.num_prototypes
        used = self.used_prototype_mask()
        cls = self.head.prototype_class.cpu().numpy()
        kw = {
            "percentiles": CONSISTENCY_PERCENTILES,
            "count_background": self.opts.count_background,
            "prototypes_used": used,
        }
        cons = ConsistencyAccumulator(P, cls, parts, **kw) if consistency else None
        stab = StabilityAccumulator(P, cls, parts, **kw) if stability else None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(self.opts.seed))
        count = 0
        for item in self.items(ds, "consistency/stability"):
            x = item["image"].unsqueeze(0).to(self.device)
            label, part_map = item["label"].numpy(), item["parts"].numpy()
            act = self._np(self.forward(x).activations)
            if cons is not None:
                cons.update(act, label, part_map)
            if stab is not None:
                noisy = add_gaussian_noise(x, self.opts.noise_std, generator=gen)
                stab.update(act, self._np(self.forward(noisy).activations), label, part_map)
            count += 1
        meta = self.meta(
            dataset=ds.info.name,
            split=self.split(),
            num_images=count,
            count_background=self.opts.count_background,
            prototypes_scored=int(used.sum()),
            num_prototypes=P,
        )
        part_names = {int(c): list(n) for c, n in ds.part_names.items()}
        out: dict[str, MetricResult] = {}
        c_res = s_res = None
        if cons is not None:
            c_res = cons.compute()
            rows = [
                [p, c_res["scores"][p], int(c_res["consistent"][i][c_res["evaluated"]].sum()), c_res["num_evaluated"]]
                for i, p in enumerate(c_res["percentiles"])
            ]
            rows.append(["mean", c_res["score"], None, c_res["num_evaluated"]])
            summary = {
                **c_res,
                "part_names": part_names,
                "threshold": cons.threshold,
                "prototype_class": cls,
                "prototype_scale": self.head.prototype_scale.cpu().numpy(),
            }
            out["consistency"] = MetricResult(
                "consistency",
                "Consistency of prototypes (Tables 3-4)",
                summary,
                ["percentile", "consistency_%", "consistent_prototypes", "evaluated_prototypes"],
                rows,
                meta=meta,
            )
        if stab is not None:
            s_res = stab.compute()
            n = s_res["num_pairs"]
            rows = [
                [p, s_res["scores"][p], None if not n else round(s_res["scores"][p] * n / 100.0), n]
                for p in s_res["percentiles"]
            ]
            rows.append(["mean", s_res["score"], None, n])
            summary = {**s_res, "noise_std": self.opts.noise_std, "part_names": part_names}
            out["stability"] = MetricResult(
                "stability",
                "Stability of prototypes under input noise (Tables 3-4)",
                summary,
                ["percentile", "stability_%", "stable_pairs", "pairs"],
                rows,
                meta={**meta, "noise_std": self.opts.noise_std},
            )
        title = f"{self.run.name} ({ds.info.name}, {count} images)"
        if c_res is not None and np.isfinite(c_res["score"]):
            out["consistency"].figure = plot_consistency_stability(c_res, None, title=f"Consistency: {title}")
        if s_res is not None and np.isfinite(s_res["score"]):
            out["stability"].figure = plot_consistency_stability(None, s_res, title=f"Stability: {title}")
        return out

    # -- sparsity (Tables 3-4, Table 10) -------------------------------------------------------------------------
    def sparsity(self) -> MetricResult:
        """Active prototypes per class (last layer |w| >= 0.005), average |w| and extra parameters (Table 10)."""
        from scaleprotoseg.analysis.sparsity import (
            SPARSITY_THRESHOLD,
            active_prototype_counts,
            average_abs_weight,
            extra_parameters,
        )

        self._need_prototypes()
        head = self.head
        W = head.last_layer_weight().detach().cpu()
        P = head.num_prototypes
        D = int(head.prototypes.dim)
        C = len(self.class_names)
        if self.grouped:
            dense = head.grouping.dense_weight(P).detach().cpu()
            counts = active_prototype_counts(W, SPARSITY_THRESHOLD, dense)
            used = int(self.used_prototype_mask().sum())
            n_group_weights = int(head.groups_per_class * head.grouping.member_mask.sum().item())
            extra = extra_parameters(used, D, C, W.shape[1], n_group_weights)
            layer = "h_group"
        else:
            counts = active_prototype_counts(W, SPARSITY_THRESHOLD)
            used, n_group_weights = P, 0
            extra = extra_parameters(P, D, C, P)
            layer = "h_proto"
        summary = {
            "sparsity": float(counts.mean()),
            "threshold": SPARSITY_THRESHOLD,
            "active_prototypes": {name: int(n) for name, n in zip(self.class_names, counts)},
            "avg_abs_weight": average_abs_weight(W),
            "extra_parameters": int(extra),
            "last_layer": layer,
            "last_layer_shape": list(W.shape),
            "num_prototypes": P,
            "prototypes_used": used,
            "group_weights": n_group_weights,
            "feature_dim": D,
        }
        rows: list[list[Any]] = [[i, n, int(k)] for i, (n, k) in enumerate(zip(self.class_names, counts))]
        rows.append([None, "mean", float(counts.mean())])
        fig, (ax,) = _new_figure(1, width=max(5.0, 0.35 * C + 2))
        ax.bar(np.arange(C), counts, color="C0")
        ax.axhline(counts.mean(), color="k", linestyle="--", label=f"mean {counts.mean():.2f}")
        ax.set_xticks(np.arange(C), self.class_names, rotation=60, ha="right", fontsize="small")
        ax.set_ylabel(f"Active prototypes (|w| >= {SPARSITY_THRESHOLD:g})")
        ax.set_title(f"Sparsity ({layer}): avg |w| {summary['avg_abs_weight']:.3f}, +{extra / 1e3:.1f}K parameters")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        return MetricResult(
            "sparsity",
            "Sparsity of the last layer (Tables 3-4, 10)",
            summary,
            ["class_index", "class", "active_prototypes"],
            rows,
            fig,
            self.meta(),
        )

    # -- prototypes per step (Tables 2, 7) -----------------------------------------------------------------------
    def _stage_names(self) -> list[tuple[str, str]]:
        from scaleprotoseg.config import default_stages

        stages = self.cfg.train.stages or default_stages(self.info.method)
        return [(n, s.kind) for n, s in stages.items() if s.enabled]

    def _evaluate(self, model: Any, dataset: Any) -> float:
        from scaleprotoseg.evaluation.evaluate import evaluate
        from scaleprotoseg.evaluation.inference import InferenceSettings

        res = evaluate(
            model,
            dataset,
            num_classes=len(self.class_names),
            ignore_index=self.info.ignore_index,
            device=self.device,
            inference=InferenceSettings.from_config(self.cfg.data),
            max_samples=self.opts.max_images,
            progress=self.opts.progress,
        )
        return 100.0 * float(res["miou"])

    def _is_grouped(self, stage: str) -> bool:
        return bool(CheckpointMeta.read(RunDir(self.run).checkpoint(stage).meta).structure.get("grouped"))

    def prototypes(self) -> MetricResult:
        """Prototype counts and val mIoU per step (Table 2) and per group threshold alpha (Table 7)."""
        from scaleprotoseg.analysis.sparsity import prototype_counts
        from scaleprotoseg.models.prototypes import prototype_layout

        self._need_prototypes()
        stages = self._stage_names()
        have = [(n, k) for n, k in stages if RunDir(self.run).checkpoint(n).weights.is_file()]
        kinds = dict(have)
        split = self.split()
        ds = self.dataset(split)
        C = len(self.class_names)
        initial = len(prototype_layout(C, self.cfg.model.prototypes_per_class, self.num_scales)[0])
        columns = ["step", "stage", "alpha", "prototypes", "group_avg", "miou"]
        rows: list[list[Any]] = [["initial", None, None, initial, None, None]]
        steps: list[dict[str, Any]] = [
            {
                "step": "initial",
                "stage": None,
                "alpha": None,
                "prototypes": initial,
                "group_avg": None,
                "miou": None,
                "per_class": None,
            }
        ]
        notes: list[str] = []

        def add(
            step: str,
            stage: str,
            prototypes: int,
            miou: float,
            alpha: float | None = None,
            group_avg: float | None = None,
            per_class: Any = None,
        ) -> None:
            rows.append([step, stage, alpha, prototypes, group_avg, miou])
            steps.append(
                {
                    "step": step,
                    "stage": stage,
                    "alpha": alpha,
                    "prototypes": prototypes,
                    "group_avg": group_avg,
                    "miou": miou,
                    "per_class": per_class,
                }
            )

        def per_class(model: Any) -> dict[str, int]:
            counts = np.bincount(model.head.prototype_class.cpu().numpy(), minlength=C)
            return {n: int(k) for n, k in zip(self.class_names, counts)}

        for name, kind in have:
            if kind in ("projection", "pruning"):
                model = load_model(self.run, name, self.device).model
                step = "project" if kind == "projection" else "pruned"
                add(step, name, model.head.num_prototypes, self._evaluate(model, ds), per_class=per_class(model))
        missing = [n for n, k in stages if k in ("projection", "pruning") and n not in kinds]
        if missing:
            notes.append(f"no checkpoint for stage(s) {', '.join(missing)}")
        names = [n for n, _ in stages]
        if self.info.method == "scaleprotoseg":
            # the groups before thresholding: the stage just before the threshold stage (group_joint), else the
            # last checkpoint with groups
            source = None
            threshold_stage = next((n for n, k in stages if k == "threshold"), None)
            if threshold_stage is not None:
                before = names[: names.index(threshold_stage)]
                source = next((n for n in reversed(before) if n in kinds), None)
            if source is None:
                source = next((n for n, _ in reversed(have) if self._is_grouped(n)), None)
                if source is not None:
                    notes.append(f"no checkpoint just before the threshold stage; alphas applied to {source}")
            if source is not None and self._is_grouped(source):
                base = load_model(self.run, source, self.device).model
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
                        self._evaluate(model, ds),
                        alpha=alpha,
                        group_avg=counts[alpha]["group_avg"],
                        per_class={n: int(k) for n, k in zip(self.class_names, counts[alpha]["per_class"])},
                    )
            else:
                notes.append("no checkpoint with groups yet: the grouped rows are left out")
        else:
            last = next((n for n, k in reversed(have) if k == "train"), None)
            pruning = next((n for n, k in stages if k == "pruning"), None)
            if last is not None and pruning is not None and names.index(last) > names.index(pruning):
                model = load_model(self.run, last, self.device).model
                add("finetuned", last, model.head.num_prototypes, self._evaluate(model, ds), per_class=per_class(model))
        alphas = list(GROUP_ALPHAS) if self.info.method == "scaleprotoseg" else []
        summary = {"split": split, "steps": steps, "alphas": alphas, "notes": notes}
        fig, (ax_p, ax_m) = _new_figure(2)
        labels = [f"{r[0]}" + (f"\nα={r[2]:g}" if r[2] is not None else "") for r in rows]
        x = np.arange(len(rows))
        ax_p.bar(x, [r[3] for r in rows], color="C0")
        ax_m.bar(x, [np.nan if r[5] is None else r[5] for r in rows], color="C1")
        for ax, what in ((ax_p, "Prototypes"), (ax_m, f"mIoU on {split} (%)")):
            ax.set_xticks(x, labels, fontsize="small")
            ax.set_ylabel(what)
            ax.grid(axis="y", alpha=0.3)
        ax_p.set_title("Prototypes per step (Tables 2, 7)")
        ax_m.set_title("mIoU per step")
        return MetricResult(
            "prototypes",
            "Prototypes and mIoU per step (Tables 2, 7)",
            summary,
            columns,
            rows,
            fig,
            self.meta(split=split, num_images=min(len(ds), self.opts.max_images or len(ds))),
        )

    # -- group overlap (Table 9) ---------------------------------------------------------------------------------
    def group_overlap(self) -> MetricResult:
        """Mean IoU between the 95th-percentile binarised activations of a class's groups (supplement 10)."""
        from scaleprotoseg.analysis.overlap import GroupOverlapAccumulator
        from scaleprotoseg.analysis.plots import plot_group_overlap

        if not self.grouped:
            raise NotApplicable("needs groups (ScaleProtoSeg after the group stages)")
        acc = GroupOverlapAccumulator(self.head.group_class.cpu().numpy(), ignore_index=self.info.ignore_index)
        split = self.split()
        count = 0
        for item in self.items(self.dataset(split), "group-overlap"):
            acc.update(self._np(self.forward(item["image"]).group_activations), item["label"].numpy())
            count += 1
        res = acc.compute()
        rows: list[list[Any]] = [
            [c, self.class_names[c], res["class_iou"][c], res["class_pooled_iou"][c], res["num_images"][c]]
            for c in sorted(res["class_iou"])
        ]
        rows.append([None, "mean", res["miou"], res["pooled_iou"], count])
        fig = plot_group_overlap(res, self.class_names) if res["class_iou"] else None
        summary = {
            **res,
            "quantile": acc.quantile,
            "mode": acc.mode,
            "class_names": {c: self.class_names[c] for c in res["class_iou"]},
        }
        return MetricResult(
            "group-overlap",
            "Overlap of group activations (Table 9)",
            summary,
            ["class_index", "class", "iou_%", "pooled_iou_%", "images"],
            rows,
            fig,
            self.meta(split=split, num_images=count),
        )

    # -- connected components (Figure 3) -------------------------------------------------------------------------
    def components(self) -> MetricResult:
        """Connected components of binarised prototype activations per scale (section 4.2, Figure 3)."""
        from scaleprotoseg.analysis.components import ComponentsAccumulator
        from scaleprotoseg.analysis.plots import plot_components

        self._need_prototypes()
        acc = ComponentsAccumulator(self.head.prototype_scale.cpu().numpy(), COMPONENT_QUANTILES)
        split = self.split()
        count = 0
        for item in self.items(self.dataset(split), "components"):
            acc.update(self._np(self.forward(item["image"]).activations))
            count += 1
        res = acc.compute()
        rows = [
            [
                int(s) + 1,
                q,
                res["mean_count"][i, j],
                res["mean_area"][i, j],
                res["pooled_area"][i, j],
                int(res["num_maps"][i]),
            ]
            for i, s in enumerate(res["scales"])
            for j, q in enumerate(res["quantiles"])
        ]
        title = f"Binarised prototype activations per scale: {self.run.name}"
        fig = plot_components(res, title=title) if count else None
        summary = {**res, "area_unit": "feature cells", "cell_pixels": self.model.output_stride**2}
        return MetricResult(
            "components",
            "Connected components per scale (Figure 3)",
            summary,
            ["scale", "p_th", "mean_count", "mean_area", "pooled_area", "maps"],
            rows,
            fig,
            self.meta(split=split, num_images=count),
        )

    # -- quasi-equivariance (supplement 11, Figure 7) ------------------------------------------------------------
    def equivariance(self) -> MetricResult:
        """Quasi-equivariant prototype pairs/groups across scales on downsampled training images (Figure 7)."""
        from scaleprotoseg.analysis.equivariance import EquivarianceAccumulator, atrous_scale_ratios
        from scaleprotoseg.analysis.plots import plot_equivariance
        from scaleprotoseg.ops import resize_image

        self._need_prototypes()
        if self.num_scales < 2:
            raise NotApplicable("needs prototypes at several scales (ScaleProtoSeg)")
        ratios = atrous_scale_ratios(self.head.aspp.rates)
        acc = EquivarianceAccumulator(
            self.head.prototype_class.cpu().numpy(),
            self.head.prototype_scale.cpu().numpy(),
            ratios,
            EQUIVARIANCE_QUANTILES,
            num_groups=self.head.grouping.num_groups if self.grouped else None,
            prototype_mask=self.used_prototype_mask(),
            ignore_index=self.info.ignore_index,
        )
        split = self.split(self.cfg.data.train_split)
        count = 0
        unique = sorted({float(r) for r in ratios})

        def downsampled(x: torch.Tensor, r: float) -> torch.Tensor:
            H, W = x.shape[-2:]
            size = (max(1, round(H / r)), max(1, round(W / r)))
            return x if size == (H, W) else resize_image(x, size)

        dataset = self.dataset(split)
        largest: dict[int, tuple[int, int]] = {}  # class -> (pixels, image index): the image a figure row shows
        for item in self.items(dataset, "equivariance"):
            x = item["image"].unsqueeze(0).to(self.device)
            maps = {r: self._np(self.forward(downsampled(x, r)).activations) for r in unique}
            label = item["label"].numpy()
            acc.update(maps, label)
            for c, n in zip(*np.unique(label, return_counts=True)):
                if int(c) != self.info.ignore_index and n > largest.get(int(c), (0, -1))[0]:
                    largest[int(c)] = (int(n), count)
            count += 1
        res = acc.compute()
        pairs_fig = self._equivariant_pairs_figure(res, dataset, largest, ratios, downsampled)
        rows = [
            [
                q,
                len(r["pairs"]),
                len(r["groups"]),
                r["ratio_groups"],
                r["ratio_prototypes"],
                r["ratio_classes"],
                r["num_candidate_pairs"],
            ]
            for q, r in res.items()
        ]
        fig = plot_equivariance(res, title=f"Quasi-equivariance across scales: {self.run.name}")
        summary = {
            "scale_ratios": ratios,
            "quantiles": EQUIVARIANCE_QUANTILES,
            "iou_threshold": acc.iou_threshold,
            "num_groups": acc.num_groups,
            "results": res,
            "candidate_pairs": [
                {"class": c, "scales": [s1, s2], "prototypes": [p1, p2], "iou": dict(zip(acc.quantiles, iou))}
                for c, s1, s2, p1, p2, iou in acc.pair_ious()
            ],
        }
        return MetricResult(
            "equivariance",
            "Quasi-equivariant prototypes across scales (Figure 7)",
            summary,
            ["p_th", "pairs", "groups", "ratio_groups", "ratio_prototypes", "ratio_classes", "candidate_pairs"],
            rows,
            fig,
            self.meta(split=split, num_images=count),
            extra_figures={"pairs": pairs_fig},
        )

    def _equivariant_pairs_figure(
        self,
        res: dict[float, dict[str, Any]],
        dataset: Any,
        largest: dict[int, tuple[int, int]],
        ratios: Sequence[float],
        downsampled: Any,
    ) -> Any:
        """Figures 8-10: the best quasi-equivariant pairs at the lowest p_th, each on the image with most pixels of
        its class: A_{s,i} on the input downsampled by r_{1->s'}, A_{s',j} on the one downsampled by r_{1->s}."""
        from PIL import Image

        from scaleprotoseg.analysis.plots import plot_equivariant_pairs

        q = min(res)
        pairs = sorted(res[q]["pairs"], key=lambda e: -e[2])[:EQUIVARIANT_PAIRS_SHOWN]
        cls, scale = self.head.prototype_class.cpu().numpy(), self.head.prototype_scale.cpu().numpy()
        panels = []
        for p, p2, iou in pairs:
            c = int(cls[p])
            index = largest[c][1]
            x = dataset[index]["image"].unsqueeze(0).to(self.device)
            raw = dataset.load_raw(index)[0]
            sides = {}
            for side, proto, other in (("left", p, p2), ("right", p2, p)):
                r = float(ratios[int(scale[other])])  # read each prototype on the input sized for the other's scale
                xr = downsampled(x, r)
                act = self._np(self.forward(xr).activations)[proto]
                image = np.asarray(Image.fromarray(raw).resize((xr.shape[-1], xr.shape[-2]), Image.BILINEAR))
                sides[side] = {
                    "image": image,
                    "activation": act,
                    "label": f"prototype {proto} (scale {int(scale[proto]) + 1}), input / {r:g}",
                }
            caption = f"{self.class_names[c]}: IoU {iou:.2f} at p_th {q:g}"
            panels.append({**sides, "caption": caption})
        return plot_equivariant_pairs(
            panels, title=f"Quasi-equivariant prototype pairs (Figures 8-10): {self.run.name}"
        )

    # -- dispatch ------------------------------------------------------------------------------------------------
    def run_metrics(self, metrics: Sequence[str]) -> Iterator[tuple[str, MetricResult | NotApplicable]]:
        """Yield ``(metric, result or the NotApplicable reason)`` in :data:`METRICS` order."""
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; expected {', '.join(METRICS)} or all")
        wanted = [m for m in METRICS if m in metrics]
        drivers = {
            "sparsity": self.sparsity,
            "prototypes": self.prototypes,
            "components": self.components,
            "group-overlap": self.group_overlap,
            "equivariance": self.equivariance,
        }
        for metric in wanted:
            if metric in ("consistency", "stability"):
                if metric == "stability" and "consistency" in wanted:
                    continue  # computed together with consistency
                try:
                    both = self.part_metrics("consistency" in wanted, "stability" in wanted)
                except NotApplicable as reason:
                    for m in ("consistency", "stability"):
                        if m in wanted:
                            yield m, reason
                    continue
                yield from both.items()
                continue
            try:
                yield metric, drivers[metric]()
            except NotApplicable as reason:
                yield metric, reason
