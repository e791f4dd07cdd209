"""``build_report``: one static, self-contained HTML page about a run (``RUN/report/index.html``).

One function per section, each building its tables from labelled columns with units (:class:`Column`): the run
summary (method, backbone, dataset and the training command as typed), training (the stages with their validation
mIoU, the weighted loss terms, the group weights, the curves), the evaluation (headline: always the validation
split, ``RUN/eval/<stage>-<val split>``, evaluated here through :func:`evaluate_split` when missing; other splits
are listed below it, never as the headline), the interpretability analyses of ``RUN/analysis/`` (their main table
with labelled columns, settings and figures), the prototypes and groups of every class (table + group graph,
Figures 4-5), expert edits and explained sample images. mIoU and IoU are always percentages with 2 decimals.

Every image is a file under the report directory referenced by a relative path, enlarged on a click by CSS alone;
there is no external CSS or JS, so the folder works offline and can be moved as a whole.
"""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.html import Column, Raw, data_table, esc, figure, fmt, kv_table, page, percent, render_json
from scaleprotoseg.explain.resources import confine
from scaleprotoseg.rundir import RunDir

__all__ = ["analysis_column", "build_report", "typed_command", "view_caption"]

_MAX_OPEN_CLASSES = 20  # more classes than this: each class's details start collapsed
_PROGRAMS = ("scaleprotoseg", "scaleprotoseg.exe")  # the console script; python -m: .../scaleprotoseg/__main__.py


