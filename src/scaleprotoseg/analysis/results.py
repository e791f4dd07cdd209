"""What an analysis produces and how it is written: :class:`MetricResult` (summary, main table, what its figures
draw), plain JSON with NaN as null, CSV, and the fixed-width tables ``scaleprotoseg analyze`` prints."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class MetricResult:
    """One analysis: ``summary`` and ``meta`` are written as JSON, ``columns``/``rows`` as CSV and printed;
    ``plot_data`` holds what the figures draw beyond them (e.g. images and activation maps) and is not written."""

    metric: str
    title: str
    summary: dict[str, Any]
    columns: list[str]
    rows: list[list[Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    plot_data: dict[str, Any] = field(default_factory=dict)


def jsonable(obj: Any) -> Any:
    """Plain-JSON version of ``obj``: numpy arrays and scalars to lists/numbers, NaN/inf to None, tuples to lists,
    dict keys to strings (floats written with ``:g``, e.g. 70.0 -> "70", 0.05 -> "0.05")."""
    if isinstance(obj, dict):
        return {_key(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(data: Any, indent: int = 2, level: int = 0) -> str:
    """JSON text of plain data (from :func:`jsonable`) with lists of numbers kept on one line."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(data, dict) and data:
        body = ",\n".join(f"{inner}{json.dumps(k)}: {dumps(v, indent, level + 1)}" for k, v in data.items())
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(data, list) and data and any(isinstance(v, dict | list) for v in data):
        if all(isinstance(v, list) and not any(isinstance(x, dict | list) for x in v) for v in data):
            body = ",\n".join(inner + json.dumps(v, allow_nan=False) for v in data)  # a matrix: one row a line
        else:
            body = ",\n".join(inner + dumps(v, indent, level + 1) for v in data)
        return "[\n" + body + "\n" + pad + "]"
    return json.dumps(data, allow_nan=False)


def _key(k: Any) -> str:
    if isinstance(k, np.integer | int) and not isinstance(k, bool):
        return str(int(k))
    if isinstance(k, np.floating | float):
        return f"{float(k):g}"
    return str(k)


def _cell(v: Any, digits: int | None = None) -> str:
    """A table cell: None / NaN -> "", floats in full (CSV) or with ``digits`` decimals (printed tables)."""
    if v is None:
        return ""
    if isinstance(v, np.floating | float):
        v = float(v)
        if not math.isfinite(v):
            return ""
        if digits is None:
            return repr(v)
        return f"{v:g}" if v == int(v) and abs(v) < 1e6 else f"{v:.{digits}f}"
    return str(v)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width text table (NaN / None shown as '-')."""
    text = [[str(c) for c in columns]] + [[_cell(v, 3) or "-" for v in r] for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_tables(result: MetricResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<metric>.json`` (``metric``, ``meta`` and the summary) and ``<metric>.csv`` into ``out_dir``."""
    from scaleprotoseg.rundir import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{result.metric}.json", "csv": out / f"{result.metric}.csv"}
    data = jsonable({"metric": result.metric, "meta": result.meta, **result.summary})
    atomic_write_text(paths["json"], dumps(data) + "\n")
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(result.columns)
        writer.writerows([[_cell(v) for v in r] for r in result.rows])
    return paths
