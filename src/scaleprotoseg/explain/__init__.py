"""Explanations of predictions (paper section 4.2, supplement 13-17) and the HTML report of a run.

- :func:`explain_image` (``explain.explainer``): prototype maps by scale, group maps, group graph, nearest training
  patches, nearest prototypes of cells and the failure view of one image, with a JSON manifest.
- :func:`export_final_nearest` (``explain.nearest``): the step after training that writes the nearest training
  patches of the prototypes (:func:`export_nearest_patches`) into ``final/nearest/``.
- :func:`build_report` (``explain.report``): ``RUN/report/index.html``.

The names are imported lazily (nothing heavy happens when the package is imported). See docs/explanations.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "explain_image", "export_final_nearest", "export_nearest_patches"]

_WHERE = {
    "explain_image": "scaleprotoseg.explain.explainer",
    "export_final_nearest": "scaleprotoseg.explain.nearest",
    "export_nearest_patches": "scaleprotoseg.explain.nearest",
    "build_report": "scaleprotoseg.explain.report",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'scaleprotoseg.explain' has no attribute {name!r}")