def _read_json(path: Path, root: Path) -> Any:
    """The JSON in ``path`` (None when missing or invalid); it must resolve inside ``root`` (RunPathError)."""
    if path.exists():
        confine(path, root)
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def _read_jsonl(path: Path, root: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    confine(path, root)
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_csv(path: Path, root: Path) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of a CSV inside ``root``, numbers parsed (empty cells -> None)."""
    confine(path, root)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []

    def value(text: str) -> Any:
        if text == "":
            return None
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    width = len(rows[0])
    return rows[0], [[value(c) for c in r][:width] + [None] * (width - len(r)) for r in rows[1:] if r]


def _copy(src: Path, out: Path, rel: str, root: Path) -> str:
    """Copy ``src`` (which must resolve inside the run directory ``root``) to ``out/rel``; ``rel`` (posix) for the
    HTML."""
    confine(src, root)
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return Path(rel).as_posix()


def _val_dataset(cfg: Any) -> tuple[Any, str | None]:
    """The config's validation split (whole images), or ``(None, why not)``."""
    d = cfg.data
    if not d.root or not Path(d.root).exists():
        return None, f"the dataset root {d.root!r} of the run's config is not available on this machine"
    if not d.val_split:
        return None, "the run's config has no validation split"
    try:
        from scaleprotoseg.data.registry import build_dataset

        ds = build_dataset(d, d.val_split, train=False)
    except Exception as err:
        return None, f"the validation split could not be loaded ({err})"
    if len(ds) == 0:
        return None, f"the validation split {d.val_split!r} is empty"
    return ds, None


def typed_command(record: Mapping[str, Any]) -> str | None:
    """The ``scaleprotoseg`` command line of a training start as one would type it again (``scaleprotoseg train -c
    ... --run-dir ...``), from ``env.json`` (its ``argv`` list, else the joined ``command``) or a ``history.jsonl``
    record; None when the run was not started from the command line (e.g. through the Python API)."""
    argv = record.get("argv")
    if not (isinstance(argv, list) and argv):
        cmd = record.get("command")
        if not isinstance(cmd, str) or not cmd.strip():
            return None
        try:
            argv = shlex.split(cmd)
        except ValueError:
            argv = cmd.split()
    prog = Path(str(argv[0]))
    if prog.name not in _PROGRAMS and not (prog.name == "__main__.py" and prog.parent.name == "scaleprotoseg"):
        return None
    return shlex.join(["scaleprotoseg", *(str(a) for a in argv[1:])])


# ---------------------------------------------------------------------------------------------------------------
# Run summary
# ---------------------------------------------------------------------------------------------------------------
def _summary_section(run: RunDir, predictor: Any) -> str:
    from scaleprotoseg.explain.structure import prototype_head

    cfg, info = predictor.cfg, predictor.info
    head = prototype_head(predictor.model)
    env = _read_json(run.env, run.root) or {}
    items: dict[str, Any] = {
        "run": run.root.resolve().name,
        "method": info.method,
        "checkpoint": f"{predictor.stage or 'final'} (last stage: {info.stage or 'final'})",
        "backbone": cfg.model.backbone,
        "output stride": cfg.model.output_stride,
        "ASPP rates": ", ".join(str(r) for r in cfg.model.aspp_rates),
        "dataset": f"{cfg.data.name} ({cfg.data.root})",
        "splits": f"training: {cfg.data.train_split} · validation: {cfg.data.val_split or '–'}",
        "classes": f"{len(info.class_names)}: {', '.join(info.class_names[:12])}"
        + (" …" if len(info.class_names) > 12 else ""),
    }
    if head is not None:
        items["prototypes"] = f"{int(head.prototype_class.numel())} ({head.num_scales} scale(s))"
        if head.grouping is not None:
            items["groups"] = f"{head.grouping.num_groups} ({head.grouping.groups_per_class} per class)"
            items["prototypes used by groups"] = int(head.grouping.used_prototypes().numel())
    if env:
        items["trained"] = env.get("time", "–")
        items["environment"] = (
            f"Python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
            f"CUDA {env.get('cuda') or 'none'}, seed {env.get('seed', '?')}"
        )
    items.update(_commands(run, env))
    return kv_table(items)


def _commands(run: RunDir, env: Mapping[str, Any]) -> dict[str, Any]:
    """``{"command": ..., "working directory": ..., "later commands": ...}``: the first start in history.jsonl and
    the resumes after it, else env.json's command (env.json holds the latest invocation)."""
    starts = [r for r in _read_jsonl(run.history, run.root) if r.get("event") in ("start", "resume", "stages")]
    first = typed_command(starts[0]) if starts else None
    if first is None and env:
        first = typed_command(env)
    out: dict[str, Any] = {}
    if first is not None:
        out["command"] = Raw(f'<span class="mono">{esc(first)}</span>')
        if env.get("cwd"):
            out["working directory"] = Raw(f'<span class="mono">{esc(env["cwd"])}</span>')
    elif env.get("command") or starts:
        out["command"] = "not started with the scaleprotoseg command (trained through the Python API)"
    later = [(r, typed_command(r)) for r in starts[1:]]
    later_html = [
        f"{esc(r.get('time', ''))} {esc(r['event'])}: <span class='mono'>{esc(c)}</span>" for r, c in later if c
    ]
    if later_html:
        out["later commands"] = Raw("<br>".join(later_html))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def _stage_result(rec: Mapping[str, Any]) -> str:
    """What a non-gradient stage did, in words (projection, pruning, threshold), else its other scalar fields."""
    skip = {"stage", "kind", "event", "steps", "loss", "groups", "val_miou", "val_pixel_accuracy"}
    if "prototypes_before" in rec:
        text = f"{rec['prototypes_before']} → {rec.get('prototypes_after', '?')} prototypes"
        if "duplicates_removed" in rec:
            text += f", {rec['duplicates_removed']} duplicate(s) removed"
        skip |= {"prototypes_before", "prototypes_after", "duplicates_removed"}
    elif "weights_zeroed" in rec:
        text = f"α = {fmt(rec.get('alpha'))}: {rec['weights_zeroed']} weights set to 0"
        if "prototypes_used" in rec:
            text += f", {rec['prototypes_used']} prototypes used"
        skip |= {"alpha", "weights_zeroed", "prototypes_used"}
    else:
        text = ""
    rest = [
        f"{k.replace('_', ' ')} {fmt(v)}" for k, v in rec.items() if k not in skip and not isinstance(v, (dict, list))
    ]
    return "; ".join(x for x in [text, ", ".join(rest)] if x) or "–"


_STAGE_COLUMNS = (
    Column("stage"),
    Column("kind"),
    Column("steps", kind="int"),
    Column("status"),
    Column("validation mIoU", "%", "fraction%", 2),
    Column("validation pixel accuracy", "%", "fraction%", 2),
    Column("total loss", "weighted sum", "float", 4, note="the loss the stage minimised (table below)"),
    Column("result"),
)


def _stages_table(cfg: Any, ends: Mapping[str, Mapping[str, Any]], completed: set[str]) -> str:
    rows = []
    for n, s in cfg.train.stages.items():
        if not s.enabled:
            continue
        e = ends.get(n, {})
        loss = e.get("loss") if isinstance(e.get("loss"), dict) else {}
        rows.append(
            [
                n,
                s.kind,
                s.steps if s.kind in ("train", "proto_finetune") else None,
                "done" if n in completed else "not run",
                e.get("val_miou"),
                e.get("val_pixel_accuracy"),
                loss.get("total"),
                _stage_result(e),
            ]
        )
    return data_table(_STAGE_COLUMNS, rows)


def _loss_table(cfg: Any, ends: Mapping[str, Mapping[str, Any]], stages: list[str]) -> str:
    """Per gradient stage: each loss term times its weight (config ``loss``), and their sum, the total."""
    recs = [(n, ends[n]["loss"]) for n in stages if isinstance(ends.get(n, {}).get("loss"), dict)]
    if not recs:
        return ""
    terms: list[str] = []
    for _, loss in recs:
        terms += [k for k in loss if k != "total" and k not in terms]
    weights = {t: getattr(cfg.loss, t, None) for t in terms}
    cols = [Column("stage")]
    for t in terms:
        w = weights[t]
        cols.append(Column(t, f"× {w:g}" if isinstance(w, (int, float)) else "unweighted", "float", 4))
    cols.append(Column("total", "weighted sum", "float", 4))
    rows = []
    for n, loss in recs:
        cells: list[Any] = [n]
        for t in terms:
            v, w = loss.get(t), weights[t]
            cells.append(None if v is None else (float(v) * w if isinstance(w, (int, float)) else v))
        rows.append([*cells, loss.get("total")])
    given = ", ".join(f"{t} {weights[t]:g}" for t in terms if isinstance(weights[t], (int, float)))
    return (
        "<h3>Loss terms</h3>"
        f'<p>Each term multiplied by its weight (the config\'s <span class="mono">loss</span> section: {esc(given)}); '
        "a row adds up to the total the stage minimised. Values are the moving averages (factor 0.9) at the end of the "
        "stage; a dash: the stage does not use the term.</p>" + data_table(cols, rows)
    )


# (column, key of the ``groups`` record the trainer writes into a group stage's stage_end metrics)
_GROUP_COLUMNS = (
    (Column("entropy before", "Eq. 8, 0-1", "float", 4), "entropy_before"),
    (Column("entropy after", "Eq. 8, 0-1", "float", 4), "entropy_after"),
    (Column("mean |Δw|", kind="float"), "weight_change_mean"),
    (Column("max |Δw|", kind="float"), "weight_change_max"),
    (Column("‖Δw‖_F", kind="float"), "weight_change_frobenius"),
    (Column("max |Δh_group|", kind="float"), "h_group_change_max"),
)
_GROUPS_BARELY_MOVED = 0.1  # below this bound on every |Δw| since the initialisation, the groups are flagged


def _groups_table(ends: Mapping[str, Mapping[str, Any]], stages: list[tuple[str, Any]]) -> str:
    """The "Groups" table: per stage that trained the groups, the mean normalised row entropy (Eq. 8) before and
    after it, how far the group weights w_g moved (mean and max |Δw| over the class members, Frobenius norm) and
    max |Δh_group|. A note when all group stages together moved no weight by ``_GROUPS_BARELY_MOVED`` or more."""
    recs = [(n, ends[n]["groups"]) for n, _ in stages if isinstance(ends.get(n, {}).get("groups"), dict)]
    if not recs:
        return ""
    rows = [[n, *[g.get(k) for _, k in _GROUP_COLUMNS]] for n, g in recs]
    body = [
        "<h3>Groups</h3>",
        "<p>Per stage that trained the group weights w<sub>g</sub> (Eq. 2): the mean entropy of the group rows "
        "normalised by log |P<sub>c</sub>| (Eq. 8; 1 = uniform, 0 = one prototype) before and after the stage, and "
        "how far the stage moved w<sub>g</sub> (over the class members) and h<sub>group</sub>.</p>",
        data_table([Column("stage"), *[c for c, _ in _GROUP_COLUMNS]], rows),
    ]
    moved = [g.get("weight_change_max") for _, g in recs]
    if all(isinstance(v, (int, float)) for v in moved) and sum(moved) < _GROUPS_BARELY_MOVED:
        body.append(
            f'<p class="note">The group stages together moved no group weight by more than {fmt(sum(moved), 3)} '
            "from its initialisation: the groups shown under <i>Prototypes and groups</i> are close to their random "
            "initialisation, not learned (raise the groups' learning rate or the number of steps).</p>"
        )
    return "".join(body)


def _training_section(run: RunDir, cfg: Any, out: Path) -> str:
    state = _read_json(run.state_file, run.root) or {}
    records = _read_jsonl(run.metrics, run.root)
    ends = {r["stage"]: r for r in records if r.get("event") == "stage_end" and "stage" in r}
    stages = [(n, s) for n, s in cfg.train.stages.items() if s.enabled]
    body = [
        "<p>The stages of the config in order; validation mIoU measured on the validation split at the end of each "
        "stage.</p>",
        _stages_table(cfg, ends, set(state.get("completed", []))),
        _loss_table(cfg, ends, [n for n, _ in stages]),
        _groups_table(ends, stages),
    ]
    curves = _training_curves(records, stages, out / "assets" / "training_curves.png")
    if curves:
        body.append(
            '<div class="figs">'
            + figure(curves, "total (weighted) loss per training step; validation mIoU after each stage", cls="large")
            + "</div>"
        )
    return "".join(body)


def _training_curves(records: list[dict[str, Any]], stages: list[tuple[str, Any]], path: Path) -> str | None:
    steps = [r for r in records if "event" not in r and isinstance(r.get("total"), (int, float))]
    vals = [(r["stage"], r["val_miou"]) for r in records if r.get("event") == "stage_end" and "val_miou" in r]
    if not steps and not vals:
        return None
    fig = F.new_figure(11, 3.6, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x0 = 0
    for i, (n, s) in enumerate(stages):
        mine = [r for r in steps if r.get("stage") == n]
        if mine:
            xs = [x0 + int(r.get("step", j + 1)) for j, r in enumerate(mine)]
            ys = [float(r["total"]) for r in mine]
            ax1.plot(xs, ys, color=f"C{i % 10}", label=n, marker="." if len(ys) < 30 else None)
            x0 = max(xs[-1], x0 + int(getattr(s, "steps", 0) or 0))
    ax1.set_xlabel("training step (all stages)")
    ax1.set_ylabel("total loss (weighted sum)")
    ax1.set_title("Training loss")
    if steps:
        ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if vals:
        ax2.plot([v[0] for v in vals], [100 * float(v[1]) for v in vals], marker="o")
        ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax2.set_ylabel("validation mIoU (%)")
    ax2.set_title("Validation mIoU at the end of each stage")
    ax2.grid(alpha=0.3)
    F.save_figure(fig, path)
    return "assets/training_curves.png"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
_PER_CLASS_COLUMNS = (
    Column("class"),
    Column("IoU", "%", "fraction%", 2),
    Column("ground-truth pixels", kind="int"),
    Column("predicted pixels", kind="int"),
)
_OTHER_EVAL_COLUMNS = (
    Column("folder"),
    Column("checkpoint"),
    Column("split"),
    Column("images", kind="int"),
    Column("mIoU", "%", "fraction%", 2),
    Column("pixel accuracy", "%", "fraction%", 2),
    Column("notes"),
)


def _per_class_rows(metrics: Mapping[str, Any], folder: Path, root: Path) -> list[list[Any]]:
    path = folder / "per_class_iou.csv"
    if path.is_file():
        header, rows = _read_csv(path, root)
        idx = {h: i for i, h in enumerate(header)}
        if "class" in idx and "iou" in idx:
            return [
                [
                    r[idx["class"]],
                    r[idx["iou"]],
                    *[r[idx[k]] if k in idx else None for k in ("gt_pixels", "pred_pixels")],
                ]
                for r in rows
            ]
    iou = metrics.get("per_class_iou")
    return [[k, v, None, None] for k, v in iou.items()] if isinstance(iou, dict) else []


def _evaluate_validation(run: RunDir, predictor: Any, val: Any, out: Path) -> Path:
    """Evaluate the report's checkpoint on the validation split through :func:`evaluate_split`, into
    ``RUN/eval/<stage>-<val split>`` as ``scaleprotoseg evaluate RUN`` would (into the report when the run directory
    is not writable); returns the folder."""
    import os

    from scaleprotoseg.evaluation.inference import InferenceSettings
    from scaleprotoseg.evaluation.split import evaluate_split

    d = predictor.cfg.data
    target = run.eval_dir(predictor.stage, d.val_split)
    if not os.access(run.root, os.W_OK):
        target = out / "assets" / "eval" / target.name
    evaluate_split(
        predictor.model,
        val,
        class_names=list(predictor.info.class_names),
        out_dir=target,
        ignore_index=predictor.info.ignore_index,
        device=predictor.device,
        inference=InferenceSettings.from_config(d),
        progress=False,
        summary={"run": str(run.root), "stage": predictor.stage or "final", "split": d.val_split, "by": "report"},
    )
    return target


def _evaluation_section(
    run: RunDir, predictor: Any, out: Path, evaluate_missing: bool, val: Any, why: str | None
) -> str:
    """Headline: the validation split's evaluation of the report's checkpoint (computed here when missing and
    ``evaluate_missing``); below it every other evaluation of the run, each labelled with its split."""
    split = predictor.cfg.data.val_split
    stage = predictor.stage or "final"
    head = run.eval_dir(predictor.stage, split) if split else None
    body: list[str] = []
    if head is not None and not (head / "metrics.json").is_file() and evaluate_missing and val is not None:
        head = _evaluate_validation(run, predictor, val, out)
    if head is not None and (head / "metrics.json").is_file():
        body.append(_headline(run, head, out, split, stage))
    else:
        reason = why if evaluate_missing else "evaluation was not requested (--no-eval)"
        if not split:
            reason = "the run's config has no validation split"
        body.append(
            f'<p class="note">No evaluation of the validation split {esc(split or "–")} for checkpoint '
            f'{esc(stage)}: {esc(reason or "not found")}. Run <span class="mono">scaleprotoseg evaluate '
            f"{esc(run.root.as_posix())}</span>.</p>"
        )
    body.append(_other_evaluations(run, head, split))
    return "".join(body)


def _headline(run: RunDir, folder: Path, out: Path, split: str, stage: str) -> str:
    root = out if folder.resolve().is_relative_to(out.resolve()) else run.root
    metrics = _read_json(folder / "metrics.json", root) or {}
    summ = _read_json(folder / "summary.json", root) or {}
    from scaleprotoseg.evaluation.split import inference_text

    where = folder.relative_to(run.root).as_posix() if root == run.root else folder.relative_to(out).as_posix()
    head = (
        f'<p class="headline">Validation mIoU <b>{esc(percent(metrics.get("miou")))}</b> · pixel accuracy '
        f"{esc(percent(metrics.get('pixel_accuracy')))} · mean class accuracy "
        f"{esc(percent(metrics.get('mean_accuracy')))}</p>"
    )
    items: dict[str, Any] = {
        "split": f"{split} (validation)",
        "checkpoint": stage,
        "images": metrics.get("num_images", summ.get("num_images", "–")),
        "classes counted": metrics.get("num_present", "–"),
        "inference": inference_text(summ.get("inference")) if summ.get("inference") else metrics.get("mode", "–"),
        "time per image": f"{fmt(metrics['seconds_per_image'], 3)} s" if "seconds_per_image" in metrics else "–",
        "results": Raw(f'<span class="mono">{esc(where)}</span>')
        if summ.get("by") != "report"
        else Raw(f'<span class="mono">{esc(where)}</span> (evaluated by this report)'),
    }
    body = [head, kv_table(items)]
    base = summ.get("baselines")
    if isinstance(base, dict) and base:
        rows = [["this model", metrics.get("miou")], *[[k, v] for k, v in base.items()]]
        body.append("<h3>Baselines on the same split</h3>")
        body.append(data_table([Column("method"), Column("mIoU", "%", "fraction%", 2)], rows))
    rows = _per_class_rows(metrics, folder, root)
    if rows:
        body.append("<h3>Per-class IoU</h3>")
        body.append(data_table(_PER_CLASS_COLUMNS, rows))
    rel = f"assets/eval/{folder.name}"
    inside = root == out
    captions = {
        "confusion_matrix": "confusion matrix (rows: ground truth, normalised)",
        "per_class_iou": "IoU per class",
    }
    figs, links = [], []
    for f in sorted(folder.iterdir()):
        suffix = f.suffix.lower()
        if suffix not in (".png", ".csv", ".json") or not f.is_file():
            continue
        r = f.relative_to(out).as_posix() if inside else _copy(f, out, f"{rel}/{f.name}", run.root)
        if suffix == ".png":
            figs.append(figure(r, captions.get(f.stem, f.stem.replace("_", " ")), cls="medium"))
        else:
            links.append(f'<a href="{esc(r)}">{esc(f.name)}</a>')
    if figs:
        body.append(f'<div class="figs">{"".join(figs)}</div>')
    if links:
        body.append(f"<p>Files: {' · '.join(links)}</p>")
    return "".join(body)


def _other_evaluations(run: RunDir, head: Path | None, split: str) -> str:
    folders = sorted(p.parent for p in run.eval.glob("*/metrics.json")) if run.eval.is_dir() else []
    rows = []
    for f in folders:
        if head is not None and f.resolve() == head.resolve():
            continue
        m = _read_json(f / "metrics.json", run.root) or {}
        s = _read_json(f / "summary.json", run.root) or {}
        notes = []
        if isinstance(s.get("without"), dict):
            w = s["without"]
            notes.append(
                "without "
                + ", ".join([f"p{i}" for i in w.get("prototypes", [])] + [f"g{i}" for i in w.get("groups", [])])
            )
        if isinstance(s.get("miou_change"), (int, float)):
            notes.append(f"{100 * s['miou_change']:+.2f} points vs unedited")
        if s.get("split") and s.get("split") != split:
            notes.append("not the validation split")
        rows.append(
            [
                f.name,
                s.get("stage", "–"),
                s.get("split", "–"),
                m.get("num_images"),
                m.get("miou"),
                m.get("pixel_accuracy"),
                "; ".join(notes) or "–",
            ]
        )
    if not rows:
        return ""
    return (
        '<h3>Other evaluations in the run</h3><p>Every other folder of <span class="mono">eval/</span>: other '
        "checkpoints, splits or edited models. The headline above is always the validation split.</p>"
        + data_table(_OTHER_EVAL_COLUMNS, rows)
    )


# ---------------------------------------------------------------------------------------------------------------
# Interpretability analyses
# ---------------------------------------------------------------------------------------------------------------
_ANALYSIS_TITLES = {
    "sparsity": "Sparsity of the last layer (Tables 3-4, 10)",
    "prototypes": "Prototypes and mIoU per step (Tables 2, 7)",
    "consistency": "Consistency of prototypes (Tables 3-4)",
    "stability": "Stability of prototypes under input noise (Tables 3-4)",
    "components": "Connected components per scale (Figure 3)",
    "group-overlap": "Overlap of group activations (Table 9)",
    "equivariance": "Quasi-equivariant prototypes across scales (Figure 7)",
}
_ANALYSIS_COLUMNS: dict[str, Column] = {
    "class_index": Column("class index", kind="int"),
    "class": Column("class"),
    "images": Column("images", kind="int"),
    "active_prototypes": Column("active prototypes", "|w| ≥ threshold", "float", 3),
    "iou_%": Column("IoU between groups", "%", "%", 2),
    "pooled_iou_%": Column("pooled IoU between groups", "%", "%", 2),
    "scale": Column("scale", kind="int"),
    "p_th": Column("quantile p_th", kind="float"),
    "mean_count": Column("components per map", "mean", "float", 4),
    "mean_area": Column("area per component", "{area}, mean over maps", "float", 4),
    "pooled_area": Column("area per component", "{area}, pooled", "float", 4),
    "maps": Column("maps", kind="int"),
    "groups": Column("quasi-equivariant groups", kind="int"),
    "ratio_groups": Column("quasi-equivariant groups", "% of groups", "fraction%", 2),
    "ratio_prototypes": Column("prototypes in them", "% of prototypes", "fraction%", 2),
    "ratio_classes": Column("classes with one", "% of classes", "fraction%", 2),
    "candidate_pairs": Column("candidate pairs", kind="int"),
    "percentile": Column("binarisation percentile", kind="float"),
    "consistency_%": Column("consistency", "%", "%", 2),
    "consistent_prototypes": Column("consistent prototypes", kind="int"),
    "evaluated_prototypes": Column("evaluated prototypes", kind="int"),
    "stability_%": Column("stability", "%", "%", 2),
    "stable_pairs": Column("stable pairs", kind="int"),
    "step": Column("step"),
    "stage": Column("stage"),
    "alpha": Column("α", kind="float"),
    "prototypes": Column("prototypes", kind="int"),
    "group_avg": Column("mean group size", "prototypes", "float", 3),
    "miou": Column("mIoU", "%", "%", 2),
}
_METRIC_COLUMNS: dict[tuple[str, str], Column] = {
    ("equivariance", "pairs"): Column("quasi-equivariant pairs", kind="int"),
    ("stability", "pairs"): Column("pairs", kind="int"),
}
# summary fields shown as settings (label, unit); the rest of the JSON is in the linked file
_ANALYSIS_SETTINGS: dict[str, tuple[str, str]] = {
    "threshold": ("threshold on |w|", ""),
    "sparsity": ("active prototypes per class", "mean"),
    "avg_abs_weight": ("mean |w| of the last layer", ""),
    "extra_parameters": ("parameters added by the groups", ""),
    "last_layer": ("last layer", ""),
    "last_layer_shape": ("last layer shape", "classes × columns"),
    "num_prototypes": ("prototypes", ""),
    "prototypes_used": ("prototypes used", ""),
    "group_weights": ("group weights", ""),
    "feature_dim": ("feature dimension", ""),
    "quantile": ("activation quantile", ""),
    "mode": ("upsampling", ""),
    "miou": ("mean IoU between groups", "%"),
    "pooled_iou": ("pooled IoU between groups", "%"),
    "area_unit": ("area unit", ""),
    "cell_pixels": ("pixels per feature cell", ""),
    "scale_ratios": ("scale ratios", ""),
    "quantiles": ("quantiles p_th", ""),
    "iou_threshold": ("IoU threshold of a pair", ""),
    "num_groups": ("groups", ""),
    "noise_std": ("noise standard deviation", ""),
}


def analysis_column(metric: str, name: str, summary: Mapping[str, Any] | None = None) -> Column:
    """The labelled column of CSV column ``name`` of analysis ``metric`` (a generic one for unknown names: a
    ``_%`` suffix becomes the unit %)."""
    col = _METRIC_COLUMNS.get((metric, name)) or _ANALYSIS_COLUMNS.get(name)
    if col is None:
        if name.endswith("%"):
            return Column(name.rstrip("%_").replace("_", " "), "%", "%", 2)
        return Column(name.replace("_", " "), kind="float")
    if "{area}" in col.unit:
        area = str((summary or {}).get("area_unit", "feature cells"))
        col = Column(col.label, col.unit.replace("{area}", area), col.kind, col.digits, col.note)
    return col


def _analysis_settings(metric: str, data: Mapping[str, Any]) -> dict[str, Any]:
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    items: dict[str, Any] = {}
    ck = meta.get("stage", "final")
    if meta.get("checkpoint_stage"):
        ck = f"{ck} (last stage: {meta['checkpoint_stage']})"
    items["checkpoint"] = ck
    if meta.get("split"):
        items["split"] = meta["split"] + (f", {meta['num_images']} images" if meta.get("num_images") else "")
    for k, v in data.items():
        if k in ("metric", "meta") or k not in _ANALYSIS_SETTINGS:
            continue
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
            continue
        label, unit = _ANALYSIS_SETTINGS[k]
        if metric == "group-overlap" and k in ("miou", "pooled_iou") and isinstance(v, (int, float)):
            v = f"{v:.2f} %"
        elif k == "last_layer_shape" and isinstance(v, list):
            v = " × ".join(str(x) for x in v)
        items[f"{label} ({unit})" if unit and unit != "%" else label] = v
    return items


def _analysis_section(run: RunDir, out: Path) -> str:
    adir = run.analysis
    jsons = sorted(adir.glob("*.json")) if adir.is_dir() else []
    pngs = sorted(adir.rglob("*.png")) if adir.is_dir() else []
    if not jsons and not pngs:
        return (
            '<p class="note">No interpretability analyses in this run (run <span class="mono">scaleprotoseg '
            "analyze RUN</span> to add consistency, stability, sparsity, components, equivariance and group "
            "overlap results).</p>"
        )
    body = []
    shown: set[Path] = set()
    for j in jsons:
        data = _read_json(j, run.root)
        metric = str(data.get("metric", j.stem)) if isinstance(data, dict) else j.stem
        body.append(f"<h3>{esc(_ANALYSIS_TITLES.get(metric, j.stem.replace('_', ' ').replace('-', ' ')))}</h3>")
        csvs = sorted(adir.glob(f"{j.stem}*.csv"))
        links = [_copy(p, out, f"assets/analysis/{p.name}", run.root) for p in [j, *csvs]]
        if not isinstance(data, dict):
            body.append(
                render_json(data) if data is not None else f'<p class="note">{esc(j.name)} is not valid JSON</p>'
            )
        else:
            body.append(kv_table(_analysis_settings(metric, data)))
            main = adir / f"{j.stem}.csv"
            if main.is_file():
                header, rows = _read_csv(main, run.root)
                body.append(data_table([analysis_column(metric, h, data) for h in header], rows))
            else:
                body.append(render_json({k: v for k, v in data.items() if k not in ("metric", "meta")}))
        body.append(
            "<p>Full results: " + " · ".join(f'<a href="{esc(r)}">{esc(Path(r).name)}</a>' for r in links) + "</p>"
        )
        mine = [
            p
            for p in pngs
            if p.stem == j.stem or p.stem.startswith((j.stem + "_", j.stem + "-")) or p.parent.name == j.stem
        ]
        mine.sort(key=lambda p: (p.stem != j.stem, p.as_posix()))  # the analysis's own figure first
        shown.update(mine)
        figs = []
        for p in mine:
            rel = f"assets/analysis/{p.relative_to(adir).as_posix()}"
            if (
                metric == "components"
                and p.stem == j.stem
                and isinstance(data, dict)
                and _redraw_components(data, out / rel)
            ):
                figs.append(figure(rel, None, cls="large", alt=_ANALYSIS_TITLES["components"]))
                continue
            extra = p.stem[len(j.stem) :].strip("_-").replace("_", " ").replace("-", " ")
            title = _ANALYSIS_TITLES.get(metric, p.stem)
            figs.append(figure(_copy(p, out, rel, run.root), extra or None, cls="large", alt=title))
        if figs:
            body.append(f'<div class="figs">{"".join(figs)}</div>')
    rest = [p for p in pngs if p not in shown]
    if rest:
        body.append("<h3>Other figures</h3>")
        figs = [
            figure(_copy(p, out, f"assets/analysis/{p.relative_to(adir).as_posix()}", run.root), p.stem, cls="medium")
            for p in rest
        ]
        body.append(f'<div class="figs">{"".join(figs)}</div>')
    return "".join(body)


def _redraw_components(data: Mapping[str, Any], path: Path) -> bool:
    """Figure 3 drawn again from ``components.json`` (areas in its unit, feature cells); False if it cannot be."""
    try:
        from scaleprotoseg.analysis.plots import plot_components

        path.parent.mkdir(parents=True, exist_ok=True)
        plot_components(data, path)
        return path.is_file()
    except Exception:
        return False


def _prototypes_section(run: RunDir, predictor: Any, out: Path) -> str:
    from scaleprotoseg.explain.graph import plot_group_graph
    from scaleprotoseg.explain.resources import load_galleries
    from scaleprotoseg.explain.structure import class_structure, prototype_head

    head = prototype_head(predictor.model)
    if head is None:
        return f'<p class="note">{esc(predictor.info.method)} has no prototypes or groups.</p>'
    info = predictor.info
    names = list(info.class_names)
    palette = np.asarray(info.palette, dtype=np.uint8).reshape(-1, 3)
    gallery, _ = load_galleries(run.root, predictor.stage)
    multiscale = head.num_scales > 1
    body = []
    if gallery.problem:
        body.append(f'<p class="note">{esc(gallery.problem)}</p>')
    body.append(
        "<p>The edges are the model's weights and hold for every image of a class (global explanation, "
        "Figures 4-5): prototype → group with the non-zero group weights w<sub>g</sub>, group → class with "
        "h<sub>group</sub>; for ProtoSeg prototype → class with h<sub>proto</sub>.</p>"
    )
    copied: dict[int, str | None] = {}

    def patch_html(p: int) -> str:
        if p not in copied:
            src = gallery.path(p)
            copied[p] = None if src is None else _copy(src, out, f"assets/prototypes/{src.name}", run.root)
        rel = copied[p]
        if rel is None:
            return '<span class="note">no patch</span>'
        return f'<a href="{esc(rel)}"><img class="patch" src="{esc(rel)}" alt="prototype {p}"></a>'

    open_all = len(names) <= _MAX_OPEN_CLASSES
    for c, name in enumerate(names):
        s = class_structure(head, c, names)
        swatch = f'<span class="swatch" style="background:{F.hex_color(palette[c]) if c < len(palette) else "#000"}">'
        parts = []
        if s.grouped:
            rows = []
            for g in s.groups:
                members = sorted(s.group_weights.get(g, {}).items(), key=lambda kv: -kv[1])
                cells = "".join(
                    f'<span class="member">{patch_html(p)} p{p}'
                    f"{f' · scale {s.scales[p] + 1}' if multiscale else ''} · w = {w:.3f}</span>"
                    for p, w in members
                )
                rows.append([f"group {s.group_number(g)}", s.class_weights.get(g, 0.0), len(members), Raw(cells)])
            cols = [
                Column("group"),
                Column("h_group", "weight to the class", "float", 3),
                Column("prototypes", kind="int"),
                Column("members", "patch · scale · w_g", "html"),
            ]
            parts.append(data_table(cols, rows))
            unused = [p for p in s.prototypes if p not in set(s.used_prototypes())]
            if unused:
                parts.append(
                    f'<p class="note">Prototypes of this class no group uses: '
                    f"{esc(', '.join(f'p{p}' for p in unused))}</p>"
                )
        else:
            rows = []
            for p in s.prototypes:
                src = gallery.source(p) or {}
                where = f"{src.get('name', '?')} cell {tuple(src.get('cell', []))}" if src else "–"
                rows.append([f"p{p}", s.class_weights.get(p, 0.0), Raw(patch_html(p)), where])
            cols = [
                Column("prototype"),
                Column("h_proto", "weight to the class", "float", 3),
                Column("patch", kind="html"),
                Column("source", "training image, feature cell"),
            ]
            parts.append(data_table(cols, rows))
        graph = out / "assets" / "classes" / f"class_{c:03d}_{F.slug(name)}_graph.png"
        plot_group_graph(
            s,
            gallery,
            graph,
            palette=palette,
            multiscale=multiscale,
            title=f"{name}: " + ("prototypes -> groups -> class" if s.grouped else "prototypes -> class"),
        )
        parts.append(
            '<div class="figs">'
            + figure(graph.relative_to(out).as_posix(), f"{name}: group graph (click to enlarge)", cls="large")
            + "</div>"
        )
        n_used = len(s.used_prototypes())
        head_line = f"{swatch}</span>{esc(name)} — {len(s.prototypes)} prototypes, {n_used} used" + (
            f", {len(s.groups)} groups" if s.grouped else ""
        )
        body.append(f"<details{' open' if open_all else ''}><summary>{head_line}</summary>{''.join(parts)}</details>")
    return "".join(body)


# ---------------------------------------------------------------------------------------------------------------
# Explained images
# ---------------------------------------------------------------------------------------------------------------
def view_caption(view: str, file: str) -> str:
    """Caption of one explanation figure: the view's name and what tells its files apart (``nearest patches ·
    p0006``), the view's name alone when the file is named after it."""
    label = view.replace("_", " ")
    rest = Path(file).stem
    if rest.startswith(view):
        rest = rest[len(view) :]
    rest = rest.strip("_- ").replace("_", " ")
    return f"{label} · {rest}" if rest else label


_IMAGE_IOU_COLUMNS = (Column("class"), Column("IoU on this image", "%", "fraction%", 2))


def _sample_html(man: dict[str, Any], rel: str, names: list[str]) -> str:
    def link(f: str) -> str:
        return f"{rel}/{f}"

    parts = [f"<h3>{esc(man.get('name') or rel)}</h3>"]
    files = man.get("files", {})
    if "summary" in files:
        figs = figure(link(files["summary"]), "image, prediction and ground truth", cls="large")
        parts.append(f'<div class="figs">{figs}</div>')
    parts.append(f'<p><a href="{esc(link("manifest.json"))}">manifest.json</a> (every figure of this image)</p>')
    for note in man.get("notes", []):
        parts.append(f'<p class="note">{esc(note)}</p>')
    fail = man.get("failure")
    if fail:
        iou = fail.get("iou", {})
        present = [[k, v] for k, v in iou.items() if v is not None]
        if present:
            parts.append(f"<h4>IoU per class on this image (failure below {100 * fail['threshold']:.0f} %)</h4>")
            parts.append(data_table(_IMAGE_IOU_COLUMNS, present))
        for case in fail.get("cases", []):
            taken = ", ".join(f"{names[t['class']]} {100 * t['fraction']:.0f} %" for t in case.get("taken_by", [])[:4])
            parts.append(
                f"<h4>Failure: {esc(case['name'])} (IoU {esc(percent(case.get('iou')))}), "
                f"its pixels predicted as {esc(taken or '–')}</h4>"
            )
            figs = [figure(link(f), k.replace("_", " "), cls="small") for k, f in case.get("files", {}).items()]
            parts.append(f'<div class="figs">{"".join(figs)}</div>')
    for c in man.get("classes", []):
        parts.append(f"<h4>{esc(c['name'])}{'' if c.get('present', True) else ' (not predicted)'}</h4>")
        figs = []
        for view, v in c.get("views", {}).items():
            for f in v.get("files", []):
                figs.append(figure(link(f), view_caption(view, f), cls="small"))
        missing = [
            f"{k.replace('_', ' ')} ({v.get('reason', 'not available')})"
            for k, v in c.get("views", {}).items()
            if not v.get("available")
        ]
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
        if missing:
            parts.append(f'<p class="note">Not shown: {esc("; ".join(missing))}</p>')
    return "".join(parts)


def _samples_section(
    run: RunDir, predictor: Any, out: Path, n: int, inputs: Sequence[str | Path] | None, val: Any, why: str | None
) -> str:
    from scaleprotoseg.explain.explainer import explain_image

    samples: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    if inputs:
        from scaleprotoseg.data.io import read_image

        samples = [(Path(p).stem, read_image(p), None) for p in inputs]
        intro = f"<p>{len(samples)} image(s) given with --input.</p>"
    elif val is not None and n > 0:
        for i in range(min(n, len(val))):
            image, label, name = val.load_raw(i)
            samples.append((str(name), image, label))
        intro = f"<p>The first {len(samples)} validation image(s), with their ground truth (failure views).</p>"
    else:
        reason = "no images requested (--images 0)" if n <= 0 else why
        return (
            f'<p class="note">No sample explained: {esc(reason)}. Pass images with --input, or run '
            f'<span class="mono">scaleprotoseg explain</span>.</p>'
        )
    names = list(predictor.info.class_names)
    parts = [intro]
    used: set[str] = set()
    for name, image, label in samples:
        d = F.slug(name)
        while d in used:
            d += "_"
        used.add(d)
        man = explain_image(predictor, image, out / "samples" / d, label=label, run_dir=run.root, name=name)
        parts.append(_sample_html(man, f"samples/{d}", names))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Expert edits
# ---------------------------------------------------------------------------------------------------------------
def _edits_section(run: RunDir, split: str) -> str | None:
    """The expert edits of the run (``scaleprotoseg explore``) with their measured effect, or ``None`` if none."""
    from scaleprotoseg.explore.edits import list_edits

    try:
        edits = list_edits(run)
    except ValueError as err:
        return f'<p class="note">{esc(str(err))}</p>'
    if not edits:
        return None

    def miou(stage: str | None) -> float | None:
        data = _read_json(run.eval_dir(stage, split) / "summary.json", run.root)
        return data.get("miou") if isinstance(data, dict) else None

    rows = []
    for e in edits:
        removed = ", ".join([f"p{p}" for p in e.removed_prototypes] + [f"g{g}" for g in e.removed_groups])
        after, before = miou(e.stage), miou(None if e.base == "final" else e.base)
        change = None if after is None or before is None else 100 * (after - before)
        effect = "" if after is not None else f"not evaluated (scaleprotoseg evaluate RUN --stage {e.stage})"
        if e.effect and "changed_fraction" in e.effect:
            effect += f"{'; ' if effect else ''}{100 * e.effect['changed_fraction']:.2f} % of "
            effect += f"{e.effect.get('image', 'the image')} changed"
        rows.append([e.stage, e.base, removed, e.author, e.reason, e.created, after, change, effect or "–"])
    cols = [
        Column("edit"),
        Column("from"),
        Column("removed"),
        Column("by"),
        Column("why"),
        Column("when"),
        Column(f"mIoU ({split})", "%", "fraction%", 2),
        Column("change", "points", "%", 2),
        Column("notes"),
    ]
    return data_table(cols, rows)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def build_report(
    run: str | Path,
    out_dir: str | Path | None = None,
    *,
    images: int = 3,
    inputs: Sequence[str | Path] | None = None,
    stage: str | None = None,
    device: str = "cpu",
    evaluate_missing: bool = True,
) -> Path:
    """Write the report of ``run`` into ``out_dir`` (default ``RUN/report``) and return the path of ``index.html``.

    ``images``: how many validation images to explain (when the data is available); ``inputs``: image files to
    explain instead. ``evaluate_missing``: evaluate the validation split when ``RUN/eval/<stage>-<val split>`` is
    missing (written there, as ``scaleprotoseg evaluate RUN`` would).
    """
    from scaleprotoseg.predict import Predictor

    run = RunDir(run)
    out = Path(out_dir) if out_dir is not None else run.report
    predictor = Predictor.from_run(run.root, stage, device)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("assets", "samples"):  # stale files of an earlier report would be left unreferenced
        shutil.rmtree(out / sub, ignore_errors=True)
    val, why = _val_dataset(predictor.cfg)
    sections = [
        ("summary", "Run summary", _summary_section(run, predictor)),
        ("training", "Training", _training_section(run, predictor.cfg, out)),
        ("evaluation", "Evaluation", _evaluation_section(run, predictor, out, evaluate_missing, val, why)),
        ("analysis", "Interpretability analyses", _analysis_section(run, out)),
        ("prototypes", "Prototypes and groups", _prototypes_section(run, predictor, out)),
        ("samples", "Explained images", _samples_section(run, predictor, out, images, inputs, val, why)),
    ]
    edits = _edits_section(run, predictor.cfg.data.val_split)
    if edits is not None:
        sections.insert(5, ("edits", "Expert edits", edits))
    title = f"scaleprotoseg report: {run.root.resolve().name}"
    subtitle = (
        f"{predictor.info.method} · {predictor.cfg.model.backbone} · {predictor.cfg.data.name} · "
        f"generated {time.strftime('%Y-%m-%d %H:%M')}"
    )
    index = out / "index.html"
    from scaleprotoseg.data.io import printable

    index.write_text(printable(page(title, subtitle, sections)), encoding="utf-8")  # names from any file system
    return index
