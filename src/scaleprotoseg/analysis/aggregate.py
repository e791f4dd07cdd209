"""Several runs (seeds) of the paper's experiments summarised as mean +- std in the layout of its tables.

Each run directory contributes one :class:`RunRecord`: its dataset and method (from ``config.yaml``), the val mIoU
(``eval/final-<val split>/summary.json`` when ``scaleprotoseg evaluate`` has written it, else the last validation of
``metrics.jsonl``) and the interpretability numbers of ``scaleprotoseg analyze`` (``analysis/consistency.json``,
``stability.json``, ``sparsity.json``). Runs of the same (dataset, method) are pooled, and every table cell is the
mean +- sample standard deviation over them (the paper: 3 runs), with the number of runs beside it:

- Table 1: val mIoU (%), a row per method, a column per dataset (Cityscapes, Pascal VOC, ADE20K first; every other
  dataset except ISBI EM, which has Table 5);
- Tables 3-4: consistency, stability and sparsity per dataset with part annotations (Table 3 Pascal, Table 4
  Cityscapes);
- Table 5: ISBI-2012 EM IoU per split (``data.options.split_seed`` 0 and 1);
- Table 6: COCO-Stuff mIoU;
- Table 10: average |w| of the last layer and extra parameters over DeepLabv2 per dataset and prototype method (its
  It/s column is a speed measurement: ``make bench``, not part of a run).

:func:`write_aggregate` writes ``tables.md`` (every table, markdown), one ``<table>.csv`` per table (mean, std and n
of every cell) and ``runs.csv`` (one line per run with every number read).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaleprotoseg.rundir import RunDir, atomic_write_text

METHOD_ORDER = ("deeplabv2", "protoseg", "scaleprotoseg")
METHOD_NAMES = {"deeplabv2": "DeepLabv2", "protoseg": "ProtoSeg", "scaleprotoseg": "ScaleProtoSeg"}
DATASET_ORDER = ("cityscapes", "pascal_voc", "ade20k", "coco_stuff", "isbi_em")
DATASET_NAMES = {
    "cityscapes": "Cityscapes",
    "pascal_voc": "Pascal VOC",
    "ade20k": "ADE20K",
    "coco_stuff": "COCO-Stuff",
    "isbi_em": "ISBI EM",
}
PART_TABLES = {"pascal_voc": "Table 3", "cityscapes": "Table 4"}
VALUES = ("miou", "consistency", "stability", "sparsity", "avg_abs_weight", "extra_parameters")


class AggregateError(ValueError):
    """A run directory cannot be read; the message names the file and what was expected."""


@dataclass
class RunRecord:
    """What one run contributes: where it is, its dataset, method, EM split and its numbers (NaN when absent)."""

    run: str
    dataset: str
    method: str
    split_seed: int | None = None
    values: dict[str, float] = field(default_factory=dict)

    def value(self, key: str) -> float:
        return self.values.get(key, math.nan)


@dataclass
class Table:
    """One aggregated table: ``rows`` of (label cells, value cells); a value cell is the list of the runs' values."""

    name: str
    title: str
    label_columns: list[str]
    value_columns: list[str]
    rows: list[tuple[list[str], list[list[float]]]]
    digits: int = 2
    note: str = ""


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AggregateError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AggregateError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _number(data: dict[str, Any] | None, key: str, scale: float = 1.0) -> float:
    value = None if data is None else data.get(key)
    return float(value) * scale if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _dataset_key(data_cfg: dict[str, Any]) -> str:
    """The config's dataset name; folder datasets are named by their root folder (e.g. ``nuclei``)."""
    name = str(data_cfg.get("name", "folder"))
    if name in ("folder", "folder_parts"):
        root = str(data_cfg.get("root", "")).rstrip("/")
        return Path(root).name or name
    return name


def _last_validation(metrics_file: Path) -> float:
    """The last validation mIoU logged in ``metrics.jsonl`` (a fraction), NaN without one."""
    if not metrics_file.is_file():
        return math.nan
    value = math.nan
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run
        if isinstance(rec, dict) and isinstance(rec.get("val_miou"), int | float):
            value = float(rec["val_miou"])
    return value


