"""Serving benchmark: `vllm serve` per config, driven by vLLM's own client at several concurrencies.

    python -m bench.serve --workload prefix                      # this machine's defaults
    python -m bench.serve --workload prefix --configs offload ours ours:load=async --concurrency 16 64
    python -m bench.serve --workload shared                      # ours against ours:remote=local

Per config it starts one server (vLLM's default multi-process deployment; compiled with CUDA graphs
on a GPU), waits for `/health`, runs every concurrency in increasing order against it with
`vllm bench serve` (chat: the project's own client, `bench/chat.py`), snapshots `/metrics` around
each run, then stops the server's process group and waits until its port is free. Configs share
model, flags and workload; host tiers get the same memory. Each run draws its own prompts (seed +
its position), so every run starts cold apart from what earlier runs left in the caches. With
`--repeat R` (default: 1 on a GPU, 3 on a CPU, whose timings are noisy) every concurrency runs R
times in a row; the record keeps the median run (by throughput) with the range of every repeat.

The shared workload: documents that one replica already read, served by another. A config with
`remote=local` gets a Mooncake Store of its own on loopback (`triton_prefix_cache.remote.local`);
replica A (the config with that store) reads every run's documents, is stopped, then replica B
(the same flags, the same store, empty GPU and host tiers) gets the same prompts (same seeds), so
every prefix B hits comes from the store. A config without `remote` runs B's phase only (B
recomputes: its baseline). The store stops with the config, also on errors. Any other `remote`
value (a `mooncake://` URL) is used as it is, with no store started.

Output: a table; one line appended to bench/results.jsonl (exact commands, device, host, versions,
every number); the chart bench/results/serve-<workload>.png (serve-<workload>-cpu.png on a CPU:
throughput, TTFT p50 and p99 against concurrency); the raw client JSON and metric snapshots under
--raw-dir (not tracked).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.chat import ChatSpec
from bench.common import RECORD, append_record, chart_path, record_head
from bench.configs import CONFIGS, MODEL_CACHE, check_args, parse_config, serve_flags, unparse_config
from bench.models import ModelSpec, get_model
from triton_prefix_cache.remote.local import MIN_SEGMENT_GIB, LocalStore

ROOT = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "triton_prefix_cache_vllm.cli"]


# ---- workloads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One workload at one scale. `dataset` holds `vllm bench serve` flags; chat runs `chat`."""

    name: str
    working_set_tokens: int
    num_prompts: int
    dataset: tuple[str, ...] = ()
    chat: ChatSpec | None = None


@dataclass(frozen=True)
class SharedSpec:
    """The shared workload at one scale: documents per run (each asked once: every prefix replica B
    hits was read by replica A, none by B itself), requests in flight, and the host tier of each
    replica (it only stages what a request loads, so it can be smaller than the scale's)."""

    docs: int
    concurrency: tuple[int, ...]
    host_gib: float


@dataclass(frozen=True)
class Scale:
    """What one machine runs: model, KV cache, host tier and the size of every workload."""

    model: str
    kv_gib: float
    host_gib: float
    max_model_len: int
    concurrency: tuple[int, ...]
    prefix_len: int
    suffix_len: int
    num_prefixes: int
    output_len: int
    num_prompts: int
    chat: ChatSpec
    shared: SharedSpec
    extra_flags: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    repeat: int = 1  # runs of each concurrency (median and range recorded)


#: The GPU scale: Llama-3.1-8B shape, 8 GiB of KV (65,536 tokens); the prefix workload's working
#: set is 32 prefixes x 8,064 tokens, 3.9x the KV cache, and fits the 40 GiB host tiers.
GPU = Scale(model="llama-3.1-8b", kv_gib=8.0, host_gib=40.0, max_model_len=16384,
            concurrency=(1, 4, 16, 64), prefix_len=8000, suffix_len=64, num_prefixes=32,
            output_len=32, num_prompts=192,
            chat=ChatSpec(sessions=256, turns=4, first_tokens=1024, answer_tokens=64, new_tokens=128),
            # 32 documents of 8,064 tokens: 31.5 GiB of KV a run; the store holds every run (two),
            # beside one replica's host tier, in the host's 128 GiB.
            shared=SharedSpec(docs=32, concurrency=(1, 4), host_gib=16.0))
