"""Engine comparison: this plugin against vLLM's built-in prefix caching and CPU offloading.

    python -m bench.compare --workload docqa                 # defaults for this machine
    python -m bench.compare --workload docqa chat --configs prefix ours --eager

Every config runs in its own process, one after another, with the same model, KV cache size,
workload and sampling settings; the three host tiers (built-in offloading, SimpleCPUOffload and
ours) get the same host memory. The engine core runs inside that process, where the adapter's
scheduler hooks and loading steps can be timed (`--engine-process`: in a process of its own, vLLM's
default deployment, without those timings). Defaults: on a GPU the Llama-3.1-8B shape with dummy weights, a
4 GiB KV cache, 16 GiB of host memory and vLLM's default compiled mode; on a CPU the tiny random
Llama, each config run 3 times (`--repeat`). Prints a table (the median run and the range), appends
one line per workload to bench/results.jsonl (exact command, device, versions, every number) and
refreshes the chart bench/results/compare-<workload>.png (-cpu.png on a CPU: TTFT per config per
round); every request's numbers go to bench/compare-raw/ (not tracked). For diagnosis: the headline
is `python -m bench.serve`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import workloads as W
from bench.common import RECORD, append_record, chart_path, environment, print_table, sig3, size, write_json
from bench.configs import CONFIGS, MODEL_CACHE, check_args, config_engine, engine_kwargs, parse_config
from bench.models import get_model

# ---- child: one config, one workload, one process ---------------------------------------------


def _flat_metrics(llm) -> dict:
    out = {}
    try:
        for m in llm.get_metrics():
            value = getattr(m, "value", None)
            if isinstance(value, (int, float)):
                key = m.name + (
                    ""
                    if not getattr(m, "labels", None)
                    else "{"
                    + ",".join(
                        f"{k}={v}" for k, v in sorted(m.labels.items()) if k not in ("engine", "model_name")
                    )
                    + "}"
                )
                out[key] = value
    except Exception as e:  # metrics are a bonus; never lose the timings over them
        out["error"] = repr(e)
    return out


def run_child(spec: dict) -> dict:
    # In-process engine core unless asked (`--engine-process`): only then can the adapter's hooks and
    # loading steps be timed from here. Both modes poll stores as vLLM's multi-process engine does.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("engine_process") else "0"
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    workload = W.make(spec["workload"], spec["kv_tokens"], spec["doc_tokens"], spec["vocab"], spec["seed"])
    t0 = time.perf_counter()
    llm = LLM(**spec["engine"], **_with_bench_debug(engine_kwargs(spec["config"], spec["host_gib"])))
    start_s = time.perf_counter() - t0
    warm = W.noreuse(
        spec["kv_tokens"], spec["vocab"], requests=2, prompt_tokens=256, output_tokens=2, seed=999
    )
    llm.generate(
        [TokensPrompt(prompt_token_ids=r.prompt) for r in warm.batches[0]],
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, detokenize=False),
        use_tqdm=False,
    )
    hooks = _time_connector_hooks(llm)
    wk = _worker_connector()
    before = _flat_metrics(llm)
    rows = []
    wall0 = time.perf_counter()
    tier0 = _tier_counters(llm)
    for bi, batch in enumerate(tqdm(
        workload.batches, desc=f"{spec['config']:>7} {spec['workload']}", file=sys.stderr, mininterval=2.0
    )):
        prompts = [TokensPrompt(prompt_token_ids=r.prompt) for r in batch]
        params = [
            SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True, detokenize=False)
            for r in batch
        ]
        hooks0 = sum(map(sum, hooks.values()))
        loads0 = _loads_done(wk)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        batch_s = time.perf_counter() - t
        batch_hook_ms = sum(map(sum, hooks.values())) - hooks0
        diag = _diagnostics(wk)
        new_loads = min(diag.loads_timed - loads0, len(diag.recent_loads)) if diag is not None else 0
        batch_loads = list(diag.recent_loads)[-new_loads:] if new_loads > 0 else []
        for r, o in zip(batch, outs):
            m = getattr(o, "metrics", None)
            ftl = getattr(m, "first_token_latency", 0.0) if m is not None else 0.0
            rows.append(
                {
                    "label": r.label,
                    "prompt_tokens": len(r.prompt),
                    "output_tokens": len(o.outputs[0].token_ids),
                    "cached_tokens": o.num_cached_tokens or 0,
                    # One request at a time: the generate call is the latency. Batches: vLLM's own TTFT.
                    "ttft_s": batch_s if len(batch) == 1 or not ftl else ftl,
                    "batch_s": batch_s,
                    "batch_hook_ms": batch_hook_ms,  # the adapter's scheduler hooks in this batch
                    # our loads that completed in this batch: device ms each (CUDA only)
                    "batch_load_ms": [round(1e3 * sec, 3) for _, sec in batch_loads],
                    "batch": bi,
                }
            )
    wall = time.perf_counter() - wall0
    tier1 = _tier_counters(llm)
    loads = _recent_loads(wk)
    sched = _diagnostics(_scheduler_connector(llm))
    _dump_profile(spec["config"])
    after = _flat_metrics(llm)
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    return {
        "engine_start_s": start_s,
        "wall_s": wall,
        "requests": rows,
        "metrics_delta": delta,
        "connector_lookup_ms": hooks.get("get_num_new_matched_tokens", []),
        "connector_hook_ms_total": {k: sum(v) for k, v in hooks.items()},
        "connector_hook_calls": {k: len(v) for k, v in hooks.items()},
        "host_tier": {k: tier1[k] - tier0.get(k, 0) for k in tier1},
        # lookups that found only part of a prefix, and the state of the first key they missed
        "partial_host_hits": list(sched.recent_partial_hits) if sched is not None else [],
        "loads": loads,
    }


#: Our connector's `debug` options in every run here: it times the steps that load (CUDA events)
#: and polls its stores as in vLLM's default multi-process engine, in both engine modes.
BENCH_DEBUG = {"step_timing": True, "poll_stores": True}


def _with_bench_debug(kwargs: dict) -> dict:
    """Engine kwargs with BENCH_DEBUG in our connector's config (a config's own debug keys win)."""
    kvt = kwargs.get("kv_transfer_config")
    if kvt and kvt.get("kv_connector") == "TritonPrefixCacheConnector":
        extra = kvt["kv_connector_extra_config"]
        extra["debug"] = {**BENCH_DEBUG, **(extra.get("debug") or {})}
    return kwargs


def _diagnostics(conn):
    """The public snapshot of our connector (`TritonPrefixCacheConnector.diagnostics()`), or None for
    no connector or another one."""
    read = getattr(conn, "diagnostics", None)
    return read() if read is not None else None


def _worker_connector():
    """The worker-side connector of this process's engine (in-process engines), or None."""
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    except ImportError:
        return None
    return get_kv_transfer_group() if has_kv_transfer_group() else None