def read_run(path: str | Path) -> RunRecord:
    """The :class:`RunRecord` of a run directory; raises :class:`AggregateError` when it has no readable config."""
    rd = RunDir(path)
    if not rd.config.is_file():
        raise AggregateError(f"{rd.config}: no such file; expected a run directory written by `scaleprotoseg train`")
    try:
        cfg = yaml.safe_load(rd.config.read_text()) or {}
    except yaml.YAMLError as err:
        raise AggregateError(f"{rd.config}: not valid YAML ({err})") from None
    data_cfg, model_cfg = cfg.get("data") or {}, cfg.get("model") or {}
    if not isinstance(data_cfg, dict) or not isinstance(model_cfg, dict):
        raise AggregateError(f"{rd.config}: expected 'data' and 'model' sections")
    options = data_cfg.get("options") or {}
    seed = options.get("split_seed") if isinstance(options, dict) else None
    summary = _read_json(rd.eval_dir(None, str(data_cfg.get("val_split", "val"))) / "summary.json")
    miou = _number(summary, "miou")
    if math.isnan(miou):
        miou = _last_validation(rd.metrics)
    analysis = rd.analysis
    sparsity = _read_json(analysis / "sparsity.json")
    values = {
        "miou": 100.0 * miou,
        "consistency": _number(_read_json(analysis / "consistency.json"), "score"),
        "stability": _number(_read_json(analysis / "stability.json"), "score"),
        "sparsity": _number(sparsity, "sparsity"),
        "avg_abs_weight": _number(sparsity, "avg_abs_weight"),
        "extra_parameters": _number(sparsity, "extra_parameters"),
    }
    return RunRecord(
        run=str(path),
        dataset=_dataset_key(data_cfg),
        method=str(model_cfg.get("method", "scaleprotoseg")),
        split_seed=int(seed) if isinstance(seed, int) else None,
        values=values,
    )


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite ``values``; NaN when none."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), std, len(finite)


def _ordered(keys: set[str], order: Sequence[str]) -> list[str]:
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def _has(records: Sequence[RunRecord], key: str) -> bool:
    return any(math.isfinite(r.value(key)) for r in records)


