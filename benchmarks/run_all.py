"""Run the six speed/memory benchmarks (``make bench``) and print all their tables together at the end.

1. ``bench_inference.py``: time per image and peak memory of the three systems; the head alone vs the per-class loop.
2. ``bench_train_step.py``: stage 1 / stage 2 step time against a DeepLabv2 step.
3. ``bench_diversity.py``: vectorised diversity loss vs the naive loop.
4. ``bench_projection.py``: projection throughput and memory against the number of images.
5. ``bench_explore.py``: response times of ``scaleprotoseg explore`` (open an image, click, switch a prototype off).
6. ``bench_predict_large.py``: peak memory and time of ``Predictor.predict`` on a 6000 x 6000 image (tiled).

Each runs in its own process (clean memory measurements) with ``--quick``, ``--device``, ``--threads`` and ``--out``
passed through and ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (on a 2-core machine, OpenMP's active
waiting makes 2 threads several times slower than 1 as soon as anything else runs). Each writes its JSON into
``--out`` (default ``bench-results/``); the tables are read back from those files. ``--only`` picks some of them
(e.g. ``--only diversity,projection``). A summary of every target is printed last and written to
``<out>/summary.md``. On the 2-core CPU the full run takes about 20-35 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import DEFAULT_OUT, markdown_table, verdict

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # name: (script, JSON file)
    "inference": ("bench_inference.py", "inference.json"),
    "train_step": ("bench_train_step.py", "train_step.json"),
    "diversity": ("bench_diversity.py", "diversity.json"),
    "projection": ("bench_projection.py", "projection.json"),
    "explore": ("bench_explore.py", "explore.json"),
    "predict_large": ("bench_predict_large.py", "predict_large.json"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes in every benchmark (smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown {unknown}; expected any of {', '.join(BENCHMARKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results: dict[str, Any] = {}
    failed: list[str] = []
    durations: dict[str, float] = {}
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in args.only:
        script, json_name = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), "--device", args.device, "--out", str(args.out)]
        cmd += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        print(f"\n>>> {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env)
        durations[name] = time.perf_counter() - t0
        path = Path(args.out) / json_name
        if proc.returncode != 0 or not path.is_file():
            failed.append(name)
            continue
        results[name] = json.loads(path.read_text())
    rows = []
    for name, res in results.items():
        for t in res.get("targets", []):
            rows.append([name, t["target"], t.get("value"), verdict(t.get("met"))])
    parts = [results[n]["table"] for n in args.only if n in results]
    parts.append("## Targets\n\n" + markdown_table(["benchmark", "target", "value", "verdict"], rows))
    parts.append(
        "## Durations\n\n" + markdown_table(["benchmark", "seconds"], [[n, round(s, 1)] for n, s in durations.items()])
    )
    text = "\n\n".join(parts)
    print("\n\n# All benchmark tables\n\n" + text, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr, flush=True)
    return {"results": results, "failed": failed, "durations": durations, "text": text}


if __name__ == "__main__":
    out = main(sys.argv[1:])
    sys.exit(1 if out["failed"] else 0)