def _loads_done(wk) -> int:
    """How many loads the worker has timed so far (its diagnostics keep the latest 4,096)."""
    diag = _diagnostics(wk)
    return diag.loads_timed if diag is not None else 0


def _recent_loads(wk) -> dict | None:
    """Our worker's host -> GPU loads as the device timed them (in-process engines on CUDA)."""
    diag = _diagnostics(wk)
    rec = list(diag.recent_loads) if diag is not None else []
    if not rec:
        return None
    ms = sorted(1e3 * s for _, s in rec)
    out = {
        "n": len(rec),
        "mean_bytes": statistics.fmean(b for b, _ in rec),
        "gpu_ms_p50": statistics.median(ms),
        "gbps": sum(b for b, _ in rec) / sum(s for _, s in rec) / 1e9,
    }
    steps = list(diag.step_timings)  # debug.step_timing: the steps that loaded
    for key in ("submit_ms", "submit_cpu_ms", "load_submit_ms", "host_ms", "cpu_ms", "other_cpu_ms",
                "device_ms"):
        vals = [r[key] for r in steps if key in r]
        if vals:
            out[f"step_{key}_p50"] = statistics.median(vals)
    # Every timed step in order (each load's device time is on its request: `batch_load_ms`); capped.
    out["each_step"] = [{k: round(v, 3) for k, v in r.items()} for r in steps[-512:]]
    return out


