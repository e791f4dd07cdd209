"""Quality at equal budget: DeepLabv2, ProtoSeg and ScaleProtoSeg trained on the real sample sets, several seeds.

For each set and method, ``configs/samples/<set>_<method>.yaml`` is trained with the library's trainer
(``Trainer(cfg, run_dir).run_stages()``) once per seed (``--set train.seed=S``), each run in its own folder
``bench-results/quality/<set>/<method>/seed<S>/``. All three methods share the CPU budget of ``configs/samples``
(EfficientNet-Lite0 with the packaged ImageNet weights, 128-pixel crops, batch 4; 340 steps with the backbone
trainable for each method, then the interpretable methods' own extra stages). Reported per (set, method): validation
mIoU mean and sample std over the seeds (the final stage's whole-image validation), train mIoU (``scaleprotoseg
evaluate RUN --split train``), which baselines the mean beats, prototypes after projection (after duplicate removal)
and after grouping + thresholding (ScaleProtoSeg: ``prototypes_used``) or after pruning (ProtoSeg), both from the
``stage_end`` records of ``metrics.jsonl``, and the sparsity score of Tables 3-4 (active prototypes per class with
|last-layer weight| >= 0.005, from the final checkpoint via ``checkpoint.load_model``). A first table gives the
baselines of each set on the same validation split (majority class, Otsu threshold, and the pixel forest when
scikit-learn is installed), computed by ``scaleprotoseg evaluate --forest`` beside the last run of the set.

Budget (2-core CPU): one seed of nuclei took 5-10 min for DeepLabv2, 9-10 min for ProtoSeg and 8-12 min for
ScaleProtoSeg while other training jobs shared the two cores (about half that alone), so the default ``--sets nuclei
--seeds 0,1,2`` takes about an hour on a busy machine and well under one on an idle one. Invocations run in parallel
need one ``--out`` each (the set snapshot and ``quality.json`` live there); ``--merge A.json B.json`` then writes one
report of all their runs (the longest invocation's wall time counts against the target). ``OMP_WAIT_POLICY=PASSIVE``
is set unless the environment sets it (see ``common.py``); on a busy machine ``--threads 1`` is as fast. ``--quick``
runs 2 steps per training stage on 4 images (a smoke test: the numbers mean nothing; no forest, no train mIoU). If
``data/samples/<set>`` is missing, it is built first with ``python -m scaleprotoseg data samples``; each invocation
trains on a copy of the set made under ``<out>/quality/data/`` so that rebuilding the sample sets meanwhile cannot
break the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: with the default (active) wait policy, 2 OpenMP threads on a 2-core machine that runs
# anything else at the same time can be several times slower than 1 thread; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import REPO, finish_args, markdown_table, parse_list, report, verdict  # noqa: E402

from scaleprotoseg.evaluation.baselines import FOREST, MAJORITY, OTSU, forest_available  # noqa: E402

METHODS = ("deeplabv2", "protoseg", "scaleprotoseg")
SPARSITY_THRESHOLD = 0.005


def ensure_samples(samples: Path, name: str, snapshot: Path | None = None) -> Path:
    """``<samples>/<name>``, built with ``scaleprotoseg data samples`` when missing; with ``snapshot``, a copy made
    there first (so that rebuilding the sample sets during the long run cannot pull files from under it)."""
    root = samples / name
    if not (root / "splits").is_dir():
        print(f"building the sample set {name!r} into {samples} ...", flush=True)
        cmd = [sys.executable, "-m", "scaleprotoseg", "data", "samples", "--out", str(samples), "--only", name]
        subprocess.run(cmd, check=True, cwd=REPO)
    if not (root / "splits").is_dir():
        raise FileNotFoundError(f"sample set {root} is missing after `scaleprotoseg data samples`")
    if snapshot is None:
        return root
    copy = snapshot / name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(root, copy)
    return copy


def overrides_for(config: Path, data_root: Path, seed: int, quick: bool) -> list[str]:
    from scaleprotoseg.config import load_config

    sets = [f"data.root={data_root}", f"train.seed={seed}", "train.device=cpu", "train.tensorboard=false"]
    if quick:
        cfg = load_config(config)
        sets += [f"train.stages.{n}.steps=2" for n, s in cfg.train.stages.items() if s.kind == "train"]
        sets += ["data.max_train_samples=4", "data.max_val_samples=4"]
    return sets


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from scaleprotoseg.rundir import RunDir

    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sparsity(run_dir: Path) -> float | None:
    """Active prototypes per class (|last-layer weight| >= 0.005) of the final model; None for DeepLabv2."""
    from scaleprotoseg.analysis.sparsity import active_prototypes_per_class
    from scaleprotoseg.checkpoint import load_model
    from scaleprotoseg.models.segmenter import prototype_head

    model = load_model(run_dir, device="cpu").model
    head = prototype_head(model)
    if head is None:
        return None
    if head.grouping is not None:
        dense = head.grouping.dense_weight(head.num_prototypes)
        return active_prototypes_per_class(head.h_group.detach(), SPARSITY_THRESHOLD, group_prototype_weights=dense)
    return active_prototypes_per_class(head.h_proto.detach(), SPARSITY_THRESHOLD)


def evaluate_split(run_dir: Path, split: str, *extra: str) -> dict[str, Any]:
    """``scaleprotoseg evaluate RUN --split SPLIT`` (the command users run); its ``summary.json``."""
    from scaleprotoseg.rundir import RunDir

    out = RunDir(run_dir).eval_dir(None, split)
    cmd = [sys.executable, "-m", "scaleprotoseg", "evaluate", str(run_dir), "--split", split, "--out", str(out)]
    subprocess.run([*cmd, "--no-progress", "--device", "cpu", *extra], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def set_baselines(run_dir: Path, forest: bool) -> dict[str, float]:
    """Validation mIoU of the baselines (majority class, Otsu threshold, and the pixel forest when scikit-learn is
    installed) on the split the runs of this set are validated on, computed by ``evaluate`` beside ``run_dir``."""
    summary = evaluate_split(run_dir, "val", *(["--forest"] if forest else []))
    return {name: float(v) for name, v in summary.get("baselines", {}).items() if v is not None}


def train_one(args: argparse.Namespace, set_name: str, method: str, seed: int, data_root: Path) -> dict[str, Any]:
    from scaleprotoseg.config import load_config
    from scaleprotoseg.engine.trainer import Trainer

    config = REPO / "configs" / "samples" / f"{set_name}_{method}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"config {config} does not exist; expected configs/samples/<set>_<method>.yaml")
    run_dir = args.out / "quality" / set_name / method / f"seed{seed}"
    sets = overrides_for(config, data_root, seed, args.quick)
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    finished_before = (run_dir / "final").is_dir()  # resumed and already complete: its training time is not known
    cfg = load_config(config, sets)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, device=str(args.device), progress=False)
    trainer.run_stages(argv=["quality.py", "-c", str(config), *(f"--set {s}" for s in sets)])
    seconds = time.perf_counter() - t0
    records = read_metrics(run_dir)
    ends = {r["stage"]: r for r in records if r.get("event") == "stage_end"}
    last = ends[trainer.stage_names()[-1]]
    steps = sum(s.steps for s in cfg.train.stages.values() if s.enabled and s.kind == "train")
    proj = next((r for r in ends.values() if r.get("kind") == "projection"), None)
    after = None
    if "threshold" in ends:
        after = ends["threshold"].get("prototypes_used")
    elif "pruning" in ends:
        after = ends["pruning"].get("prototypes_after")
    train_miou = None if args.quick else evaluate_split(run_dir, "train", "--no-baselines")["miou"]
    row = {
        "set": set_name,
        "method": method,
        "seed": seed,
        "run_dir": str(run_dir),
        "val_miou": last.get("val_miou"),
        "train_miou": train_miou,
        "val_miou_per_stage": {name: r.get("val_miou") for name, r in ends.items()},
        "prototypes_initial": proj.get("prototypes_before") if proj else None,
        "prototypes_after_projection": proj.get("prototypes_after") if proj else None,
        "prototypes_after_grouping_or_pruning": after,
        "sparsity": sparsity(run_dir),
        "train_steps": steps,
        "seconds": None if finished_before else seconds,
        "seconds_per_step": None if finished_before else seconds / max(steps, 1),
    }
    per_step = row["seconds_per_step"]
    timing = (
        "trained earlier"
        if per_step is None
        else f"{seconds:.0f} s ({per_step:.2f} s/step incl. projection and validation)"
    )
    print(f"  {set_name:<8} {method:<13} seed {seed}: mIoU {row['val_miou']:.4f}  {timing}", flush=True)
    return row


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["set"], r["method"]) for r in runs}, key=lambda k: (k[0], METHODS.index(k[1])))
    for set_name, method in keys:
        rs = [r for r in runs if r["set"] == set_name and r["method"] == method]
        row: dict[str, Any] = {"set": set_name, "method": method, "seeds": [r["seed"] for r in rs]}
        keys = ("val_miou", "train_miou", "prototypes_after_projection", "prototypes_after_grouping_or_pruning")
        for key in (*keys, "sparsity"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in rs])
        known = [r["seconds"] for r in rs if r.get("seconds") is not None]
        row["seconds_total"] = sum(known) if len(known) == len(rs) else None
        out.append(row)
    return out


def _pm(mean: float | None, std: float | None, digits: int = 2, scale: float = 1.0) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


def _beaten(miou: float | None, baselines: dict[str, float]) -> str:
    """The baselines the mean val mIoU beats, and those it does not ('not ...')."""
    if miou is None or not baselines:
        return "-"
    lost = [n for n, v in baselines.items() if miou <= v]
    return "all" if not lost else "not " + ", ".join(lost)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", type=parse_list, default=["nuclei"], help="sample sets (default nuclei; also brain, ...)")
    p.add_argument("--seeds", type=lambda s: parse_list(s, int), default=[0, 1, 2])
    p.add_argument("--methods", type=parse_list, default=list(METHODS))
    p.add_argument("--quick", action="store_true", help="2 steps per training stage on 4 images (smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--samples", type=Path, default=REPO / "data" / "samples", help="where the sample sets live")
    p.add_argument("--out", type=Path, default=REPO / "bench-results")
    p.add_argument("--resume", action="store_true", help="keep existing run folders (finished stages are skipped)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="train nothing: combine the runs of earlier quality.json files (invocations run in parallel,\n"
        "each with its own --out); a later file wins for the same set, method and seed",
    )
    p.set_defaults(repeats=1, warmup=0, seed=0, _default_repeats=1, _default_warmup=0)
    args = finish_args(p.parse_args(argv))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected any of {', '.join(METHODS)}")
    return args


def merge_payloads(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], float, bool]:
    """Runs (a later file wins per set, method and seed), baselines, the longest wall time and the quick flag of
    several quality.json files."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    baselines: dict[str, dict[str, float]] = {}
    seconds, quick = 0.0, False
    for path in paths:
        payload = json.loads(Path(path).read_text())
        if payload.get("benchmark") != "quality":
            raise ValueError(f"--merge: {str(path)!r} is not a quality.json (benchmark {payload.get('benchmark')!r})")
        runs.update({(r["set"], r["method"], int(r["seed"])): r for r in payload["runs"]})
        for set_name, values in payload["baselines"].items():
            baselines.setdefault(set_name, {}).update(values)
        seconds, quick = max(seconds, float(payload["total_seconds"])), quick or bool(payload["quick"])
    ordered = sorted(runs.values(), key=lambda r: (r["set"], METHODS.index(r["method"]), r["seed"]))
    return ordered, baselines, seconds, quick


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out = Path(args.out).resolve()
    t0 = time.perf_counter()
    runs = []
    baselines: dict[str, dict[str, float]] = {}
    merged_seconds = None
    if args.merge:
        runs, baselines, merged_seconds, args.quick = merge_payloads(args.merge)
        args.sets = sorted({r["set"] for r in runs})
        args.seeds = sorted({r["seed"] for r in runs})
        args.methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    else:
        for set_name in args.sets:
            data_root = ensure_samples(Path(args.samples).resolve(), set_name, args.out / "quality" / "data")
            for method in args.methods:
                for seed in args.seeds:
                    runs.append(train_one(args, set_name, method, seed, data_root))
            forest = forest_available() and not args.quick
            baselines[set_name] = set_baselines(Path(runs[-1]["run_dir"]), forest=forest)
    summary = summarise(runs)
    names = [n for n in (MAJORITY, OTSU, FOREST) if any(n in b for b in baselines.values())]
    baseline_table = markdown_table(
        ["set (val split)", *names],
        [[name, *(f"{100 * b[n]:.2f}" if n in b else "-" for n in names)] for name, b in baselines.items()],
    )
    table = markdown_table(
        [
            "set",
            "method",
            "seeds",
            "val mIoU (%)",
            "train mIoU (%)",
            "beats",
            "prototypes after projection",
            "after grouping / pruning",
            "sparsity (active / class)",
            "train time s",
        ],
        [
            [
                s["set"],
                s["method"],
                len(s["seeds"]),
                _pm(s["val_miou_mean"], s["val_miou_std"], 2, 100.0),
                _pm(s["train_miou_mean"], s["train_miou_std"], 2, 100.0),
                _beaten(s["val_miou_mean"], baselines.get(s["set"], {})),
                _pm(s["prototypes_after_projection_mean"], s["prototypes_after_projection_std"], 1),
                _pm(s["prototypes_after_grouping_or_pruning_mean"], s["prototypes_after_grouping_or_pruning_std"], 1),
                _pm(s["sparsity_mean"], s["sparsity_std"], 2),
                "-" if s["seconds_total"] is None else round(s["seconds_total"]),
            ]
            for s in summary
        ],
    )
    minutes = (merged_seconds if merged_seconds is not None else time.perf_counter() - t0) / 60.0
    targets = [{"target": "finishes in under 60 minutes", "value": minutes, "met": bool(minutes < 60.0)}]
    target_table = markdown_table(
        ["target", "value (min)", "verdict"], [[t["target"], t["value"], verdict(t["met"])] for t in targets]
    )
    payload = {
        "settings": {
            "sets": args.sets,
            "seeds": args.seeds,
            "methods": args.methods,
            "configs": "configs/samples/<set>_<method>.yaml",
            "torch_threads": torch.get_num_threads(),
            **({"merged_from": [str(p) for p in args.merge]} if args.merge else {}),
        },
        "runs": runs,
        "summary": summary,
        "baselines": baselines,
        "total_seconds": minutes * 60.0,
        "targets": targets,
    }
    title = "Quality at equal budget on the sample sets" + (" (quick: numbers mean nothing)" if args.quick else "")
    return report("quality", title, [baseline_table, table, target_table], payload, args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
