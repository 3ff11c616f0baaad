"""Shared benchmark helpers: mode selection, timing, peak memory, and the JSON result writer.

Two modes, always labelled in the output:
  * ``gpu``: CUDA present. Kernels compiled; timings are the median of ``triton.testing.do_bench``
    (warm-up, then repeated runs, L2 flushed between runs) and memory is
    ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
  * ``cpu-smoke``: no CUDA. Triton kernels run through the interpreter (``TRITON_INTERPRET=1``,
    set here before triton is imported) at tiny sizes to prove the script and the kernels run
    and agree with the reference. Interpreter timings say nothing about GPU speed and peak memory
    is not measured (there is no CPU equivalent of ``max_memory_allocated``): both are reported
    as such, never as a speed-up.

Results: ``benchmarks/results/<name>-<device>-<date>.json`` holding ``meta`` (device, date, git
commit, versions, mode, command line) and one ``rows`` entry per measured configuration, plus a
plot of the same stem (``.png``, ``save_plot``). ``benchmarks/report.py`` turns the latest result
per benchmark and device into ``benchmarks/README.md``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first triton import (kernels are also lazily jitted)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
MODE = "gpu" if HAS_CUDA else "cpu-smoke"
SMOKE_NOTE = ("cpu-smoke: Triton kernels run in the interpreter (TRITON_INTERPRET=1) at tiny sizes; "
              "timings are NOT indicative of GPU performance and peak memory is not measured")


def device_name() -> str:
    """The CUDA device's name, or ``CPU <model>``."""
    if HAS_CUDA:
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def device_slug() -> str:
    """The device name as a file-name slug."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-").lower() or "cpu"


def git_commit() -> str:
    """HEAD's commit, ``-dirty`` when imagebert_ds/kernels/ or benchmarks/ have uncommitted changes."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "imagebert_ds/kernels",
                                 "benchmarks"], cwd=REPO, stderr=subprocess.DEVNULL) != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    """Versions of python, torch, CUDA, cuDNN and triton for the results JSON."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if HAS_CUDA else None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def bench_ms(fn: Callable[[], object], grad_to_none=None, smoke_reps: int = 2) -> float:
    """Median milliseconds per call of ``fn``."""
    if HAS_CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up (also the interpreter's first-call rewrite)
    times = []
    for _ in range(smoke_reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak CUDA memory allocated by ``fn`` above what was allocated before it, in MiB; None on CPU."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def write_results(name: str, rows: list, extra_meta: Optional[dict] = None,
                  out_dir: Optional[Path] = None) -> Path:
    """Write ``rows`` with device, date, commit and versions as JSON under the results folder;
    returns the path."""
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "benchmark": name,
        "mode": MODE,
        "note": None if HAS_CUDA else SMOKE_NOTE,
        "device": device_name(),
        "date": now.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "versions": versions(),
        "argv": sys.argv,
    }
    meta.update(extra_meta or {})
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_slug()}-{now.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path


def save_plot(json_path: Path, title: str, draw: Callable[[object], None]) -> Path:
    """Draw one figure with ``draw(ax)`` and save it next to ``json_path`` (same stem, ``.png``),
    titled with the device and mode; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        draw(ax)
        ax.set_title(f"{title}\n{device_name()} ({MODE})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        png = Path(json_path).with_suffix(".png")
        fig.savefig(png, dpi=100)
    finally:
        plt.close(fig)
    return png


def grouped_bars(ax, rows: list, group: str, series: str, value: str, ylabel: str,
                 log: bool = True) -> None:
    """Bars of ``row[value]``: one group per distinct ``row[group]`` on the x axis, one bar
    colour per distinct ``row[series]``; rows without the value (unsupported) are left out."""
    rows = [r for r in rows if r.get(value) is not None]
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, g in enumerate(groups):
            hit = [r[value] for r in rows if r[group] == g and r[series] == name]
            if hit:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(hit[0])
        ax.bar(xs, ys, width=width, label=str(name))
    ax.set_xticks(range(len(groups)), [f"{group}={g}" for g in groups], fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel + (" (log)" if log else ""))
    ax.legend(fontsize=7, ncol=2)


def print_table(rows: list, columns: list) -> None:
    """Print ``rows`` as an aligned table of ``columns``."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns] if rows else []
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def add_common_args(parser) -> None:
    """``--smoke``, ``--out-dir`` and ``--no-write``."""
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes even on a GPU (always the case without CUDA)")