def _scheduler_connector(llm):
    """The scheduler-side connector of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), or None."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    return getattr(getattr(core, "scheduler", None), "connector", None)


def _tier_counters(llm) -> dict:
    """Our host tier's counters (blocks and bytes each way), read from the in-process scheduler."""
    diag = _diagnostics(_scheduler_connector(llm))
    if diag is None:
        return {}
    return {k: diag.host_tier[k] for k in ("blocks_from_host", "bytes_from_host", "blocks_to_host",
                                           "bytes_to_host", "evictions", "drops_full")}


SCHEDULER_HOOKS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
)


#: TPC_BENCH_PROFILE=<file>: cProfile the scheduler hooks (not the engine) and write the top
#: functions by own time, then by cumulative time, to <file>.<config>.txt: where the adapter's
#: scheduler time goes.
_PROFILER = cProfile.Profile() if os.environ.get("TPC_BENCH_PROFILE") else None


def _dump_profile(config: str) -> None:
    if _PROFILER is None or not _PROFILER.getstats():  # no connector: nothing was profiled
        return
    path = f"{os.environ['TPC_BENCH_PROFILE']}.{config.replace(':', '_').replace(',', '_')}.txt"
    with open(path, "w") as f:
        pstats.Stats(_PROFILER, stream=f).sort_stats("tottime").print_stats(40)
        pstats.Stats(_PROFILER, stream=f).sort_stats("cumulative").print_stats(60)
    print(f"scheduler-hook profile: {path}", file=sys.stderr)


def _time_connector_hooks(llm) -> dict[str, list[float]]:
    """Time the scheduler-side connector's hooks (ms per call), get_num_new_matched_tokens first:
    that one is the adapter's per-request scheduler time (key derivation + lookup).

    Only in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) expose the scheduler; nothing is
    timed otherwise, or when the config has no connector.
    """
    calls: dict[str, list[float]] = {}
    conn = _scheduler_connector(llm)
    if conn is None:
        return calls
    for name in SCHEDULER_HOOKS:
        orig = getattr(conn, name, None)
        if orig is None:
            continue
        calls[name] = times = []

        def timed(*args, _orig=orig, _times=times, **kwargs):
            if _PROFILER is not None:
                _PROFILER.enable()
            t = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                _times.append((time.perf_counter() - t) * 1e3)
                if _PROFILER is not None:
                    _PROFILER.disable()

        setattr(conn, name, timed)
    return calls


# ---- parent ------------------------------------------------------------------------------------


