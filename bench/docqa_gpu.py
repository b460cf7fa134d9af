"""Document QA on the GPU host: TTFT of this plugin against vLLM's own options, and scheduler time.

Workload (issue 4, item 7): 12 documents x 8,000 tokens + a 32-token question, GPU KV cache capped
at 4 GiB (about a third of the documents), one request at a time, 1 output token (latency = TTFT),
3 rounds in the same document order (the LRU worst case). Llama-3.1-8B shape, dummy weights.
Configurations, each in its own process (a fresh engine, nothing shared):
  nocache        no prefix caching
  builtin        vLLM's prefix caching (GPU only)
  offload        vLLM's built-in CPU offloading (kv_offloading_size, native OffloadingConnector)
  tpc            this plugin, defaults (lazy demotion, async loads)
  tpc_layerwise  this plugin, load="layerwise"
Target: mean TTFT of rounds 2-3 of tpc <= 0.6 x that of offload.

Scheduler time: the time each connector spends in get_num_new_matched_tokens (key derivation +
lookup) per request, measured by wrapping the method in-process, for the 8k documents (from the
runs above) and, with --long, for 128k-token prompts (prompt A, then B, then A again, with a GPU
KV cache that holds one of them: A's second lookup finds most of A in the host tier).
Target: ours <= 0.5 x OffloadingConnector's, at 8k and at 128k. --sched-micro (or --micro-only)
times the same without an engine: both connectors' scheduler halves, identical Request objects, the
host tiers pre-filled with one prompt, hit and miss, in seconds.

Run on the GPU host (vLLM 0.26.0), from the repo root:
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/docqa_gpu.py                 # compiled (CUDA graphs)
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/docqa_gpu.py --eager         # quick check
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/docqa_gpu.py --configs tpc,offload --long
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/docqa_gpu.py --micro-only --merge
Each configuration takes about 1-2 minutes (engine start included); --configs splits a run across
several commands, and --merge adds to an existing result file. Writes
bench/results/compare-docqa-<device>-<date>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_CONFIGS = ("nocache", "builtin", "offload", "tpc", "tpc_layerwise")
GiB = 1 << 30


def engine_kwargs(config: str, args: argparse.Namespace, kv_gib: float, max_len: int) -> dict:
    kw: dict = dict(enable_prefix_caching=config != "nocache")
    tpc_extra = {"host_cache_gib": args.host_gib}
    if config == "offload":
        kw.update(kv_offloading_size=args.host_gib, kv_offloading_backend="native")
    elif config in ("tpc", "tpc_layerwise"):
        if config == "tpc_layerwise":
            tpc_extra["load"] = "layerwise"
        kw["kv_transfer_config"] = {"kv_connector": "TritonPrefixCacheConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": tpc_extra}
    kw.update(kv_cache_memory_bytes=int(kv_gib * GiB), max_model_len=max_len)
    return kw


def make_llm(config: str, args: argparse.Namespace, kv_gib: float, max_len: int, eager: bool):
    from vllm import LLM

    from bench.models import get_model

    path = get_model(args.model).materialize(Path(tempfile.gettempdir()) / "tpc-models")
    return LLM(model=str(path), load_format="dummy", skip_tokenizer_init=True, enforce_eager=eager,
               max_num_seqs=4, seed=0, disable_log_stats=False,
               **engine_kwargs(config, args, kv_gib, max_len))


class SchedTimer:
    """Accumulates the time the engine's connector spends in get_num_new_matched_tokens.

    Requests run one at a time, so the time added during one generate() call is that request's
    (engine-internal request ids need not match the RequestOutput's, so none are matched).
    """

    def __init__(self, llm) -> None:
        self.total = 0.0
        self.calls = 0
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)
        conn = getattr(getattr(core, "scheduler", None), "connector", None)
        self.available = conn is not None
        if conn is None:
            return
        orig = conn.get_num_new_matched_tokens

        def timed(request, num_computed_tokens, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig(request, num_computed_tokens, *a, **k)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        conn.get_num_new_matched_tokens = timed

    def mark(self) -> float:
        return self.total


def metric_values(llm) -> dict:
    vals: dict = {}
    for m in llm.get_metrics():
        v = getattr(m, "value", None)
        if isinstance(v, (int, float)) and ("prefix_cache" in m.name or m.name.startswith("vllm:tpc")):
            vals[m.name] = vals.get(m.name, 0) + v
    return vals


def generate_one(llm, prompt: list[int], max_tokens: int = 1) -> tuple[float, object]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False, logprobs=0)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0]
    return time.perf_counter() - t0, out


def token_sampler(args: argparse.Namespace, seed: int):
    from bench.models import get_model

    vocab = get_model(args.model).vocab_size
    rng = random.Random(seed)
    return lambda n: [rng.randrange(100, vocab - 1) for _ in range(n)]


def run_docqa(config: str, args: argparse.Namespace) -> dict:
    tokens = token_sampler(args, args.seed)
    docs = [tokens(args.doc_tokens) for _ in range(args.docs)]
    qs = [[tokens(args.question_tokens) for _ in docs] for _ in range(args.rounds)]
    t0 = time.perf_counter()
    llm = make_llm(config, args, args.kv_gib, args.doc_tokens + args.question_tokens + 64, args.eager)
    start_s = time.perf_counter() - t0
    # Warm-up on tokens no round uses (first-call costs: allocator, graphs, kernel compiles).
    generate_one(llm, tokens(min(2048, args.doc_tokens)))
    timer = SchedTimer(llm)
    rounds = []
    for r in range(args.rounds):
        rows = []
        for d, doc in enumerate(docs):
            t_sched = timer.mark()
            secs, out = generate_one(llm, doc + qs[r][d])
            sched_s = timer.mark() - t_sched
            c = out.outputs[0]
            rows.append({"doc": d, "ttft_ms": 1e3 * secs, "cached_tokens": out.num_cached_tokens or 0,
                         "token": c.token_ids[0], "logprob": c.logprobs[0][c.token_ids[0]].logprob,
                         "sched_us": 1e6 * sched_s if timer.available else None})
        rounds.append(rows)
        print(f"[{config}] round {r + 1}: mean TTFT {statistics.mean(x['ttft_ms'] for x in rows):.1f} ms, "
              f"cached {sum(x['cached_tokens'] for x in rows)} tokens", flush=True)
    res = {"config": config, "engine_start_s": start_s, "rounds": rounds,
           "mean_ttft_ms": [statistics.mean(x["ttft_ms"] for x in rows) for rows in rounds],
           "metrics": metric_values(llm)}
    if args.rounds >= 3:
        res["mean_ttft_rounds_2_3_ms"] = statistics.mean(x["ttft_ms"] for rows in rounds[1:3] for x in rows)
    if timer.available:
        res["sched_us_per_request"] = {
            "round1": statistics.mean(x["sched_us"] for x in rounds[0]),
            "later": (statistics.mean(x["sched_us"] for rows in rounds[1:] for x in rows)
                      if len(rounds) > 1 else None),
        }
    return res


def run_long(config: str, args: argparse.Namespace) -> dict:
    """Scheduler time at 128k tokens: A (cold), B (A in the host tier, B misses), A again (host hits)."""
    n = args.long_tokens
    tokens = token_sampler(args, args.seed + 1)
    a, b = tokens(n), tokens(n)
    kv_gib = 1.1 * n * 128 * 1024 / GiB  # holds one prompt (Llama-3.1-8B: 128 KiB per token)
    llm = make_llm(config, args, kv_gib, n + 64, eager=True)
    timer = SchedTimer(llm)
    out = {"config": config, "prompt_tokens": n, "kv_gib": kv_gib, "steps": []}
    for name, prompt in (("A_cold", a), ("B_miss", b), ("A_again", a)):
        t_sched = timer.mark()
        secs, o = generate_one(llm, prompt)
        out["steps"].append({"name": name, "ttft_ms": 1e3 * secs, "cached_tokens": o.num_cached_tokens or 0,
                             "sched_us": 1e6 * (timer.mark() - t_sched) if timer.available else None})
        print(f"[{config} long] {out['steps'][-1]}", flush=True)
    out["metrics"] = metric_values(llm)
    return out


def run_sched_micro(args: argparse.Namespace) -> dict:
    """Scheduler time without an engine: both connectors' scheduler halves, the same Request objects.

    Each host tier first holds prompt A's blocks (ours through the TierManager, OffloadingConnector's
    through its manager's prepare_store/complete_store); then get_num_new_matched_tokens is timed
    for fresh requests of A (all blocks hit) and of random prompts (first block misses), at 8k and
    --long-tokens tokens, median of --micro-reps. Our index uses index_backend "auto" (the Triton
    table on this GPU).
    """
    import torch
    from vllm import SamplingParams
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    import triton_prefix_cache_vllm
    from bench.models import get_model
    from triton_prefix_cache.keys import keys_from_block_hashes

    triton_prefix_cache_vllm.register()
    spec_m = get_model(args.model)
    path = spec_m.materialize(Path(tempfile.gettempdir()) / "tpc-models")
    bs = 16
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")

    def vconfig(kvt: dict):
        return EngineArgs(model=str(path), load_format="dummy", skip_tokenizer_init=True, block_size=bs,
                          max_model_len=args.long_tokens + 64, kv_transfer_config=kvt).create_engine_config()

    spec = FullAttentionSpec(block_size=bs, num_kv_heads=spec_m.num_kv_heads, head_size=spec_m.head_dim,
                             dtype=torch.bfloat16)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(spec_m.num_layers)]
    kvc = KVCacheConfig(num_blocks=4096, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)])
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(bs, hash_fn)
    host_bytes = int(args.long_host_gib * GiB)
    tpc = KVConnectorFactory.create_connector(vconfig({
        "kv_connector": "TritonPrefixCacheConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"host_cache_gib": args.long_host_gib}}), KVConnectorRole.SCHEDULER, kvc)
    off = KVConnectorFactory.create_connector(vconfig({
        "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes_to_use": host_bytes}}), KVConnectorRole.SCHEDULER, kvc)
    osched = off.connector_scheduler
    tokens = token_sampler(args, args.seed + 2)
    n_req = [0]

    def request(toks):
        n_req[0] += 1
        return Request(f"r{n_req[0]}", toks, SamplingParams(max_tokens=1), None, block_hasher=hasher)

    def fill(r) -> None:
        k = keys_from_block_hashes(r.block_hashes)
        slots, _, _ = tpc._sched.tier.begin_store(k)
        tpc._sched.tier.end_store(slots[slots >= 0].tolist(), True)
        off.on_new_request(r)
        st = osched._req_status[r.request_id]
        st.update_offload_keys()
        keys = st.group_states[0].offload_keys
        osched.manager.prepare_store(keys, st.req_context)
        osched.manager.complete_store(keys, st.req_context, True)

    def timed(conn, r, is_off: bool) -> tuple[float, int]:
        if is_off:
            conn.on_new_request(r)
        t0 = time.perf_counter()
        n, _ = conn.get_num_new_matched_tokens(r, 0)
        return time.perf_counter() - t0, n or 0

    out: dict = {"block_size": bs, "reps": args.micro_reps, "sizes": {}}
    for ntok in (args.doc_tokens, args.long_tokens):
        a = tokens(ntok)
        fill(request(a))
        row: dict = {}
        for name, conn, is_off in (("tpc", tpc, False), ("offload", off, True)):
            hit, miss, got = [], [], (0, 0)
            for _ in range(args.micro_reps):
                th, nh = timed(conn, request(a), is_off)
                tm, nm = timed(conn, request(tokens(ntok)), is_off)
                hit.append(th)
                miss.append(tm)
                got = (nh, nm)
            row[name] = {"hit_us": 1e6 * statistics.median(hit), "miss_us": 1e6 * statistics.median(miss),
                         "hit_tokens": got[0], "miss_tokens": got[1]}
        row["ratio_hit"] = row["tpc"]["hit_us"] / row["offload"]["hit_us"]
        row["ratio_miss"] = row["tpc"]["miss_us"] / row["offload"]["miss_us"]
        out["sizes"][str(ntok)] = row
        print(f"[sched-micro] {ntok} tokens: {json.dumps(row)}", flush=True)
    return out


def child(args: argparse.Namespace) -> None:
    if args.child == "sched_micro":
        res = run_sched_micro(args)
    else:
        res = run_long(args.child, args) if args.long_child else run_docqa(args.child, args)
    Path(args.child_out).write_text(json.dumps(res))


def summarize(results: dict) -> dict:
    s: dict = {}
    dq = results.get("docqa", {})
    if "tpc" in dq and "offload" in dq:
        s["ttft_rounds_2_3_ratio_tpc_vs_offload"] = (dq["tpc"]["mean_ttft_rounds_2_3_ms"]
                                                     / dq["offload"]["mean_ttft_rounds_2_3_ms"])
        s["ttft_target_met"] = s["ttft_rounds_2_3_ratio_tpc_vs_offload"] <= 0.6
    if "tpc_layerwise" in dq and "offload" in dq:
        s["ttft_rounds_2_3_ratio_tpc_layerwise_vs_offload"] = (dq["tpc_layerwise"]["mean_ttft_rounds_2_3_ms"]
                                                               / dq["offload"]["mean_ttft_rounds_2_3_ms"])
    for key in ("round1", "later"):
        try:
            s[f"sched_ratio_8k_{key}"] = (dq["tpc"]["sched_us_per_request"][key]
                                          / dq["offload"]["sched_us_per_request"][key])
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    micro = results.get("sched_micro", {}).get("sched_micro", {})
    for size, row in micro.get("sizes", {}).items():
        s[f"sched_micro_ratio_{size}_hit"] = row["ratio_hit"]
        s[f"sched_micro_ratio_{size}_miss"] = row["ratio_miss"]
    lg = results.get("long", {})
    if "tpc" in lg and "offload" in lg:
        for i, step in enumerate(lg["tpc"]["steps"]):
            s[f"sched_ratio_128k_{step['name']}"] = step["sched_us"] / lg["offload"]["steps"][i]["sched_us"]
    # Same prefill boundaries -> compare the sampled token's logprob (dummy weights: near-tied logits).
    if "builtin" in dq:
        for c in ("tpc", "tpc_layerwise", "offload"):
            if c in dq:
                s[f"max_logprob_diff_{c}_vs_builtin"] = max(
                    abs(x["logprob"] - y["logprob"])
                    for rx, ry in zip(dq[c]["rounds"], dq["builtin"]["rounds"]) for x, y in zip(rx, ry))
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(ALL_CONFIGS))
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--docs", type=int, default=12)
    p.add_argument("--doc-tokens", type=int, default=8000)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--host-gib", type=float, default=16.0)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled, CUDA graphs)")
    p.add_argument("--long", action="store_true", help="also measure scheduler time at --long-tokens")
    p.add_argument("--long-only", action="store_true")
    p.add_argument("--micro-only", action="store_true",
                   help="only the engine-free scheduler-time measurement")
    p.add_argument("--long-tokens", type=int, default=131072 - 64)
    p.add_argument("--long-host-gib", type=float, default=40.0)
    p.add_argument("--sched-micro", action="store_true",
                   help="also time both connectors' scheduler halves without an engine (seconds)")
    p.add_argument("--micro-reps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--merge", action="store_true", help="add to the result file instead of replacing it")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--long-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.child:
        return child(args)

    from bench.common import RESULTS, device_slug, environment, write_result

    import datetime

    out = Path(args.out) if args.out else RESULTS / (
        f"compare-docqa-{device_slug()}-{datetime.date.today().isoformat()}"
        f"{'-eager' if args.eager else ''}.json")
    payload = json.loads(out.read_text()) if args.merge and out.exists() else {}
    payload.setdefault("runs", []).append(environment())
    payload["workload"] = {k: getattr(args, k) for k in ("model", "docs", "doc_tokens", "question_tokens",
                                                         "rounds", "kv_gib", "host_gib", "eager", "seed")}
    results = payload.setdefault("results", {})
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in ALL_CONFIGS:
            raise SystemExit(f"--configs: unknown config {c!r}; known: {list(ALL_CONFIGS)}")
    jobs = [] if (args.long_only or args.micro_only) else [("docqa", c) for c in configs]
    if args.long or args.long_only:
        jobs += [("long", c) for c in configs if c in ("tpc", "offload")]
    if args.sched_micro or args.micro_only:
        jobs.append(("sched_micro", "sched_micro"))
    for kind, c in jobs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", c, "--child-out", tmp,
               *sys.argv[1:]]
        if kind == "long":
            cmd += ["--long-child", "--host-gib", str(args.long_host_gib)]
        print(f"=== {kind} {c}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=str(ROOT)).returncode
        if rc != 0:
            results.setdefault(kind, {})[c] = {"error": f"exit code {rc}"}
            print(f"=== {kind} {c} FAILED (rc={rc})", flush=True)
            continue
        results.setdefault(kind, {})[c] = json.loads(Path(tmp).read_text())
        results[kind][c]["wall_s"] = time.perf_counter() - t0
        os.unlink(tmp)
        payload["summary"] = summarize(results)
        write_result("compare-docqa", payload, out)  # after every config: a partial run still leaves data
    payload["summary"] = summarize(results)
    path = write_result("compare-docqa", payload, out)
    print(json.dumps(payload["summary"], indent=2))
    for c, r in results.get("docqa", {}).items():
        if "mean_ttft_ms" in r:
            print(f"{c:14s} TTFT per round (ms): {[round(x, 1) for x in r['mean_ttft_ms']]}"
                  f"  sched us/req: {r.get('sched_us_per_request')}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