#: The CPU scale: the tiny random Llama (1 KiB of KV per token), 2 MiB of KV (2,048 tokens), the
#: same shapes shrunk so that a run takes minutes on two cores. vLLM's CPU backend reserves one
#: more core for any --kv-transfer-config; every config gets the same thread layout.
CPU = Scale(model="tiny-llama", kv_gib=2 / 1024, host_gib=0.0625, max_model_len=1024,
            concurrency=(1, 4), prefix_len=480, suffix_len=32, num_prefixes=16, output_len=8,
            num_prompts=64,
            chat=ChatSpec(sessions=16, turns=3, first_tokens=256, answer_tokens=16, new_tokens=32),
            shared=SharedSpec(docs=16, concurrency=(1, 4), host_gib=0.0625),
            extra_flags=("--enforce-eager", "--block-size", "32"),
            env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, repeat=3)

WORKLOADS = ("prefix", "chat", "noreuse", "fits", "shared")


def make_workload(name: str, s: Scale, num_prompts: int | None) -> Workload:
    n = num_prompts or s.num_prompts
    if name == "shared":  # one prompt per prefix: each document asked once a run
        n = num_prompts or s.shared.docs
        return Workload(name, n * (s.prefix_len + s.suffix_len), n, (
            "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(s.prefix_len),
            "--prefix-repetition-suffix-len", str(s.suffix_len),
            "--prefix-repetition-num-prefixes", str(n),
            "--prefix-repetition-output-len", str(s.output_len)))
    if name in ("prefix", "fits"):
        prefixes = s.num_prefixes if name == "prefix" else s.num_prefixes // 8  # fits: an eighth
        return Workload(name, prefixes * (s.prefix_len + s.suffix_len), n, (
            "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(s.prefix_len),
            "--prefix-repetition-suffix-len", str(s.suffix_len),
            "--prefix-repetition-num-prefixes", str(prefixes),
            "--prefix-repetition-output-len", str(s.output_len)))
    if name == "noreuse":
        prompt = s.prefix_len // 4
        return Workload(name, 0, n, (
            "--dataset-name", "random", "--random-input-len", str(prompt),
            "--random-output-len", str(s.output_len), "--random-range-ratio", "0"))
    if name == "chat":
        return Workload(name, s.chat.working_set_tokens(), s.chat.sessions * s.chat.turns, chat=s.chat)
    raise ValueError(f"--workload: expected one of {list(WORKLOADS)}, got {name!r}")


# ---- one server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Server:
    """`vllm serve` in a process group of its own, its output in `log`."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.port = free_port()
        self.command = [*CLI, "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        """Start and wait for /health; seconds it took. Raises with the log's tail if it dies."""
        t0 = time.perf_counter()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         env=self._env, start_new_session=True)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n"
                                   + self.tail())
            try:
                http_get(self.url + "/health", timeout=2)
                return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_get(self.url + "/metrics"))

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT to the whole group (API server and engine core), then SIGKILL; wait for the port."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children the group leader left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.time() + 30
        while port_in_use(self.port) and time.time() < deadline:
            time.sleep(0.5)
        self.proc = None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