def pinned_memcpy_gbps(size: int = 1 << 30, reps: int = 5) -> float | None:
    """Host (pinned) -> device copy bandwidth, the transfer floor's denominator."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return size / statistics.median(times[1:]) / 1e9


def summarize(workload: W.Workload, result: dict) -> dict:
    reqs = result["requests"]
    labels = list(dict.fromkeys(r["label"] for r in reqs))
    per = {}
    for lab in labels:
        t = sorted(r["ttft_s"] * 1e3 for r in reqs if r["label"] == lab)
        per[lab] = {
            "mean_ms": statistics.fmean(t),
            "p50_ms": statistics.median(t),
            "p99_ms": t[min(len(t) - 1, int(0.99 * len(t)))],
            "n": len(t),
        }
    for lab in labels:  # throughput per label, over the distinct batches that carry it
        batches = {r.get("batch", i): r for i, r in enumerate(reqs) if r["label"] == lab}
        secs = sum(r["batch_s"] for r in batches.values())
        n = sum(1 for r in reqs if r["label"] == lab)
        toks = sum(r["output_tokens"] for r in reqs if r["label"] == lab)
        per[lab].update(requests_per_s=n / secs if secs else None,
                        output_tokens_per_s=toks / secs if secs else None)
        hook_ms = sum(r.get("batch_hook_ms", 0.0) for r in batches.values())
        if hook_ms:
            per[lab]["connector_hook_ms_per_request"] = hook_ms / n
    focus = [r["ttft_s"] * 1e3 for r in reqs if r["label"] in workload.focus]
    out_tokens = sum(r["output_tokens"] for r in reqs)
    hits = {k: v for k, v in result["metrics_delta"].items()
            if "prefix_cache" in k or "kv" in k.lower() or "preempt" in k}
    return {
        "per_label": per,
        "focus_mean_ttft_ms": statistics.fmean(focus) if focus else None,
        "focus_p50_ttft_ms": statistics.median(focus) if focus else None,
        "focus_p99_ttft_ms": sorted(focus)[min(len(focus) - 1, int(0.99 * len(focus)))] if focus else None,
        "requests_per_s": len(reqs) / result["wall_s"],
        "output_tokens_per_s": out_tokens / result["wall_s"],
        "cached_tokens": sum(r["cached_tokens"] for r in reqs),
        "prompt_tokens": sum(r["prompt_tokens"] for r in reqs),
        "wall_s": result["wall_s"],
        "engine_start_s": result["engine_start_s"],
        "connector_lookup_ms_mean": statistics.fmean(result["connector_lookup_ms"])
        if result.get("connector_lookup_ms")
        else None,
        "connector_hook_ms_per_request": {
            k: v / len(reqs) for k, v in result.get("connector_hook_ms_total", {}).items()
        },
        "metrics": hits,
        "host_tier": result.get("host_tier") or None,
        "partial_host_hits": result.get("partial_host_hits") or [],
        # lookups that stopped at a block missing from the host tier while later ones were there
        # (a block lost or not yet stored), among the latest 256 partial hits the adapter keeps
        "host_tier_holes": sum(1 for p in result.get("partial_host_hits") or () if p.get("later_in_host")),
        "loads": result.get("loads"),
    }


def plot(results: dict, path: Path, device: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [w for w in results if any("summary" in c for c in results[w]["configs"].values())]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, wname in zip(axes[0], names):
        configs = {c: v for c, v in results[wname]["configs"].items() if "summary" in v}
        labels = list(dict.fromkeys(lab for v in configs.values() for lab in v["summary"]["per_label"]))
        width = 0.8 / max(1, len(configs))
        for i, (c, v) in enumerate(configs.items()):
            ys = [v["summary"]["per_label"].get(lab, {}).get("mean_ms", 0) for lab in labels]
            base, extra = parse_config(c)
            name = CONFIGS[base] + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=name)
        floor = results[wname].get("transfer_floor_ms")
        if floor:
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"transfer floor {floor:.0f} ms")
        ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(labels))], labels)
        ax.set_ylabel("mean TTFT (ms)")
        ax.set_title(wname)
        ax.legend(fontsize=8)
    fig.suptitle(f"TTFT per config and round on {device}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", nargs="+", default=["docqa"], choices=W.WORKLOADS)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help=f"any of {list(CONFIGS)}; 'ours:load=layerwise,demote=write_through' sets extra keys "
        "(default: all five on a GPU; none, prefix and ours on a CPU); any config takes kv_gib=<GiB>, "
        "its own KV cache size ('prefix:kv_gib=16': every reuse a VRAM hit, the ideal)",
    )
    ap.add_argument(
        "--model", default=None, help="bench.models name (default: llama-3.1-8b on GPU, tiny-llama on CPU)"
    )
    ap.add_argument(
        "--kv-gib", type=float, default=None, help="engine KV cache size (GPU default 4, CPU 1/128)"
    )
    ap.add_argument(
        "--host-gib", type=float, default=None, help="host memory of every host tier (GPU default 16)"
    )
    ap.add_argument(
        "--doc-tokens", type=int, default=None, help="document length (GPU default 8000, CPU 1024)"
    )
    ap.add_argument(
        "--eager", action="store_true", help="enforce_eager (quick iterations; not for headlines)"
    )
    ap.add_argument(
        "--engine-process",
        action="store_true",
        help="run each engine's core in a process of its own, vLLM's default deployment "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=1); the default runs it in the benchmark's process, where the "
        "adapter's hook and loading-step timings can be read (every config the same way either way)",
    )
    ap.add_argument(
        "--repeat", type=int, default=None,
        help="runs of each config, each in a fresh engine; the table shows the median run and the "
        "range (default: 3 on a CPU, 1 on a GPU)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="a free-form note stored with the record")
    ap.add_argument("--record", type=Path, default=RECORD, help="the JSON-lines record to append to")
    ap.add_argument("--chart-dir", type=Path, default=None,
                    help="where the charts go (default bench/results: compare-<workload>.png)")
    ap.add_argument("--raw-dir", type=Path, default=RAW_DIR,
                    help="where the whole result (every request) goes while the run lasts (not tracked)")
    ap.add_argument(
        "--out", default=None,
        help="write the whole result (every request included) to this JSON file and its charts beside "
        "it, instead of appending to the record and refreshing the charts",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return args
    check_args(ap.error, args.configs, args.model)
    for name in ("kv_gib", "host_gib"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            ap.error(f"--{name.replace('_', '-')}: expected a number of GiB > 0, got {v:g}")
    if args.doc_tokens is not None and args.doc_tokens < 64:
        ap.error(f"--doc-tokens: expected at least 64 tokens, got {args.doc_tokens}")
    if args.repeat is not None and args.repeat < 1:
        ap.error(f"--repeat: expected at least 1, got {args.repeat}")
    return args


def _focus_stat(wname: str) -> str:
    """The statistic a workload's targets are about: p50 TTFT for chat, mean TTFT otherwise."""
    return "focus_p50_ttft_ms" if wname == "chat" else "focus_mean_ttft_ms"


