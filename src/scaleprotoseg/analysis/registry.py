"""The analyses of ``scaleprotoseg analyze``, each one module with one :class:`Analysis`: ``compute`` reads the
run through an :class:`~scaleprotoseg.analysis.context.AnalysisContext` and returns a
:class:`~scaleprotoseg.analysis.results.MetricResult`; ``write`` writes its JSON and CSV, ``plot`` its figures.

| metric | module | paper |
|---|---|---|
| ``sparsity`` | :mod:`scaleprotoseg.analysis.sparsity` | Tables 3-4, 10 |
| ``prototypes`` | :mod:`scaleprotoseg.analysis.prototypes` | Tables 2, 7 |
| ``consistency`` | :mod:`scaleprotoseg.analysis.consistency` | Tables 3-4 |
| ``stability`` | :mod:`scaleprotoseg.analysis.stability` | Tables 3-4 |
| ``components`` | :mod:`scaleprotoseg.analysis.components` | Figure 3 |
| ``group-overlap`` | :mod:`scaleprotoseg.analysis.overlap` | Table 9 |
| ``equivariance`` | :mod:`scaleprotoseg.analysis.equivariance` | supplement 11, Figures 7-10 |
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleprotoseg.analysis.results import MetricResult, write_tables

if TYPE_CHECKING:
    from scaleprotoseg.analysis.context import AnalysisContext

METRICS = ("sparsity", "prototypes", "consistency", "stability", "components", "group-overlap", "equivariance")
FIGURE_DPI = 120


class NotApplicable(Exception):
    """The metric does not apply to this run (the message is the one-line reason)."""


class MissingInput(NotApplicable):
    """The metric applies but lacks an input the user must give (e.g. part annotations)."""


class Analysis:
    """One metric of ``scaleprotoseg analyze``: subclasses set ``name`` (the metric on the command line) and
    implement :meth:`compute` and :meth:`figures`. A metric that does not apply raises
    :class:`~scaleprotoseg.analysis.context.NotApplicable` from ``compute``."""

    name: str = ""

    def compute(self, ctx: AnalysisContext) -> MetricResult:
        raise NotImplementedError

    def figures(self, result: MetricResult) -> dict[str, Any]:
        """``{"": main figure, name: another figure}`` drawn from ``result`` (no model, no data)."""
        return {}

    def write(self, result: MetricResult, out_dir: str | Path) -> dict[str, Path]:
        """``<metric>.json`` (summary and meta) and ``<metric>.csv`` (the main table) in ``out_dir``."""
        return write_tables(result, out_dir)

    def plot(self, result: MetricResult, out_dir: str | Path) -> dict[str, Path]:
        """``<metric>.png`` and ``<metric>-<name>.png`` for each of :meth:`figures` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for key, figure in self.figures(result).items():
            if figure is None:
                continue
            paths["png" + (f"-{key}" if key else "")] = path = out / f"{result.metric}{f'-{key}' if key else ''}.png"
            figure.savefig(path, dpi=FIGURE_DPI)
        return paths


def analyses() -> dict[str, Analysis]:
    """Every analysis by metric name, in :data:`METRICS` order."""
    from scaleprotoseg.analysis.components import ComponentsAnalysis
    from scaleprotoseg.analysis.consistency import ConsistencyAnalysis
    from scaleprotoseg.analysis.equivariance import EquivarianceAnalysis
    from scaleprotoseg.analysis.overlap import GroupOverlapAnalysis
    from scaleprotoseg.analysis.prototypes import PrototypesAnalysis
    from scaleprotoseg.analysis.sparsity import SparsityAnalysis
    from scaleprotoseg.analysis.stability import StabilityAnalysis

    found: list[Analysis] = [
        SparsityAnalysis(),
        PrototypesAnalysis(),
        ConsistencyAnalysis(),
        StabilityAnalysis(),
        ComponentsAnalysis(),
        GroupOverlapAnalysis(),
        EquivarianceAnalysis(),
    ]
    by_name = {a.name: a for a in found}
    if tuple(by_name) != METRICS:  # pragma: no cover - a new analysis must be listed in both places
        raise RuntimeError(f"analyses {tuple(by_name)} differ from METRICS {METRICS}")
    return by_name