#: Metric families kept in the record: this plugin's, vLLM's prefix caches, offloading, preemptions.
KEEP = ("vllm:tpc_", "vllm:prefix_cache_", "vllm:external_prefix_cache_", "vllm:kv_offload_",
        "vllm:num_preemptions", "vllm:prompt_tokens_cached", "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} for the families in KEEP (engine labels dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(KEEP) or m.group(1).endswith("_created"):
            continue
        labels = ",".join(lab for lab in (m.group(2) or "{}")[1:-1].split(",")
                          if lab and not lab.startswith(("engine=", "model_name=")))
        key = m.group(1) + (f"{{{labels}}}" if labels else "")
        try:
            out[key] = out.get(key, 0.0) + float(m.group(3))
        except ValueError:
            continue
    return out


def metric_delta(before: dict, after: dict) -> dict[str, float]:
    """Counters (and histogram sums/counts) as differences, gauges as their last value, and for each
    histogram of this plugin (each label set apart) its p50 and p99 over the interval
    (`<name>_p50<labels>`, `<name>_p99<labels>`)."""
    out = {}
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for k, v in after.items():
        name = k.split("{")[0]
        if name.endswith(("_total", "_sum", "_count", "_bucket")):
            d = v - before.get(k, 0.0)
            if name.endswith("_bucket"):
                le = re.search(r'le="([^"]+)"', k)
                if le and name.startswith("vllm:tpc_"):
                    # one histogram per label set besides `le` (engines' labels are dropped already)
                    rest = re.sub(r',?le="[^"]*"', "", k[len(name):]).replace("{,", "{")
                    key = (name[:-len("_bucket")], "" if rest in ("", "{}") else rest)
                    buckets.setdefault(key, []).append((float(le.group(1)), d))
            elif d:
                out[k] = d
        else:
            out[k] = v
    for (name, labels), cum in buckets.items():
        for q in (0.5, 0.99):
            v = histogram_quantile(cum, q)
            if v is not None:
                out[f"{name}_p{round(q * 100)}{labels}"] = v
    return out


def histogram_quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a Prometheus histogram from its cumulative (upper bound, count) buckets,
    linear within the bucket that holds it (as PromQL's histogram_quantile); None when empty.
    A quantile in the +Inf bucket is the largest finite bound."""
    cum = sorted(cumulative)
    total = cum[-1][1] if cum else 0.0
    if total <= 0:
        return None
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in cum:
        if count >= rank:
            if math.isinf(bound):
                return lo_bound
            if count == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (count - lo_count)
        lo_bound, lo_count = bound, count
    return lo_bound


# ---- clients -------------------------------------------------------------------------------------


def client_command(server: Server, model_dir: Path, w: Workload, concurrency: int, seed: int,
                   raw_dir: Path, name: str) -> list[str]:
    return [*CLI, "bench", "serve", "--backend", "vllm", "--base-url", server.url,
            "--model", str(model_dir), "--tokenizer", str(model_dir), *w.dataset,
            "--num-prompts", str(w.num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--ignore-eos", "--seed", str(seed),
            "--ready-check-timeout-sec", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(raw_dir), "--result-filename", name]


#: What a run keeps of the client's JSON (per-request lists stay in the raw file).
CLIENT_KEYS = ("duration", "completed", "failed", "request_throughput", "output_throughput",
               "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms",
               "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
               "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms", "median_ttft_ms_by_turn")


def run_client(server: Server, model: ModelSpec, model_dir: Path, w: Workload, concurrency: int,
               seed: int, raw_dir: Path, name: str, env: dict, timeout_s: float) -> tuple[dict, list[str]]:
    if w.chat is not None:
        from bench import chat

        cmd = ["bench.chat", f"sessions={w.chat.sessions}", f"turns={w.chat.turns}",
               f"concurrency={concurrency}", f"seed={seed}"]
        res = chat.run(server.url, str(model_dir), w.chat, concurrency, model.vocab_size, seed,
                       str(model_dir), timeout_s)
        (raw_dir / name).write_text(json.dumps(res, indent=1))
        return res, cmd
    cmd = client_command(server, model_dir, w, concurrency, seed, raw_dir, name)
    log = raw_dir / (name + ".log")
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                              check=False)
    if proc.returncode != 0 or not (raw_dir / name).exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vllm bench serve exited with {proc.returncode}:\n{tail}")
    return json.loads((raw_dir / name).read_text()), cmd


# ---- the run -------------------------------------------------------------------------------------


def gib_text(gib: float) -> str:
    """8 GiB, 2 MiB, 0.5 GiB: sizes as people write them."""
    return f"{gib:g} GiB" if gib >= 0.5 else f"{gib * 1024:.3g} MiB"


def resolve_configs(names: list[str], w: Workload, model: ModelSpec, s: Scale) -> dict[str, str]:
    """Display name -> config string. "roof" is prefix caching with a KV cache that holds the
    whole working set (x1.25 for requests in flight)."""
    out = {}
    for name in names:
        if name == "roof":
            dtype_bytes = 4 if model.dtype == "float32" else 2
            need = max(w.working_set_tokens * model.kv_bytes_per_token(dtype_bytes) * 1.25 / 2**30,
                       s.kv_gib)
            out[name] = f"prefix:kv_gib={math.ceil(need * 1024) / 1024:g}"
        else:
            parse_config(name)
            out[name] = name
    return out


def run_config(name: str, config: str, model: ModelSpec, model_dir: Path, w: Workload, s: Scale,
               concurrencies: list[int], args, raw_dir: Path, env: dict, progress, on_run) -> dict:
    kv_gib = parse_config(config)[1].get("kv_gib", s.kv_gib)
    flags = [str(model_dir), "--load-format", "dummy" if model.weights == "dummy" else "auto",
             "--dtype", model.dtype, "--max-model-len", str(s.max_model_len),
             "--kv-cache-memory-bytes", str(int(kv_gib * 2**30)), "--seed", "0",
             *s.extra_flags, *serve_flags(config, s.host_gib)]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    server = Server(flags, env, raw_dir / f"{slug}.server.log")
    entry: dict = {"config": config, "server_command": shlex.join(server.command), "runs": []}
    try:
        entry["start_s"] = round(server.start(args.start_timeout), 1)
        progress.write(f"[{name}] ready in {entry['start_s']} s ({server.url})")
        repeat = max(1, getattr(args, "repeat", None) or s.repeat)
        for i, c in enumerate(concurrencies):
            tries = []
            for k in range(repeat):
                tag = f"c{c}" if repeat == 1 else f"c{c}.r{k + 1}"
                before = server.metrics()
                res, cmd = run_client(server, model, model_dir, w, c, args.seed + i * repeat + k, raw_dir,
                                      f"{slug}.{tag}.json", env, args.run_timeout)
                after = server.metrics()
                tries.append({"concurrency": c, "client_command": shlex.join(cmd),
                              **{k: res[k] for k in CLIENT_KEYS if k in res},
                              "metrics": metric_delta(before, after)})
                (raw_dir / f"{slug}.{tag}.metrics.json").write_text(json.dumps(
                    {"before": before, "after": after}, indent=1))
            run = median_run(tries)
            entry["runs"].append(run)
            on_run(entry)
            progress.update(1)
            progress.write(f"[{name}] c={c}: {run.get('request_throughput', 0):.2f} req/s, "
                           f"TTFT p50 {run.get('median_ttft_ms', 0):.0f} ms, "
                           f"p99 {run.get('p99_ttft_ms', 0):.0f} ms, failed {run.get('failed', 0)}")
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"[-3000:]
        progress.write(f"[{name}] FAILED: {entry['error']}")
    finally:
        server.stop()
        entry["port_released"] = not port_in_use(server.port)
    return entry


#: `remote=local` in a config: a store of the config's own, started by this benchmark.
LOCAL_STORE = "local"
#: Added to the local store's URL: on a busy machine an existence check can take far longer than the
#: default 50 ms, which would degrade the store and turn every remote hit into a recompute.
STORE_PARAMS = "&lookup_timeout_ms=2000"


def uses_local_store(config: str) -> bool:
    return not config.startswith("roof") and parse_config(config)[1].get("remote") == LOCAL_STORE


def store_gib(w: Workload, model: ModelSpec, runs: int) -> float:
    """A store's memory: the KV of every run's prompts (each run draws its own) + 25% for headers and
    the allocator's rounding, in 1/64 GiB, at least the store's minimum."""
    dtype_bytes = 4 if model.dtype == "float32" else 2
    need = runs * w.working_set_tokens * model.kv_bytes_per_token(dtype_bytes) * 1.25 / 2**30
    return max(MIN_SEGMENT_GIB, math.ceil(need * 64) / 64)


def run_with_store(name: str, config: str, model: ModelSpec, model_dir: Path, w: Workload, s: Scale,
                   concurrencies: list[int], args, raw_dir: Path, env: dict, progress, on_run) -> dict:
    """A config with `remote=local`: a store of its own on loopback; replica A serves every run, is
    stopped, then replica B (a fresh server, same flags, same store) serves the same runs with the
    same seeds, so B's remote hits are what A left in the store. The entry holds B's runs, A's
    under `writer`, the store under `store`. The store is stopped at the end, whatever happened."""
    base, extra = parse_config(config)
    repeat = max(1, getattr(args, "repeat", None) or s.repeat)
    info: dict = {"segment_gib": store_gib(w, model, len(concurrencies) * repeat)}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    try:
        store = LocalStore.start(segment_gib=info["segment_gib"], run_dir=raw_dir / f"{slug}.store")
    except Exception as e:
        progress.write(f"[{name}] FAILED: the store did not start: {e}")
        return {"config": config, "runs": [], "store": info,
                "error": f"store: {type(e).__name__}: {e}"[-3000:]}
    entry: dict = {"config": config, "runs": []}
    try:
        info["url"] = store.url + STORE_PARAMS
        progress.write(f"[{name}] store of {gib_text(info['segment_gib'])} at {info['url']}")
        bound = unparse_config(base, {**extra, "remote": info["url"]})
        entry["writer"] = run_config(f"{name} A", bound, model, model_dir, w, s, concurrencies, args,
                                     raw_dir, env, progress, lambda _: None)
        if "error" in entry["writer"]:
            entry["error"] = "replica A: " + entry["writer"]["error"]
        else:
            entry = {**run_config(name, bound, model, model_dir, w, s, concurrencies, args, raw_dir, env,
                                  progress, on_run), "writer": entry["writer"]}
    finally:
        store.stop()
        ports = (store.rpc_port, store.metadata_port, store.service_port)
        info["stopped"] = not any(store.alive().values()) and not any(port_in_use(p) for p in ports)
        entry["store"] = info
    return entry


#: The numbers whose range over repeated runs is recorded beside the median run's.
RANGE_KEYS = ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms")


def median_run(tries: list[dict]) -> dict:
    """The run of median throughput among repeats of one concurrency (the lower middle one of an
    even count), with `repeats` (how many) and `range` ([min, max] of RANGE_KEYS over all of them)."""
    if len(tries) == 1:
        return tries[0]
    order = sorted(tries, key=lambda r: r.get("request_throughput", 0.0))
    run = dict(order[(len(order) - 1) // 2])
    run["repeats"] = len(tries)
    run["range"] = {k: [min(r[k] for r in tries), max(r[k] for r in tries)]
                    for k in RANGE_KEYS if all(k in r for r in tries)}
    return run


#: The baseline each ratio is taken against, first present wins; the shared workload's is this
#: plugin without a store (replica B recomputing what A read).
BASELINES = ("offload", "prefix")
SHARED_BASELINES = ("ours", "offload", "prefix")


def ratios(configs: dict, baselines: tuple[str, ...] = BASELINES) -> dict:
    """Each config over the baseline at each concurrency: throughput and TTFT p50 / p99."""
    base = next((b for b in baselines if b in configs and configs[b]["runs"]), None)
    if base is None:
        return {}
    by_c = {r["concurrency"]: r for r in configs[base]["runs"]}
    out = {"baseline": base}
    for name, entry in configs.items():
        if name == base:
            continue
        for r in entry["runs"]:
            b = by_c.get(r["concurrency"])
            if not b:
                continue
            key = f"{name}@{r['concurrency']}"
            out[key] = {
                "throughput": _ratio(r.get("request_throughput"), b.get("request_throughput")),
                "ttft_p50": _ratio(r.get("median_ttft_ms"), b.get("median_ttft_ms")),
                "ttft_p99": _ratio(r.get("p99_ttft_ms"), b.get("p99_ttft_ms")),
            }
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def host_hit_tokens(run: dict) -> float:
    m = run.get("metrics", {})
    return m.get("vllm:tpc_host_hit_tokens_total") or m.get("vllm:external_prefix_cache_hits_total", 0.0)


def remote_hit_tokens(run: dict) -> float:
    """Prompt tokens the store delivered in a run (counted within the host hits too)."""
    return run.get("metrics", {}).get("vllm:tpc_remote_hit_tokens_total", 0.0)


SCHED_HIST = "vllm:tpc_scheduler_seconds_per_request"


def sched_per_request(run: dict) -> str:
    """The adapter's scheduler time per request over a run, p50 and p99 (this plugin's configs)."""
    m = run.get("metrics", {})
    p50, p99 = m.get(f"{SCHED_HIST}_p50"), m.get(f"{SCHED_HIST}_p99")
    return f"{p50 * 1e3:.2f}, {p99 * 1e3:.2f} ms" if p50 is not None and p99 is not None else ""


def print_table(record: dict) -> None:
    rat = record["ratios"]
    base = rat.get("baseline")
    cols = ["config", "conc", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "host hits",
            f"x {base} req/s" if base else "", f"x {base} TTFT p50" if base else "",
            "adapter sched/req p50, p99"]
    # With a store: its hits, and the rows of replica A (which filled it) under B's.
    remote = any("remote=" in e.get("config", "") for e in record["configs"].values())
    if remote:
        cols.insert(7, "remote hits")
    ranged = any("range" in r for e in record["configs"].values() for r in e["runs"])
    if ranged:  # the median of repeated runs, and the range over them
        cols[2:4] = ["req/s (min-max)", "TTFT p50 (min-max)"]
    rows = []
    blank = [""] * (len(cols) - 3)
    for name, entry in _entries(record["configs"]):
        if "error" in entry and not entry["runs"]:
            rows.append([name, "-", "FAILED", *blank])
        for r in entry["runs"]:
            q = rat.get(f"{name}@{r['concurrency']}", {})
            span = r.get("range", {})
            tput = f"{r.get('request_throughput', 0):.2f}"
            ttft = f"{r.get('median_ttft_ms', 0):.0f} ms"
            if "request_throughput" in span:
                tput += " ({:.2f}-{:.2f})".format(*span["request_throughput"])
            if "median_ttft_ms" in span:
                ttft += " ({:.0f}-{:.0f})".format(*span["median_ttft_ms"])
            rows.append([name, str(r["concurrency"]), tput, ttft, f"{r.get('p99_ttft_ms', 0):.0f} ms",
                         f"{r.get('median_tpot_ms', 0):.1f} ms", f"{host_hit_tokens(r):,.0f}",
                         *([f"{remote_hit_tokens(r):,.0f}"] if remote else []),
                         f"{q['throughput']:.2f}x" if q.get("throughput") else "",
                         f"{q['ttft_p50']:.2f}x" if q.get("ttft_p50") else "", sched_per_request(r)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _entries(configs: dict):
    """(name, entry) of every config, each followed by its replica A where it had one."""
    for name, entry in configs.items():
        yield name, entry
        if "writer" in entry:
            yield f"{name} A", entry["writer"]


def plot(record: dict, path: Path) -> Path | None:
    """Throughput, TTFT p50 and TTFT p99 against concurrency, one line per config."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, entry in record["configs"].items():
        runs = entry["runs"]
        if not runs:
            continue
        xs = [r["concurrency"] for r in runs]
        for ax, key in zip(axes, ("request_throughput", "median_ttft_ms", "p99_ttft_ms")):
            ys = [r.get(key, float("nan")) for r in runs]
            lo = [y - r.get("range", {}).get(key, (y, y))[0] for r, y in zip(runs, ys)]
            hi = [r.get("range", {}).get(key, (y, y))[1] - y for r, y in zip(runs, ys)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)  # range of repeats
    for ax, title in zip(axes, ("throughput (req/s)", "TTFT p50 (ms)", "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bench.serve {record['workload']} | {record['model']} | {record['device']} | "
                 f"vLLM {record['versions'].get('vllm')} | {record['date'][:10]}"
                 + (" | partial: runs missing" if record.get("partial") else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, default="prefix")
    p.add_argument("--configs", nargs="+", metavar="CONFIG",
                   help=f"any of {[*CONFIGS, 'roof']}, 'ours:key=value,...' for connector keys; "
                        "'ours:remote=local' shares a store of its own between two replicas in turn "
                        "(default: GPU prefix offload simple ours roof; CPU prefix ours; "
                        "the shared workload: ours ours:remote=local)")
    p.add_argument("--concurrency", nargs="+", type=int, metavar="N",
                   help="requests in flight, run in increasing order (default: GPU 1 4 16 64; CPU 1 4; "
                        "the shared workload: 1 4)")
    p.add_argument("--num-prompts", type=int,
                   help="prompts per concurrency (default: the scale's; the shared workload: its documents, "
                        "GPU 32, CPU 16)")
    p.add_argument("--model", help="a model of bench.models (default: the scale's)")
    p.add_argument("--scale", choices=("gpu", "cpu"), help="default: gpu where CUDA is available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, metavar="R",
                   help="runs of each concurrency; the median and the range are recorded "
                        "(default: GPU 1, CPU 3)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one client run may take")
    p.add_argument("--raw-dir", type=Path, default=ROOT / "serve-raw",
                   help="client JSON, metric snapshots and server logs (not tracked)")
    p.add_argument("--record", type=Path, default=RECORD, help="the JSON-lines record to append to")
    p.add_argument("--chart", type=Path,
                   help="default: bench/results/serve-<workload>.png (serve-<workload>-cpu.png on a CPU)")
    p.add_argument("--label", default="", help="a free-form note stored with the record")
    p.add_argument("--from-raw", type=Path, metavar="DIR",
                   help="append the record a run left in its raw folder DIR (a run cut off before its "
                        "end; marked partial) instead of running anything")
    args = p.parse_args(argv)
    if args.concurrency and min(args.concurrency) < 1:
        p.error("--concurrency: every value must be >= 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        p.error("--num-prompts: must be >= 1")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat: must be >= 1")
    check_args(p.error, args.configs, args.model, extra_configs=("roof",))
    return args


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_raw is not None:
        path = args.from_raw / "record.json"
        if not path.exists():
            print(f"--from-raw: {path} does not exist", file=sys.stderr)
            return 2
        return finish(json.loads(path.read_text()), args)
    gpu = (args.scale or ("gpu" if _has_cuda() else "cpu")) == "gpu"
    s = GPU if gpu else CPU
    if args.workload == "shared":
        s = replace(s, host_gib=s.shared.host_gib, concurrency=s.shared.concurrency)
    model = get_model(args.model or s.model)
    w = make_workload(args.workload, s, args.num_prompts)
    names = args.configs or (["ours", f"ours:remote={LOCAL_STORE}"] if args.workload == "shared" else
                             ["prefix", "offload", "simple", "ours", "roof"] if gpu else ["prefix", "ours"])
    configs = resolve_configs(names, w, model, s)
    concurrencies = sorted(set(args.concurrency or s.concurrency))
    model_dir = model.materialize(MODEL_CACHE)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    raw_dir = args.raw_dir / f"{args.workload}-{stamp:%Y%m%d-%H%M%S}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: v for k, v in s.env.items() if k not in os.environ},
           "PYTHONUNBUFFERED": "1"}
    if any(uses_local_store(c) for c in configs.values()):
        # Replicas share blocks only where their block hashes agree; vLLM 0.26 seeds them at random
        # without PYTHONHASHSEED, and the plugin then refuses `remote`. Every config gets the same.
        env.setdefault("PYTHONHASHSEED", "0")
    record = {
        **record_head("serve"), "workload": args.workload, "label": args.label,
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.serve", *(argv or sys.argv[1:])]),
        "model": model.name, "kv_gib": s.kv_gib, "host_gib": s.host_gib,
        "max_model_len": s.max_model_len, "num_prompts": w.num_prompts, "repeat": args.repeat or s.repeat,
        "working_set_tokens": w.working_set_tokens, "concurrency": concurrencies,
        "env": {k: env[k] for k in sorted(env) if k.startswith(("VLLM_", "TPC_", "NCCL_", "PYTHONHASHSEED"))},
        "configs": {},
    }
    print(f"# {record['command']}\n# {record['device']} | vLLM {record['versions']['vllm']} | "
          f"{model.name} | KV {gib_text(s.kv_gib)} | host tiers {gib_text(s.host_gib)} | workload "
          f"{args.workload}: {w.num_prompts} requests per concurrency, working set "
          f"{w.working_set_tokens:,} tokens | raw files {raw_dir}", flush=True)
    from tqdm import tqdm

    # The record so far, rewritten after every run: a run cut off (a lease ending) leaves it in
    # the raw folder, and `--from-raw` appends it later.
    progress_file = raw_dir / "record.json"
    record["partial"] = True
    progress_file.write_text(json.dumps(record))
    replicas = sum(2 if uses_local_store(c) else 1 for c in configs.values())
    with tqdm(total=replicas * len(concurrencies), desc="runs", file=sys.stderr) as progress:
        for name, config in configs.items():
            def on_run(entry: dict, name: str = name) -> None:
                record["configs"][name] = entry
                progress_file.write_text(json.dumps(record))

            run = run_with_store if uses_local_store(config) else run_config
            record["configs"][name] = run(name, config, model, model_dir, w, s, concurrencies,
                                          args, raw_dir, env, progress, on_run)
    record["partial"] = False
    progress_file.write_text(json.dumps(record))
    return finish(record, args)


def finish(record: dict, args) -> int:
    """Ratios, the table, one line appended to the record, the chart."""
    record["ratios"] = ratios(record["configs"],
                              SHARED_BASELINES if record["workload"] == "shared" else BASELINES)
    print()
    print_table(record)
    append_record("serve", record, args.record)
    chart = plot(record, args.chart or chart_path("serve", record["workload"], record["device"]))
    print(f"\nappended to {args.record}" + (f"\nchart {chart}" if chart else ""))
    failed = [n for n, e in record["configs"].items()
              if "error" in e or e.get("store", {}).get("stopped") is False]
    return 1 if failed or record.get("partial") else 0


if __name__ == "__main__":
    sys.exit(main())