#: The statistics whose range over repeated runs is kept and printed.
SPREAD_KEYS = ("focus_mean_ttft_ms", "focus_p50_ttft_ms", "focus_p99_ttft_ms", "requests_per_s",
               "output_tokens_per_s")


def median_run(wname: str, runs: list[tuple[dict, dict]]) -> tuple[tuple[dict, dict], dict]:
    """(the run whose focus statistic is the median, each SPREAD_KEYS statistic's median/min/max).

    `runs` holds (summary, child result) pairs of one config; with an even count the lower median.
    """
    stat = _focus_stat(wname)
    ordered = sorted(runs, key=lambda r: r[0][stat] if r[0][stat] is not None else math.inf)
    spread = {}
    for key in SPREAD_KEYS:
        vals = sorted(s[key] for s, _ in runs if s.get(key) is not None)
        if vals:
            spread[key] = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1]}
    return ordered[(len(ordered) - 1) // 2], spread


def _record_summary(summary: dict) -> dict:
    """A config's summary as the record keeps it: every number, no per-request or per-step lists."""
    out = {k: v for k, v in summary.items() if k != "partial_host_hits"}
    if isinstance(out.get("loads"), dict):
        out["loads"] = {k: v for k, v in out["loads"].items() if k != "each_step"}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        try:
            res = run_child(spec)
        except Exception as e:
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        Path(spec["result_path"]).write_text(json.dumps(res))
        return 0

    import torch

    gpu = torch.cuda.is_available()
    env = environment()
    model = get_model(args.model or ("llama-3.1-8b" if gpu else "tiny-llama"))
    path = model.materialize(MODEL_CACHE)
    dtype_bytes = 4 if model.dtype == "float32" else 2
    kv_gib = args.kv_gib or (4.0 if gpu else 1 / 128)
    host_gib = args.host_gib or (16.0 if gpu else 0.25)
    block = 16 if gpu else 32
    kv_tokens = int(kv_gib * 2**30) // model.kv_bytes_per_token(dtype_bytes)
    doc_tokens = args.doc_tokens or (8000 if gpu else 1024)
    configs = args.configs or (list(CONFIGS) if gpu else ["none", "prefix", "ours"])
    repeat = args.repeat or (1 if gpu else 3)
    engine = {
        "model": str(path),
        "skip_tokenizer_init": True,
        "load_format": "dummy" if model.weights == "dummy" else "auto",
        "dtype": model.dtype,
        "block_size": block,
        "kv_cache_memory_bytes": int(kv_gib * 2**30),
        "max_model_len": max(4096, doc_tokens + 1024),
        "enforce_eager": args.eager or not gpu,
        "seed": 0,
        "disable_log_stats": False,
        "gpu_memory_utilization": 0.9,
    }
    stamp = env["date"].replace(":", "").replace("+0000", "")
    full = Path(args.out) if args.out else args.raw_dir / f"compare-{stamp}.json"
    print(
        f"# {env['command']}\n# {env['device']} | torch {env['torch']} | vLLM {env['vllm']} | "
        f"model {model.name} | KV {size(kv_gib * 2**30)} = {kv_tokens:,} tokens | host tiers "
        f"{size(host_gib * 2**30)} | {'eager' if engine['enforce_eager'] else 'compiled + CUDA graphs'} | "
        f"engine core {'in its own process' if args.engine_process else 'in-process'}"
        + (f" | each config {repeat} times" if repeat > 1 else "")
        + f"\n# every request: {full}",
        flush=True,
    )
    if not gpu:
        print(f"# {CPU_NOTE}", flush=True)
    gbps = pinned_memcpy_gbps()
    results: dict = {}
    common = {
        "label": args.label,
        "model": model.name,
        "kv_gib": kv_gib,
        "kv_tokens": kv_tokens,
        "host_gib": host_gib,
        "engine": engine,
        "engine_process": args.engine_process,
        "repeat": repeat,
        "pinned_memcpy_gbps": gbps,
        # cProfile on the scheduler hooks slows them: timings of such a run are not headlines
        "hook_profiler": _PROFILER is not None,
    }

    def save(partial: bool = False) -> Path:
        payload = {"environment": env, "partial": partial, **common, "ratios": _ratios(results),
                   "workloads": results}
        return write_json(payload, full)

    for wname in args.workload:
        wl = W.make(wname, kv_tokens, doc_tokens, model.vocab_size, args.seed)
        print(f"\n== {wname}: {wl.description} ({wl.num_requests} requests)", flush=True)
        entry: dict = {"description": wl.description, "params": wl.params, "focus": wl.focus, "configs": {}}
        if wname in ("docqa", "fits") and gbps:
            entry["transfer_floor_ms"] = (
                doc_tokens * model.kv_bytes_per_token(dtype_bytes) / (gbps * 1e9) * 1e3
            )
        results[wname] = entry
        for cfg in configs:
            runs, error = [], None
            for i in range(repeat):
                t = time.perf_counter()
                spec, res = _run_config(wname, cfg, i, kv_tokens, doc_tokens, model, args, host_gib, engine)
                if "error" in res:
                    error = res
                    print(f"   {cfg}: FAILED ({res['error'][:300]})", flush=True)
                    break
                runs.append((summarize(wl, res), res))
                s = runs[-1][0]
                print(
                    f"   {cfg}{f' run {i + 1}/{repeat}' if repeat > 1 else ''}: focus "
                    f"{'p50' if wname == 'chat' else 'mean'} TTFT {sig3(s[_focus_stat(wname)] or 0)} ms, "
                    f"{sig3(s['requests_per_s'])} req/s ({time.perf_counter() - t:.0f} s with start-up)",
                    flush=True,
                )
            if error is not None:
                entry["configs"][cfg] = {"error": error["error"], "traceback": error.get("traceback")}
                continue
            (summ, res), spread = median_run(wname, runs)
            entry["configs"][cfg] = {
                "engine_overrides": {k: v for k, v in spec["engine"].items() if engine.get(k) != v},
                "summary": summ,
                "spread": spread,
                "requests": res["requests"],
                "metrics_delta": res["metrics_delta"],
            }
            save(partial=True)  # a run cut short still leaves every finished config on disk
    print_results(results, repeat, gpu)
    save()
    charts = []
    for wname, entry in results.items():
        if not args.out:
            configs_rec = {
                c: ({"error": v["error"]} if "error" in v else
                    {"engine_overrides": v["engine_overrides"], "spread": v["spread"],
                     "summary": _record_summary(v["summary"])})
                for c, v in entry["configs"].items()
            }
            append_record("compare", {
                "workload": wname, **common, "partial": False,
                **{k: v for k, v in entry.items() if k != "configs"},
                "configs": configs_rec, "ratios": _ratios(results).get(wname, {}),
            }, args.record)
        chart = chart_path("compare", wname, env["device"])
        if args.out:
            chart = full.parent / f"{full.stem}-{wname}.png"
        elif args.chart_dir is not None:
            chart = args.chart_dir / chart.name
        png = plot({wname: entry}, chart, env["device"])
        if png:
            charts.append(png)
    print(f"\nwrote {full}" + ("" if args.out else f"\nappended to {args.record}")
          + "".join(f"\nchart {c}" for c in charts))
    return 0


#: Printed with every CPU run, and where its numbers are shown.
CPU_NOTE = ("CPU numbers test the harness, not the plugin's speed: a busy 2-core machine is noisy "
            "(median of the runs, min-max in brackets).")
#: Where a run keeps its whole result (every request) while it runs; not tracked.
RAW_DIR = Path(__file__).resolve().parent / "compare-raw"


def _run_config(wname: str, cfg: str, run: int, kv_tokens: int, doc_tokens: int, model, args,
                host_gib: float, engine: dict) -> tuple[dict, dict]:
    """One config on one workload in a child process: (its spec, its result or {"error": ...})."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "workload": wname,
            "config": cfg,
            "kv_tokens": kv_tokens,
            "doc_tokens": doc_tokens,
            "vocab": model.vocab_size,
            "seed": args.seed,
            "host_gib": host_gib,
            "engine": config_engine(cfg, engine),
            "result_path": f"{tmp}/result.json",
            "engine_process": args.engine_process,
        }
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        child_env = dict(
            os.environ,
            VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
            PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "bench.compare", "--child", f"{tmp}/spec.json"],
            env=child_env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        res_file = Path(spec["result_path"])
        res = json.loads(res_file.read_text()) if res_file.exists() else {
            "error": f"child exited {proc.returncode}"}
    return spec, res


def _with_range(spread: dict, key: str, value, repeat: int) -> str:
    """'35.6' for one run; '35.6 (33.1-40.2)' (the median run, then the range) for several."""
    if value is None:
        return "-"
    r = spread.get(key)
    if repeat == 1 or not r:
        return sig3(value)
    return f"{sig3(value)} ({sig3(r['min'])}-{sig3(r['max'])})"


def print_results(results: dict, repeat: int, gpu: bool) -> None:
    """The table (TTFT in ms, per round or turn and over the workload's focus), then the ratios."""
    rows = []
    for wname, entry in results.items():
        for cfg, v in entry["configs"].items():
            if "summary" not in v:
                rows.append({"workload": wname, "config": cfg, "note": "failed: " + v["error"][:60]})
                continue
            s, sp = v["summary"], v.get("spread", {})
            row = {
                "workload": wname,
                "config": cfg,
                "focus mean": _with_range(sp, "focus_mean_ttft_ms", s["focus_mean_ttft_ms"], repeat),
                "focus p50": _with_range(sp, "focus_p50_ttft_ms", s["focus_p50_ttft_ms"], repeat),
                "focus p99": s["focus_p99_ttft_ms"],
                "req/s": _with_range(sp, "requests_per_s", s["requests_per_s"], repeat),
                "out tok/s": s["output_tokens_per_s"],
                "cached": f"{s['cached_tokens'] / max(1, s['prompt_tokens']):.0%}",
                "lookup ms": s["connector_lookup_ms_mean"],
            }
            if s.get("host_tier_holes"):
                row["note"] = f"{s['host_tier_holes']} host-tier holes"
            for lab, p in s["per_label"].items():
                row[lab] = p["mean_ms"]
            rows.append(row)
    labels = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("round", "turn"))))
    print("\nTTFT in ms (mean per round or turn; the focus: the rounds or turns the workload is about)"
          + (f"; each config run {repeat} times: the median run, min-max in brackets" if repeat > 1 else ""))
    print_table(rows, ["workload", "config", *labels, "focus mean", "focus p50", "focus p99", "req/s",
                       "out tok/s", "cached", "lookup ms", "note"])
    ratios = _ratios(results)
    if ratios:
        print("\nratios (this plugin over each baseline; TTFT: the focus statistic; < 1x: faster):")
    for wname, r in ratios.items():
        parts = []
        for key, v in r.items():  # "ttft_ours_over_prefix" -> "ttft ours / prefix 0.65x"
            stat, what = key.split("_", 1)
            what = what.replace("_over_", " / ").replace("_minus_", " - ")
            ms = key.endswith("_ms")
            parts.append(f"{stat} {what[:-3]} {sig3(v)} ms" if ms else f"{stat} {what} {v:.2f}x")
        print(f"  {wname}: " + ", ".join(parts))
    if not gpu:
        print(f"\n{CPU_NOTE}")


