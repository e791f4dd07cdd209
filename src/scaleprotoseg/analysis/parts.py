"""The one pass over part-annotated images that the ``consistency`` and ``stability`` analyses share (paper section
4.2, Tables 3-4, supplement 6): each image is run clean for both and, for stability, once more with input noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scaleprotoseg.analysis.consistency import ConsistencyAccumulator
from scaleprotoseg.analysis.stability import StabilityAccumulator, add_gaussian_noise

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

CONSISTENCY_PERCENTILES = (70.0, 80.0, 90.0)
SHARED_KEY = "parts"


@dataclass
class PartPass:
    """What one pass gives: each accumulator's ``compute()`` (None when not asked for), the part names per class,
    the meta block both metrics share and what their figures are titled with."""

    consistency: dict[str, Any] | None
    stability: dict[str, Any] | None
    threshold: float | None
    part_names: dict[int, list[str]]
    prototype_class: np.ndarray
    prototype_scale: np.ndarray
    meta: dict[str, Any]
    title: str


def part_pass(ctx: AnalysisContext, consistency: bool, stability: bool) -> PartPass:
    """Feed the part-annotated images (``ctx.parts_dataset()``) through the run; grouped runs score only the
    prototypes some group uses. Stability noise: ``ctx.options.noise_std``, seeded with ``ctx.options.seed``."""
    ctx.need_prototypes()
    ds = ctx.parts_dataset()
    parts = {int(c): list(range(1, len(n) + 1)) for c, n in ds.part_names.items() if n}
    P = ctx.head.num_prototypes
    used = ctx.used_prototype_mask()
    cls = ctx.head.prototype_class.cpu().numpy()
    kw = {
        "percentiles": CONSISTENCY_PERCENTILES,
        "count_background": ctx.options.count_background,
        "prototypes_used": used,
    }
    cons = ConsistencyAccumulator(P, cls, parts, **kw) if consistency else None
    stab = StabilityAccumulator(P, cls, parts, **kw) if stability else None
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(int(ctx.options.seed))
    count = 0
    for item in ctx.items(ds, "consistency/stability"):
        x = item["image"].unsqueeze(0).to(ctx.device)
        label, part_map = item["label"].numpy(), item["parts"].numpy()
        act = ctx.activations(x)
        if cons is not None:
            cons.update(act, label, part_map)
        if stab is not None:
            noisy = add_gaussian_noise(x, ctx.options.noise_std, generator=gen)
            stab.update(act, ctx.activations(noisy), label, part_map)
        count += 1
    meta = ctx.meta(
        dataset=ds.info.name,
        split=ctx.split(),
        num_images=count,
        count_background=ctx.options.count_background,
        prototypes_scored=int(used.sum()),
        num_prototypes=P,
    )
    return PartPass(
        consistency=None if cons is None else cons.compute(),
        stability=None if stab is None else stab.compute(),
        threshold=None if cons is None else cons.threshold,
        part_names={int(c): list(n) for c, n in ds.part_names.items()},
        prototype_class=cls,
        prototype_scale=ctx.head.prototype_scale.cpu().numpy(),
        meta=meta,
        title=f"{ctx.name} ({ds.info.name}, {count} images)",
    )


def shared_part_pass(ctx: AnalysisContext, metric: str) -> PartPass:
    """:func:`part_pass` once per context for ``metric`` ("consistency" or "stability") and the other part metric
    when ``ctx.metrics`` asks for it too."""
    wanted = {metric} | ({"consistency", "stability"} & set(ctx.metrics))
    found = ctx.shared(SHARED_KEY, lambda: part_pass(ctx, "consistency" in wanted, "stability" in wanted))
    missing = found.consistency is None if metric == "consistency" else found.stability is None
    if missing:  # an earlier pass for the other metric only
        return part_pass(ctx, metric == "consistency", metric == "stability")
    return found
