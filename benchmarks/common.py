"""Shared helpers of the benchmark scripts: arguments, machine description, timing, peak memory, tables, JSON.

Timing: ``fn`` is called ``warmup`` times, then ``repeats`` times; each call is timed with ``time.perf_counter``
(after ``torch.cuda.synchronize`` on GPU) and the median is reported with min/max.

Peak memory:
- GPU: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats`` (tensors only).
- CPU: process resident set size (RSS). The kernel's own high-water mark ``VmHWM`` of ``/proc/self/status`` is reset
  by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) before the measured code and read after it; where that
  is not allowed, a thread samples ``VmRSS`` every millisecond. Before the measured call the garbage collector runs
  and glibc's ``malloc_trim(0)`` hands freed heap pages back to the kernel, so that memory kept by the allocator from
  earlier work does not hide the call's own needs. The method used is written into every result (``memory_method``).
  ``peak_mb`` is the absolute peak, ``delta_mb`` the peak minus the RSS just before the call (what the call itself
  allocated on top of what was already resident: weights, inputs, the Python runtime).

:func:`measure` takes the memory on one call (the last warm-up call) and the times on the following ``repeats``.

Threads: ``--threads`` sets torch's CPU threads (default: torch's choice, the number of cores). On a small machine that
runs anything else, OpenMP's default active waiting makes 2 threads on 2 cores several times slower than 1 thread:
``run_all.py`` and ``quality.py`` set ``OMP_WAIT_POLICY=PASSIVE`` (unless set); set it yourself when running a script
alone, or pass ``--threads 1``. The policy in force is recorded in the JSON (``machine.omp_wait_policy``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench-results"


# ----------------------------------------------------------------------------------------------------------------
# Arguments and machine


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int, warmup: int = 1) -> None:
    """``--quick``, ``--device``, ``--repeats``, ``--warmup``, ``--threads``, ``--out``, ``--seed``."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test); numbers are meaningless")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed calls per measurement (default {repeats})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed calls first (default {warmup})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON results")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(_default_repeats=repeats, _default_warmup=warmup)


def finish_args(args: argparse.Namespace, *, quick_repeats: int = 1, quick_warmup: int = 1) -> argparse.Namespace:
    """Fill in repeats/warm-up (quick mode: ``quick_*``), set threads and the seed, resolve the device."""
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else args._default_repeats
    if args.warmup is None:
        args.warmup = quick_warmup if args.quick else args._default_warmup
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats {args.repeats} / --warmup {args.warmup}; expected repeats >= 1, warmup >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    return args


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu", argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads, versions, device, date and the command line."""
    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB (``VmRSS``; ``ru_maxrss`` where /proc is missing)."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


def release_free_memory() -> bool:
    """``gc.collect()`` and glibc ``malloc_trim(0)``: give freed heap memory back to the kernel. False off glibc."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it; read ``result()`` afterwards."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.method = ""
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        trimmed = release_free_memory()
        self.start_mb = rss_mb()
        self.peak_mb = self.start_mb
        note = ", after malloc_trim" if trimmed else ""
        if _reset_hwm():
            self.method = f"cpu RSS high-water mark (VmHWM after /proc/self/clear_refs{note})"
        else:
            self.method = f"cpu RSS sampled every 1 ms (VmRSS{note})"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            hwm = _status_kb("VmHWM")
            self.peak_mb = max(self.peak_mb, (hwm or 0) / 1024.0)
        self.peak_mb = max(self.peak_mb, rss_mb())

    def result(self) -> dict[str, Any]:
        return {
            "peak_mb": round(self.peak_mb, 1),
            "delta_mb": round(self.peak_mb - self.start_mb, 1),
            "memory_method": self.method,
        }


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median / min / max seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return _summary(times, repeats, warmup)


def _summary(times: list[float], repeats: int, warmup: int) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "warmup": warmup,
        "times_s": [round(t, 6) for t in times],
    }


def ratio_spread(num: dict[str, Any], den: dict[str, Any]) -> str:
    """The interquartile range of the per-round ratios ``num / den`` of two interleaved measurements ("q25-q75"), the
    spread that goes with the ratio of their medians."""
    ratios = sorted(a / b for a, b in zip(num["times_s"], den["times_s"]) if b > 0)
    if not ratios:
        return "-"
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{q[0]:.3f}-{q[2]:.3f}"


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """:func:`measure` for several functions whose times are compared: the memory call and warm-up of each first,
    then the timed calls in rounds (one call of each per round), so that a change of machine load during the run
    affects all of them alike and their ratios stay meaningful."""
    out: dict[str, dict[str, Any]] = {}
    mems: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        for _ in range(max(warmup - 1, 0)):
            fn()
        with PeakMemory(device) as mem:
            fn()
        mems[name] = mem.result()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name in fns:
        out[name] = {**_summary(times[name], repeats, max(warmup, 1)), **mems[name], "interleaved": True}
    return out


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Peak memory of one call (the last warm-up call; one is made even when ``warmup`` is 0), then
    :func:`time_calls` on ``repeats`` more calls."""
    for _ in range(max(warmup - 1, 0)):
        fn()
    with PeakMemory(device) as mem:
        fn()
    sync(device)
    timing = time_calls(fn, device, repeats, 0)
    timing["warmup"] = max(warmup, 1)
    return {**timing, **mem.result()}