def build_tables(records: Sequence[RunRecord]) -> list[Table]:
    """The paper's tables that ``records`` have numbers for (see the module docstring); empty ones are left out."""
    tables: list[Table] = []
    by: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        by.setdefault((r.dataset, r.method), []).append(r)
    methods = _ordered({r.method for r in records}, METHOD_ORDER)

    def cell(dataset: str, method: str, key: str, keep: Any = None) -> list[float]:
        return [r.value(key) for r in by.get((dataset, method), []) if keep is None or keep(r)]

    main = [d for d in _ordered({r.dataset for r in records}, DATASET_ORDER) if d != "isbi_em"]
    main = [d for d in main if _has([r for r in records if r.dataset == d], "miou")]
    if main:
        rows = [([METHOD_NAMES.get(m, m)], [cell(d, m, "miou") for d in main]) for m in methods]
        rows = [row for row in rows if any(row[1])]
        tables.append(
            Table("table1", "Table 1: val mIoU (%)", ["Method"], [DATASET_NAMES.get(d, d) for d in main], rows)
        )
    for dataset in _ordered({r.dataset for r in records}, DATASET_ORDER):
        own = [r for r in records if r.dataset == dataset]
        if not any(_has(own, k) for k in ("consistency", "stability")):
            continue
        name = PART_TABLES.get(dataset, "Tables 3-4 layout")
        keys = ("consistency", "stability", "sparsity")
        rows = [([METHOD_NAMES.get(m, m)], [cell(dataset, m, k) for k in keys]) for m in methods]
        rows = [row for row in rows if any(row[1])]
        tables.append(
            Table(
                f"table3_4_{dataset}",
                f"{name}: consistency, stability, sparsity ({DATASET_NAMES.get(dataset, dataset)})",
                ["Method"],
                ["Consistency", "Stability", "Sparsity"],
                rows,
            )
        )
    em = [r for r in records if r.dataset == "isbi_em"]
    if _has(em, "miou"):
        splits = sorted({r.split_seed for r in em}, key=lambda s: -1 if s is None else s)
        rows = [
            ([METHOD_NAMES.get(m, m)], [cell("isbi_em", m, "miou", lambda r, s=s: r.split_seed == s) for s in splits])
            for m in methods
        ]
        rows = [row for row in rows if any(row[1])]
        cols = [f"EM Split {1 + s}" if s is not None else "EM" for s in splits]
        tables.append(Table("table5", "Table 5: ISBI-2012 EM mIoU (%) per split", ["Method"], cols, rows))
    if _has([r for r in records if r.dataset == "coco_stuff"], "miou"):
        rows = [([METHOD_NAMES.get(m, m)], [cell("coco_stuff", m, "miou")]) for m in methods]
        rows = [row for row in rows if any(row[1])]
        tables.append(Table("table6", "Table 6: COCO-Stuff val mIoU (%)", ["Method"], ["COCO-Stuff mIoU"], rows))
    rows = []
    for dataset in _ordered({r.dataset for r in records}, DATASET_ORDER):
        for m in methods:
            weights = cell(dataset, m, "avg_abs_weight")
            if any(math.isfinite(v) for v in weights):
                params = [v / 1e3 for v in cell(dataset, m, "extra_parameters")]
                rows.append(([DATASET_NAMES.get(dataset, dataset), METHOD_NAMES.get(m, m)], [weights, params]))
    if rows:
        tables.append(
            Table(
                "table10",
                "Table 10: last-layer sparsity and extra parameters over DeepLabv2",
                ["Dataset", "Method"],
                ["Avg Weight", "Parameters (K)"],
                rows,
                digits=3,
                note="It/s is a speed measurement (`make bench`), not part of a run.",
            )
        )
    return tables


def format_cell(values: Sequence[float], digits: int = 2) -> str:
    """``mean +- std (n)``; ``-`` when no run has the number."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def table_markdown(table: Table) -> str:
    """The table as markdown, under its title."""
    head = table.label_columns + table.value_columns
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for labels, cells in table.rows:
        lines.append("| " + " | ".join(labels + [format_cell(c, table.digits) for c in cells]) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines)


def _csv_number(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else ""


def write_aggregate(records: Sequence[RunRecord], out_dir: str | Path) -> dict[str, Path]:
    """Write ``tables.md``, ``<table>.csv`` per table and ``runs.csv`` into ``out_dir``; returns the paths by name."""
    if not records:
        raise AggregateError("no runs to aggregate; expected one or more run directories")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records)
    paths: dict[str, Path] = {}
    runs = sorted({r.run for r in records})
    md = [
        "# Aggregated results",
        "",
        f"{len(runs)} runs: mean ± sample std over the runs (n = runs with the number).",
        "",
    ]
    for table in tables:
        md += [table_markdown(table), ""]
        path = out / f"{table.name}.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(table.label_columns + [f"{c} {s}" for c in table.value_columns for s in ("mean", "std", "n")])
            for labels, cells in table.rows:
                stats = [mean_std(c) for c in cells]
                w.writerow(labels + [x for m, s, n in stats for x in (_csv_number(m), _csv_number(s), n)])
        paths[table.name] = path
    if not tables:
        md.append("No run has a number any table needs (evaluate or analyze the runs first).")
    paths["tables"] = out / "tables.md"
    atomic_write_text(paths["tables"], "\n".join(md).rstrip() + "\n")
    paths["runs"] = out / "runs.csv"
    with paths["runs"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "dataset", "method", "split_seed", *VALUES])
        for r in records:
            seed = "" if r.split_seed is None else r.split_seed
            w.writerow([r.run, r.dataset, r.method, seed, *(_csv_number(r.value(k)) for k in VALUES)])
    return paths
