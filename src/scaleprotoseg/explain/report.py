"""``build_report``: one static, self-contained HTML page about a run (``RUN/report/index.html``).

Sections: run summary (method, backbone, dataset, stages with their metrics), evaluation (the latest
``RUN/eval/*/metrics.json`` and ``per_class_iou.csv``, else a validation evaluation computed here when the data is
available), the interpretability analyses found in ``RUN/analysis/`` (every JSON rendered generically, every PNG
shown), the prototypes and groups of every class (table + group graph, Figures 4-5), and explained sample images
(``explain_image`` on the first validation images, or on given images). Every image is a file under the report
directory referenced by a relative path and there is no external CSS or JS, so the folder works offline and can be
moved as a whole.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.explain import figures as F
from scaleprotoseg.explain.html import Raw, esc, figure, fmt, kv_table, page, render_json, table
from scaleprotoseg.explain.resources import confine
from scaleprotoseg.rundir import RunDir

__all__ = ["build_report"]

_MAX_OPEN_CLASSES = 20  # more classes than this: each class's details start collapsed


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


def _copy(src: Path, out: Path, rel: str, root: Path) -> str:
    """Copy ``src`` (which must resolve inside the run directory ``root``) to ``out/rel``; ``rel`` (posix) for the
    HTML."""
    confine(src, root)
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return Path(rel).as_posix()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def _summary(run: RunDir, predictor: Any, out: Path) -> str:
    from scaleprotoseg.explain.structure import prototype_head

    cfg, info = predictor.cfg, predictor.info
    head = prototype_head(predictor.model)
    state = _read_json(run.state_file, run.root) or {}
    env = _read_json(run.env, run.root) or {}
    items: dict[str, Any] = {
        "run": run.root.resolve().name,
        "method": info.method,
        "checkpoint stage": info.stage or "final",
        "backbone": cfg.model.backbone,
        "output stride": cfg.model.output_stride,
        "ASPP rates": ", ".join(str(r) for r in cfg.model.aspp_rates),
        "dataset": f"{cfg.data.name} ({cfg.data.root})",
        "classes": len(info.class_names),
    }
    if head is not None:
        items["prototypes"] = int(head.prototype_class.numel())
        items["scales"] = head.num_scales
        if head.grouping is not None:
            items["groups"] = f"{head.grouping.num_groups} ({head.grouping.groups_per_class} per class)"
            items["prototypes used by groups"] = int(head.grouping.used_prototypes().numel())
    if env:
        items["trained"] = env.get("time", "")
        items["command"] = env.get("command", "")
    body = [kv_table(items)]

    records = _read_jsonl(run.metrics, run.root)
    ends = {r["stage"]: r for r in records if r.get("event") == "stage_end" and "stage" in r}
    completed = set(state.get("completed", []))
    stages = [(n, s) for n, s in cfg.train.stages.items() if s.enabled]
    metric_keys: list[str] = []
    for n, _ in stages:
        for k in _flatten(ends.get(n, {})):
            if k not in ("stage", "kind", "event", "steps") and not k.startswith("groups.") and k not in metric_keys:
                metric_keys.append(k)
    rows = []
    for n, s in stages:
        m = _flatten(ends.get(n, {}))
        rows.append(
            [
                n,
                s.kind,
                s.steps if s.kind == "train" else "–",
                "done" if n in completed else "not run",
                *[m.get(k) for k in metric_keys],
            ]
        )
    body.append("<h3>Training stages</h3>")
    body.append(table(["stage", "kind", "steps", "status", *metric_keys], rows))
    body.append(_groups_table(ends, stages))
    curves = _training_curves(records, stages, out / "assets" / "training_curves.png")
    if curves:
        body.append(f'<div class="figs">{figure(curves, "training loss per step and validation mIoU per stage")}</div>')
    return "".join(body)


# (header, key of the ``groups`` record the trainer writes into a group stage's stage_end metrics)
_GROUP_COLUMNS = (
    ("entropy before", "entropy_before"),
    ("entropy after", "entropy_after"),
    ("mean |Δw|", "weight_change_mean"),
    ("max |Δw|", "weight_change_max"),
    ("‖Δw‖_F", "weight_change_frobenius"),
    ("max |Δh_group|", "h_group_change_max"),
)
_GROUPS_BARELY_MOVED = 0.1  # below this bound on every |Δw| since the initialisation, the groups are flagged


def _groups_table(ends: dict[str, dict[str, Any]], stages: list[tuple[str, Any]]) -> str:
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
        table(["stage", *[h for h, _ in _GROUP_COLUMNS]], rows),
    ]
    moved = [g.get("weight_change_max") for _, g in recs]
    if all(isinstance(v, (int, float)) for v in moved) and sum(moved) < _GROUPS_BARELY_MOVED:
        body.append(
            f'<p class="note">The group stages together moved no group weight by more than {fmt(sum(moved), 3)} '
            "from its initialisation: the groups shown under <i>Prototypes and groups</i> are close to their random "
            "initialisation, not learned (raise the groups' learning rate or the number of steps).</p>"
        )
    return "".join(body)


def _training_curves(records: list[dict[str, Any]], stages: list[tuple[str, Any]], path: Path) -> str | None:
    steps = [r for r in records if "event" not in r and isinstance(r.get("total"), (int, float))]
    vals = [(r["stage"], r["val_miou"]) for r in records if r.get("event") == "stage_end" and "val_miou" in r]
    if not steps and not vals:
        return None
    fig = F.new_figure(11, 3.6, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    order = [n for n, _ in stages]
    x0 = 0
    for i, n in enumerate(order):
        ys = [float(r["total"]) for r in steps if r.get("stage") == n]
        if ys:
            ax1.plot(range(x0, x0 + len(ys)), ys, color=f"C{i % 10}", label=n, marker="." if len(ys) < 30 else None)
            x0 += len(ys)
    ax1.set_xlabel("logged step")
    ax1.set_ylabel("total loss")
    ax1.set_title("Training loss")
    if steps:
        ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if vals:
        ax2.plot([v[0] for v in vals], [100 * float(v[1]) for v in vals], marker="o")
        ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax2.set_ylabel("mIoU (%)")
    ax2.set_title("Validation mIoU at the end of each stage")
    ax2.grid(alpha=0.3)
    F.save_figure(fig, path)
    return "assets/training_curves.png"


def _eval_tables(metrics: dict[str, Any], csv_path: Path | None, names: list[str]) -> str:
    keys = ["miou", "pixel_accuracy", "mean_accuracy", "num_images", "num_present", "mode", "seconds_per_image"]
    summary = {k: metrics[k] for k in keys if k in metrics}
    for k in ("miou", "pixel_accuracy", "mean_accuracy"):
        if isinstance(summary.get(k), (int, float)):
            summary[k] = f"{100 * float(summary[k]):.2f} %"
    body = [kv_table(summary)]
    rows = []
    if csv_path is not None and csv_path.is_file():
        with csv_path.open() as f:
            for r in csv.DictReader(f):
                iou = r.get("iou", "")
                rows.append(
                    [
                        r.get("class", ""),
                        f"{100 * float(iou):.2f}" if iou else "–",
                        r.get("gt_pixels", ""),
                        r.get("pred_pixels", ""),
                    ]
                )
    elif isinstance(metrics.get("per_class_iou"), dict):
        rows = [[k, "–" if v is None else f"{100 * float(v):.2f}", "", ""] for k, v in metrics["per_class_iou"].items()]
    if rows:
        body.append("<h3>Per-class IoU</h3>")
        body.append(table(["class", "IoU (%)", "ground-truth pixels", "predicted pixels"], rows))
    return "".join(body)


def _evaluation(run: RunDir, predictor: Any, out: Path, evaluate_missing: bool, val: Any, why: str | None) -> str:
    names = list(predictor.info.class_names)
    found = sorted((p for p in run.eval.glob("*/metrics.json")), key=lambda p: p.stat().st_mtime)
    if found:
        src = found[-1].parent
        metrics = _read_json(found[-1], run.root) or {}
        intro = f'<p>Latest evaluation: <span class="mono">{esc(src.relative_to(run.root).as_posix())}</span>'
        summ = _read_json(src / "summary.json", run.root) or {}
        if summ:
            intro += f" (stage {esc(summ.get('stage', '?'))}, split {esc(summ.get('split', '?'))})"
        intro += ".</p>"
        rel = f"assets/eval/{src.name}"
        csv_path = src / "per_class_iou.csv"
        if csv_path.exists():
            confine(csv_path, run.root)
    elif evaluate_missing and val is not None:
        from scaleprotoseg.evaluation.evaluate import evaluate
        from scaleprotoseg.evaluation.inference import InferenceSettings
        from scaleprotoseg.evaluation.miou import write_results
        from scaleprotoseg.evaluation.plots import plot_confusion_matrix, plot_per_class_iou

        d = predictor.cfg.data
        res = evaluate(
            predictor.model,
            val,
            num_classes=len(names),
            ignore_index=predictor.info.ignore_index,
            device=predictor.device,
            inference=InferenceSettings.from_config(d),
            progress=False,
        )
        src = out / "assets" / "eval" / "report"
        write_results(res, names, src)
        plot_confusion_matrix(res["matrix"], names, src / "confusion_matrix.png")
        plot_per_class_iou(res["iou"], names, src / "per_class_iou.png")
        metrics = _read_json(src / "metrics.json", out) or {}
        intro = (
            f'<p>No <span class="mono">eval/</span> results in the run: validation split '
            f"<b>{esc(d.val_split)}</b> evaluated by the report ({len(val)} images).</p>"
        )
        rel = "assets/eval/report"
        csv_path = src / "per_class_iou.csv"
    else:
        reason = why or "evaluation was not requested"
        return (
            f'<p class="note">No evaluation found in {esc(run.eval.as_posix())} and none computed: '
            f'{esc(reason)}. Run <span class="mono">scaleprotoseg evaluate RUN</span>.</p>'
        )
    body = [intro, _eval_tables(metrics, csv_path, names)]
    figs, links = [], []
    inside = src.is_relative_to(out)  # computed here: already in the report
    for f in sorted(src.iterdir()):
        suffix = f.suffix.lower()
        if suffix not in (".png", ".csv", ".json") or not f.is_file():
            continue
        r = f"{rel}/{f.name}" if inside else _copy(f, out, f"{rel}/{f.name}", run.root)
        if suffix == ".png":
            figs.append(figure(r, f.stem.replace("_", " "), cls="medium"))
        else:
            links.append(f'<a href="{esc(r)}">{esc(f.name)}</a>')
    if figs:
        body.append(f'<div class="figs">{"".join(figs)}</div>')
    if links:
        body.append(f"<p>Files: {' · '.join(links)}</p>")
    return "".join(body)


def _analysis(run: RunDir, out: Path) -> str:
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
        body.append(f"<h3>{esc(j.stem.replace('_', ' '))}</h3>")
        links = [_copy(j, out, f"assets/analysis/{j.name}", run.root)]
        links += [_copy(c, out, f"assets/analysis/{c.name}", run.root) for c in sorted(adir.glob(f"{j.stem}*.csv"))]
        body.append("<p>" + " · ".join(f'<a href="{esc(r)}">{esc(Path(r).name)}</a>' for r in links) + "</p>")
        body.append(render_json(data) if data is not None else f'<p class="note">{esc(j.name)} is not valid JSON</p>')
        mine = [p for p in pngs if p.stem == j.stem or p.stem.startswith(j.stem + "_") or p.parent.name == j.stem]
        if mine:
            figs = [
                figure(
                    _copy(p, out, f"assets/analysis/{p.relative_to(adir).as_posix()}", run.root), p.stem, cls="medium"
                )
                for p in mine
            ]
            body.append(f'<div class="figs">{"".join(figs)}</div>')
            shown.update(mine)
    rest = [p for p in pngs if p not in shown]
    if rest:
        body.append("<h3>Figures</h3>")
        figs = [
            figure(_copy(p, out, f"assets/analysis/{p.relative_to(adir).as_posix()}", run.root), p.stem, cls="medium")
            for p in rest
        ]
        body.append(f'<div class="figs">{"".join(figs)}</div>')
    return "".join(body)


def _prototypes(run: RunDir, predictor: Any, out: Path) -> str:
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
            parts.append(table(["group", "h_group", "prototypes", "members (patch, scale, weight)"], rows))
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
            parts.append(table(["prototype", "h_proto", "patch", "source (training sample, cell)"], rows))
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
            + figure(graph.relative_to(out).as_posix(), f"group graph of {name}", cls="medium")
            + "</div>"
        )
        n_used = len(s.used_prototypes())
        head_line = f"{swatch}</span>{esc(name)} — {len(s.prototypes)} prototypes, {n_used} used" + (
            f", {len(s.groups)} groups" if s.grouped else ""
        )
        body.append(f"<details{' open' if open_all else ''}><summary>{head_line}</summary>{''.join(parts)}</details>")
    return "".join(body)


def _sample_html(man: dict[str, Any], rel: str, names: list[str]) -> str:
    def link(f: str) -> str:
        return f"{rel}/{f}"

    parts = [f"<h3>{esc(man.get('name') or rel)}</h3>"]
    files = man.get("files", {})
    figs = (
        [figure(link(files["summary"]), "image, prediction and ground truth", cls="medium")]
        if "summary" in files
        else []
    )
    parts.append(f'<div class="figs">{"".join(figs)}</div>')
    parts.append(f'<p><a href="{esc(link("manifest.json"))}">manifest.json</a> (every figure of this image)</p>')
    for note in man.get("notes", []):
        parts.append(f'<p class="note">{esc(note)}</p>')
    fail = man.get("failure")
    if fail:
        iou = fail.get("iou", {})
        present = [[k, "–" if v is None else f"{100 * v:.1f}"] for k, v in iou.items() if v is not None]
        if present:
            parts.append(f"<h4>IoU on this image (failure threshold {100 * fail['threshold']:.0f} %)</h4>")
            parts.append(table(["class", "IoU (%)"], present))
        for case in fail.get("cases", []):
            taken = ", ".join(f"{names[t['class']]} {100 * t['fraction']:.0f} %" for t in case.get("taken_by", [])[:4])
            parts.append(
                f"<h4>Failure: {esc(case['name'])} (IoU {fmt(case['iou'], 2)}), predicted as {esc(taken or '–')}</h4>"
            )
            figs = [figure(link(f), k.replace("_", " "), cls="small") for k, f in case.get("files", {}).items()]
            parts.append(f'<div class="figs">{"".join(figs)}</div>')
    for c in man.get("classes", []):
        parts.append(f"<h4>{esc(c['name'])}{'' if c.get('present', True) else ' (not predicted)'}</h4>")
        figs = []
        for view, v in c.get("views", {}).items():
            for f in v.get("files", []):
                figs.append(figure(link(f), f"{view.replace('_', ' ')}: {Path(f).stem.replace('_', ' ')}", cls="small"))
        missing = [
            f"{k.replace('_', ' ')} ({v.get('reason', 'not available')})"
            for k, v in c.get("views", {}).items()
            if not v.get("available")
        ]
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
        if missing:
            parts.append(f'<p class="note">Not shown: {esc("; ".join(missing))}</p>')
    return "".join(parts)


def _samples(
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
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def _edits(run: RunDir, split: str) -> str | None:
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
        if after is None:
            effect = f"not evaluated (scaleprotoseg evaluate RUN --stage {e.stage})"
        else:
            effect = f"mIoU {100 * after:.2f}" + ("" if before is None else f" ({100 * (after - before):+.2f})")
        if e.effect and "changed_fraction" in e.effect:
            effect += f"; {100 * e.effect['changed_fraction']:.2f}% of {e.effect.get('image', 'the image')} changed"
        cells = [e.stage, e.base, removed, e.author, e.reason, e.created, effect]
        rows.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("stage", "from", "removed", "by", "why", "when", f"effect ({split})"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


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
    explain instead. ``evaluate_missing``: compute a validation evaluation when ``RUN/eval`` has none.
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
        ("summary", "Run summary", _summary(run, predictor, out)),
        ("evaluation", "Evaluation", _evaluation(run, predictor, out, evaluate_missing, val, why)),
        ("analysis", "Interpretability analyses", _analysis(run, out)),
        ("prototypes", "Prototypes and groups", _prototypes(run, predictor, out)),
        ("samples", "Explained images", _samples(run, predictor, out, images, inputs, val, why)),
    ]
    edits = _edits(run, predictor.cfg.data.val_split)
    if edits is not None:
        sections.insert(4, ("edits", "Expert edits", edits))
    title = f"scaleprotoseg report: {run.root.resolve().name}"
    subtitle = (
        f"{predictor.info.method} · {predictor.cfg.model.backbone} · {predictor.cfg.data.name} · "
        f"generated {time.strftime('%Y-%m-%d %H:%M')}"
    )
    index = out / "index.html"
    from scaleprotoseg.data.io import printable

    index.write_text(printable(page(title, subtitle, sections)), encoding="utf-8")  # names from any file system
    return index
