"""What every benchmark shares: the environment record, result files, and a GPU timer."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug() -> str:
    """'h100', 'h200', ... for a CUDA device; 'cpu' otherwise. Used in result file names."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "b200"):
        if tag in name:
            return tag
    return name.replace("nvidia", "").strip().split()[0]


def environment() -> dict:
    """Device, versions and the exact command, for the head of every result file."""
    import triton

    env = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except Exception:
        env["vllm"] = None
    return env


def write_result(kind: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write bench/results/<kind>-<device>-<date>.json (or `out`) and return the path."""
    path = Path(out) if out else RESULTS / f"{kind}-{device_slug()}-{_dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def time_with_setup(
    fn: Callable[[], object],
    setup: Callable[[], object],
    reps: int = 10,
    warmup: int = 2,
    device: str = "cuda",
) -> float:
    """Median seconds of `fn`, with `setup` run (untimed) before each call.

    For operations that change what they measure (inserting into an empty table): do_bench cannot
    reset state between calls. CUDA events around the call on the current stream for device
    "cuda"; wall clock for CPU work.
    """
    times = []
    for i in range(warmup + reps):
        setup()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def time_cpu(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall seconds of a CPU-side callable."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