def _ratios(results: dict) -> dict:
    """The target ratios: each variant of ours over each baseline, on the workload's focus statistic."""
    out = {}
    for wname, entry in results.items():
        s = {c: v["summary"] for c, v in entry["configs"].items() if "summary" in v}
        stat = "focus_p50_ttft_ms" if wname == "chat" else "focus_mean_ttft_ms"
        r = {}
        for c in s if wname == "burst" else ():  # each config's two bursts: prefix in host RAM vs VRAM
            pl = s[c]["per_label"]
            if pl.get("burst in VRAM", {}).get("requests_per_s"):
                r[f"throughput_{c}_host_over_vram"] = (
                    pl["burst from host"]["requests_per_s"] / pl["burst in VRAM"]["requests_per_s"]
                )
        bases = [b for b in ("offload", "simple", "prefix", "none") if b in s]
        bases += [c for c in s if c not in bases and not c.startswith("ours")]
        for ours in (c for c in s if c.startswith("ours")):
            for base in bases:
                if s[base][stat]:
                    r[f"ttft_{ours}_over_{base}"] = s[ours][stat] / s[base][stat]
                if s[base]["requests_per_s"]:
                    r[f"throughput_{ours}_over_{base}"] = (
                        s[ours]["requests_per_s"] / s[base]["requests_per_s"]
                    )
                if "kv_gib" in parse_config(base)[1] and s[base][stat] and s[ours][stat]:
                    # what a host hit costs beyond the same request hitting in VRAM
                    r[f"ttft_{ours}_minus_{base}_ms"] = s[ours][stat] - s[base][stat]
            if entry.get("transfer_floor_ms"):
                r[f"ttft_{ours}_over_floor"] = s[ours]["focus_mean_ttft_ms"] / entry["transfer_floor_ms"]
        if r:
            out[wname] = r
    return out


if __name__ == "__main__":
    sys.exit(main())