# ----------------------------------------------------------------------------------------------------------------
# Output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through :func:`fmt`."""
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT MET")


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<name>.json`` (folders created) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path | torch.device):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def report(
    name: str, title: str, tables: Sequence[str], payload: dict[str, Any], args: argparse.Namespace, argv: Any
) -> dict[str, Any]:
    """Print ``title`` and the tables, add machine info and the rendered tables to ``payload`` and write it."""
    text = f"## {title}\n\n" + "\n\n".join(tables)
    print(text, flush=True)
    payload = {
        "benchmark": name,
        "title": title,
        "quick": bool(args.quick),
        "machine": machine_info(args.device, argv),
        **payload,
        "table": text,
    }
    path = write_json(args.out, name, payload)
    print(f"\nwrote {path}", flush=True)
    payload["json_path"] = str(path)
    return payload


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data


def blob_labels(
    batch: int,
    height: int,
    width: int,
    num_classes: int,
    present: tuple[int, int],
    *,
    generator: torch.Generator,
    ignore_index: int = 255,
    ignore_fraction: float = 0.05,
) -> torch.Tensor:
    """(B, H, W) int64 label maps made of blobs, like real scenes: each image holds between ``present[0]`` and
    ``present[1]`` classes, each one or more Voronoi cells around random seeds (two seeds per class on average),
    plus a disc of ``ignore_index`` covering about ``ignore_fraction`` of the image."""
    g = generator
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    out = torch.empty(batch, height, width, dtype=torch.long)
    for b in range(batch):
        lo, hi = min(present[0], num_classes), min(present[1], num_classes)
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        classes = torch.randperm(num_classes, generator=g)[:k]
        seed_cls = torch.cat([classes, classes[torch.randint(0, k, (k,), generator=g)]])
        sy = torch.rand(len(seed_cls), generator=g) * height
        sx = torch.rand(len(seed_cls), generator=g) * width
        d2 = (yy.unsqueeze(0) - sy.view(-1, 1, 1)) ** 2 + (xx.unsqueeze(0) - sx.view(-1, 1, 1)) ** 2
        lab = seed_cls[d2.argmin(0)]
        if ignore_fraction > 0:
            r2 = ignore_fraction * height * width / torch.pi
            cy, cx = float(torch.rand(1, generator=g)) * height, float(torch.rand(1, generator=g)) * width
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r2] = ignore_index
        out[b] = lab
    return out


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> (512, 1024)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size {text!r}; expected HEIGHTxWIDTH, e.g. 512x1024") from err
    return h, w


def parse_list(text: str, kind: type = str) -> list[Any]:
    """``"a,b"`` -> ["a", "b"] (converted with ``kind``)."""
    return [kind(v.strip()) for v in text.split(",") if v.strip()]
