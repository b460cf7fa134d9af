"""What every benchmark shares: the record of results, chart names, table formatting and timers.

Every run appends one line to bench/results.jsonl (`append_record`): its kind, the exact command,
date, device, host, versions and its numbers. Charts show the latest run of each kind and workload
(`chart_path`); a run on a CPU names its charts apart (`-cpu`), so it never replaces a GPU chart.
"""

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
RECORD = Path(__file__).resolve().parent / "results.jsonl"


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

    argv = list(sys.argv)
    script = Path(argv[0]) if argv else Path()
    if script.parent.name == "bench" and script.suffix == ".py":  # run as python -m bench.<name>
        argv[:1] = ["-m", f"bench.{script.stem}"]
    env = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
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


def record_head(kind: str) -> dict:
    """The fields every line of the record starts with: what ran, when, where, with what."""
    env = environment()
    return {
        "kind": kind,
        "date": env["date"],
        "command": env["command"],
        "device": env["device"],
        "hostname": platform.node(),
        "versions": {k: env[k] for k in ("python", "vllm", "torch", "triton")},
    }


def append_record(kind: str, payload: dict, path: str | Path = RECORD) -> dict:
    """Append one line to the record (bench/results.jsonl): `record_head(kind)` and then `payload`,
    whose keys win (a run that kept its own head, or one imported from elsewhere). Returns the line."""
    line = {**record_head(kind), **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line, separators=(",", ":")) + "\n")
    return line


def read_record(path: str | Path = RECORD) -> list[dict]:
    """Every line of the record, oldest first."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def chart_path(kind: str, what: str, device: str | None = None) -> Path:
    """bench/results/<kind>-<what>.png; `-cpu.png` for a run on a CPU (`device` as recorded)."""
    on_cpu = (device or environment()["device"]).startswith("cpu")
    return RESULTS / f"{kind}-{what}{'-cpu' if on_cpu else ''}.png"


def write_json(payload: dict, out: str | Path) -> Path:
    """A run's whole result as one JSON file (`--out`), instead of a line of the record."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save_run(kind: str, payload: dict, out: str | Path | None = None) -> Path:
    """A benchmark's result: one line appended to the record, or, with `out`, the same line as a
    JSON file of its own (tests and one-off runs keep the record clean). Returns where it went."""
    if out:
        return write_json({**record_head(kind), **payload}, out)
    append_record(kind, payload)
    return RECORD


def chart_beside(out: str | Path | None, kind: str, what: str) -> Path:
    """Where a run's chart goes: next to its `--out` file, else the latest chart of its kind."""
    return Path(out).with_suffix(".png") if out else chart_path(kind, what)


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
        return sig3(v)
    return str(v)


def sig3(v: float) -> str:
    """Three significant digits, without an exponent between 1e-3 and 1e6: 1234.5 -> '1,230'."""
    if v != v:  # nan
        return "-"
    if v == 0 or not 1e-3 <= abs(v) < 1e6:
        return f"{v:.3g}"
    r = float(f"{v:.3g}")
    return f"{r:,.0f}" if abs(r) >= 100 else f"{r:.3g}"


def size(nbytes: float) -> str:
    """Bytes as the largest binary unit that keeps the number >= 1: 8388608 -> '8 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{sig3(float(nbytes))} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
