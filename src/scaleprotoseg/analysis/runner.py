"""Drivers of ``scaleprotoseg analyze``: open a trained run (:class:`~scaleprotoseg.analysis.context.AnalysisContext`)
and run the registered analyses (:func:`~scaleprotoseg.analysis.registry.analyses`) one after the other; each writes
``<metric>.json``, ``<metric>.csv`` (the main table) and ``<metric>.png`` (see docs/analysis.md).

Metrics (paper section 4.2 and supplement 9-12), one module each:

- ``consistency``, ``stability``: part-annotated images (Tables 3-4); grouped runs score only the prototypes used
  by some group after thresholding. One pass over the images serves both (``analysis.parts``).
- ``sparsity``: active prototypes per class with last-layer weights thresholded at 0.005 (Tables 3-4), average
  absolute last-layer weight and extra parameters over DeepLabv2 (Table 10).
- ``prototypes``: prototype counts and val mIoU after projection, pruning, grouping at several alphas (Tables 2, 7).
- ``group-overlap``: IoU between binarised group activations of the same class (Table 9); grouped runs only.
- ``components``: connected components of binarised prototype activations per scale (Figure 3).
- ``equivariance``: quasi-equivariant prototypes across scales on downsampled training images (supplement 11,
  Figure 7); multi-scale runs only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from scaleprotoseg.analysis.context import AnalysisContext, AnalysisOptions
from scaleprotoseg.analysis.registry import METRICS, Analysis, MissingInput, NotApplicable, analyses
from scaleprotoseg.analysis.results import MetricResult

__all__ = [
    "METRICS",
    "AnalysisContext",
    "AnalysisOptions",
    "MissingInput",
    "NotApplicable",
    "run_metrics",
    "save_result",
]


def run_metrics(
    ctx: AnalysisContext, metrics: Sequence[str]
) -> Iterator[tuple[Analysis, MetricResult | NotApplicable]]:
    """Yield ``(analysis, its result or the NotApplicable reason)`` for ``metrics``, in :data:`METRICS` order."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; expected {', '.join(METRICS)} or all")
    registry = analyses()
    for metric in (m for m in METRICS if m in metrics):
        analysis = registry[metric]
        try:
            yield analysis, analysis.compute(ctx)
        except NotApplicable as reason:
            yield analysis, reason


def save_result(analysis: Analysis, result: MetricResult, out_dir: str | Path) -> dict[str, Path]:
    """``analysis.write`` then ``analysis.plot`` into ``out_dir``: every path written, by kind (json, csv, png...)."""
    return {**analysis.write(result, out_dir), **analysis.plot(result, out_dir)}
