"""Scheduler time: what each connector's scheduler half spends per request, without an engine.

    python -m bench.sched_time                    # 8k- and 128k-token prompts, Llama-3.1-8B shape

Both scheduler halves (ours and vLLM's OffloadingConnector) get the same vLLM Request objects and
host tiers holding prompt A's blocks; get_num_new_matched_tokens (key derivation + lookup) is timed
for fresh requests of A (every block hits) and of random prompts (the first block misses), median
of --reps. Target: ours at most half of OffloadingConnector's, at 8k and at 128k tokens.
The in-engine counterpart is the `conn_lookup_ms` column of `python -m bench.compare`.
Then one scheduling pass (`run_pass`): --pass-requests waiting requests of --pass-blocks blocks,
every block in the host tier, asked about again after the index changed, with each index backend
that runs natively (the device table only where CUDA is). Target: the pass's batched match (its
first question) < 0.5 ms with the device table; key derivation is timed on its own.
Output: one line appended to bench/results.jsonl (kind "sched") and the chart
bench/results/sched-<model>.png (microseconds per request, both connectors, hit and miss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import chart_beside, environment, save_run

GiB = 1 << 30


def token_sampler(args: argparse.Namespace, seed: int):
    from bench.models import get_model

    vocab = get_model(args.model).vocab_size
    rng = random.Random(seed)
    return lambda n: [rng.randrange(100, vocab - 1) for _ in range(n)]


def run_sched_micro(args: argparse.Namespace) -> dict:
    """Scheduler time without an engine: both connectors' scheduler halves, the same Request objects.

    Each host tier first holds prompt A's blocks (ours through the connector's `host_tier`,
    OffloadingConnector's through its manager's prepare_store/complete_store); then
    get_num_new_matched_tokens is timed for fresh requests of A (all blocks hit) and of random
    prompts (first block misses), at 8k and --long-tokens tokens, median of --reps. Our index uses
    index_backend "auto": the CPU table, as in an engine.
    """
    import torch
    import triton_prefix_cache_vllm
    from vllm import SamplingParams
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.request import Request

    from bench.models import get_model
    from triton_prefix_cache.keys import keys_from_block_hashes

    triton_prefix_cache_vllm.register()
    spec_m = get_model(args.model)
    path = spec_m.materialize(Path(tempfile.gettempdir()) / "tpc-models")
    bs = 16
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")

    def vconfig(kvt: dict):
        return EngineArgs(
            model=str(path),
            load_format="dummy",
            skip_tokenizer_init=True,
            block_size=bs,
            max_model_len=args.long_tokens + 64,
            kv_transfer_config=kvt,
        ).create_engine_config()

    spec = FullAttentionSpec(
        block_size=bs, num_kv_heads=spec_m.num_kv_heads, head_size=spec_m.head_dim, dtype=torch.bfloat16
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(spec_m.num_layers)]
    # vLLM 0.26's OffloadingConnector sizes its host tier from the KV tensors' sizes (with none it
    # holds 0 blocks, stores nothing and its "hit" case misses); 0.32 sizes it otherwise and
    # describes tensors with other fields, so it gets none.
    nblocks = 4096
    try:
        tensors = [KVCacheTensor(size=spec.page_size_bytes * nblocks, shared_by=[n]) for n in names]
    except TypeError:
        tensors = []
    kvc = KVCacheConfig(num_blocks=nblocks, kv_cache_tensors=tensors,
                        kv_cache_groups=[KVCacheGroupSpec(names, spec)])
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(bs, hash_fn)
    host_bytes = int(args.long_host_gib * GiB)
    tpc = KVConnectorFactory.create_connector(
        vconfig(
            {
                "kv_connector": "TritonPrefixCacheConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"host_cache_gib": args.long_host_gib},
            }
        ),
        KVConnectorRole.SCHEDULER,
        kvc,
    )
    off = KVConnectorFactory.create_connector(
        vconfig(
            {
                "kv_connector": "OffloadingConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"cpu_bytes_to_use": host_bytes},
            }
        ),
        KVConnectorRole.SCHEDULER,
        kvc,
    )
    osched = off.connector_scheduler
    tokens = token_sampler(args, args.seed + 2)
    n_req = [0]

    def request(toks):
        n_req[0] += 1
        return Request(f"r{n_req[0]}", toks, SamplingParams(max_tokens=1), None, block_hasher=hasher)

    def fill(r) -> None:
        k = keys_from_block_hashes(r.block_hashes)
        slots, _, _ = tpc.host_tier.begin_store(k)  # what a completed store of each block leaves
        tpc.host_tier.end_store(slots[slots >= 0].tolist(), True)
        off.on_new_request(r)
        st = osched._req_status[r.request_id]
        st.update_offload_keys()
        keys = st.group_states[0].offload_keys
        # Some versions (vLLM 0.26) store a key only after it was looked up `store_threshold` times.
        for _ in range(getattr(osched.manager, "store_threshold", 0) or 0):
            for k in keys:
                osched.manager.lookup(k, st.req_context)
        osched.manager.prepare_store(keys, st.req_context)
        osched.manager.complete_store(keys, st.req_context, True)

    def timed(conn, r, is_off: bool) -> tuple[float, int]:
        if is_off:
            conn.on_new_request(r)
        t0 = time.perf_counter()
        n, _ = conn.get_num_new_matched_tokens(r, 0)
        return time.perf_counter() - t0, n or 0

    out: dict = {"block_size": bs, "reps": args.reps, "sizes": {}}
    for ntok in (args.doc_tokens, args.long_tokens):
        a = tokens(ntok)
        fill(request(a))
        row: dict = {}
        for name, conn, is_off in (("tpc", tpc, False), ("offload", off, True)):
            hit, miss, got = [], [], (0, 0)
            for _ in range(args.reps):
                th, nh = timed(conn, request(a), is_off)
                tm, nm = timed(conn, request(tokens(ntok)), is_off)
                hit.append(th)
                miss.append(tm)
                got = (nh, nm)
            row[name] = {
                "hit_us": 1e6 * statistics.median(hit),
                "miss_us": 1e6 * statistics.median(miss),
                "hit_tokens": got[0],
                "miss_tokens": got[1],
            }
        if not (row["tpc"]["hit_tokens"] and row["offload"]["hit_tokens"]):
            raise RuntimeError(f"the hit case missed ({row}): the host tiers were not filled; no comparison")
        row["ratio_hit"] = row["tpc"]["hit_us"] / row["offload"]["hit_us"]
        row["ratio_miss"] = row["tpc"]["miss_us"] / row["offload"]["miss_us"]
        out["sizes"][str(ntok)] = row
        print(f"[sched-micro] {ntok} tokens: {json.dumps(row)}", flush=True)
    return out


def run_pass(num_requests: int, num_blocks: int, backend: str, reps: int) -> dict:
    """One scheduling pass over many waiting requests, through the scheduler side's own hook.

    The host tier holds every request's blocks; the requests were asked about before (their keys
    are derived: that derivation is timed on its own); a store completes (the index changes), then
    each request is asked about once, as vLLM asks about the requests waiting for room. On a device
    table the first question's batched match answers all of them (a CPU table answers each request
    alone); the pass is timed whole and its first question alone.
    Median of `reps` passes."""
    from types import SimpleNamespace

    from triton_prefix_cache_vllm.scheduler import SchedulerSide

    from triton_prefix_cache.config import PrefixCacheConfig
    from triton_prefix_cache.keys import keys_from_block_hashes

    layers, page = 32, 1024  # only the slot count matters here
    spec = SimpleNamespace(block_size=16, page_size_bytes=page)
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(
        kv_cache_spec=spec, layer_names=[f"layer.{i}" for i in range(layers)])])
    vc = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=8192, max_num_seqs=256))
    slots = 2 * num_requests * num_blocks
    cfg = PrefixCacheConfig.from_dict({"host_cache_gib": slots * layers * page / 2**30,
                                       "index_backend": backend})
    side = SchedulerSide(cfg, vc, kv)
    rng = random.Random(num_requests * num_blocks)
    reqs = [SimpleNamespace(request_id=f"r{i}", num_tokens=num_blocks * 16 + 1, num_computed_tokens=0,
                            block_hashes=[rng.randbytes(32) for _ in range(num_blocks)])
            for i in range(num_requests)]
    t0 = time.perf_counter()
    keys = [keys_from_block_hashes(r.block_hashes) for r in reqs]
    derive = time.perf_counter() - t0
    for k in keys:
        slots_, _, _ = side.tier.begin_store(k)
        side.tier.end_store(slots_[slots_ >= 0].tolist(), True)
    for r in reqs:  # asked before: their keys derived, each expected by the batcher
        assert side.get_num_new_matched_tokens(r, 0)[0] == num_blocks * 16
    batcher = side.tier.batcher
    passes, matches, launches = [], [], []
    for _ in range(reps):
        extra = keys_from_block_hashes([rng.randbytes(32)])  # a store completes: every answer is stale
        slots_, _, _ = side.tier.begin_store(extra)
        side.tier.end_store(slots_[slots_ >= 0].tolist(), True)
        before = batcher.launches
        t0 = time.perf_counter()
        side.get_num_new_matched_tokens(reqs[0], 0)
        t1 = time.perf_counter()
        for r in reqs[1:]:
            side.get_num_new_matched_tokens(r, 0)
        t2 = time.perf_counter()
        passes.append(t2 - t0)
        matches.append(t1 - t0)
        launches.append(batcher.launches - before)
    return {"requests": num_requests, "blocks": num_blocks, "index_backend": side.tier.backend,
            "pass_ms": 1e3 * statistics.median(passes), "first_question_ms": 1e3 * statistics.median(matches),
            "match_launches_per_pass": max(launches), "key_derivation_ms": 1e3 * derive}


def run_batched_match(num_requests: int, num_blocks: int, backend: str, reps: int) -> dict:
    """The scheduling pass's batched match alone, on a PrefixIndex (no vLLM): a MatchBatcher
    expecting `num_requests` ranges of `num_blocks` keys, all present, answers them in one launch
    after the index changed. Also a lone request's lookup (`count_leading` of one request, the
    launch a request asked about for the first time costs). Checked against a set of the keys;
    median of `reps`."""
    import torch

    from triton_prefix_cache.index import MatchBatcher, PrefixIndex

    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    n = num_requests * num_blocks
    g = torch.Generator().manual_seed(n)
    keys = torch.randint(-(2**62), 2**62, (n + reps, 2), dtype=torch.int64, generator=g)
    idx = PrefixIndex(2 * n, device=device, backend=backend)
    idx.insert(keys[:n].to(device), torch.arange(n, dtype=torch.int32).to(device))
    ranges = keys[:n].view(num_requests, num_blocks, 2)
    b = MatchBatcher(idx, batch=True)  # the batched match on either table
    for i in range(num_requests):  # asked before: each range expected
        b.match(i, 0, ranges[i])
    batched, lone = [], []
    for r in range(reps):
        idx.insert(keys[n + r : n + r + 1].to(device), torch.zeros(1, dtype=torch.int32).to(device))
        t0 = time.perf_counter()
        got = b.match(0, 0, ranges[0])  # the first question: one launch answers every range
        t1 = time.perf_counter()
        batched.append(t1 - t0)
        if got != num_blocks or any(b.match(i, 0, ranges[i]) != num_blocks for i in range(num_requests)):
            raise RuntimeError("the batched match missed keys that are present")
        t0 = time.perf_counter()
        idx.count_leading(ranges[r % num_requests])
        lone.append(time.perf_counter() - t0)
    return {"requests": num_requests, "blocks": num_blocks, "index_backend": idx.backend,
            "device": str(idx.device), "batched_match_ms": 1e3 * statistics.median(batched),
            "lone_request_ms": 1e3 * statistics.median(lone), "launches": b.launches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--doc-tokens", type=int, default=8000)
    p.add_argument("--long-tokens", type=int, default=131072 - 64)
    p.add_argument("--long-host-gib", type=float, default=20.0)  # 128k tokens of Llama-8B KV: 16 GiB
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pass-requests", type=int, default=256, help="requests of the scheduling pass")
    p.add_argument("--pass-blocks", type=int, default=512, help="blocks of each request of the pass")
    p.add_argument("--match-only", action="store_true",
                   help="only the pass's batched match on a bare index, each backend that runs natively "
                   "(no vLLM needed); printed as JSON, appended to the record unless --out")
    p.add_argument("--out", default=None,
                   help="write the result to this JSON file (its chart beside it) instead of appending "
                   "it to bench/results.jsonl")
    args = p.parse_args(argv)
    env = environment()
    print(f"# {env['command']}\n# device: {env['device']} | vllm {env['vllm']}", flush=True)
    if args.match_only:
        rows = [run_batched_match(args.pass_requests, args.pass_blocks, b, max(args.reps, 20))
                for b in (["cpu", "triton"] if torch_cuda() else ["cpu"])]
        print(json.dumps(rows, indent=1))
        print(f"wrote {save_run('sched', {'model': None, 'batched_match': rows}, args.out)}")
        return 0
    res = run_sched_micro(args)
    # The pass, with each index backend that runs natively here (Triton's CPU interpreter does not).
    backends = ["cpu", "triton"] if torch_cuda() else ["cpu"]
    res["pass"] = [run_pass(args.pass_requests, args.pass_blocks, b, args.reps) for b in backends]
    for row in res["pass"]:
        print(f"[sched-pass] {row['requests']} requests x {row['blocks']} blocks, {row['index_backend']} "
              f"index: pass {row['pass_ms']:.2f} ms (its first question: "
              f"{row['first_question_ms']:.2f} ms; {row['match_launches_per_pass']} match launches); key "
              f"derivation {row['key_derivation_ms']:.1f} ms", flush=True)
    summary = {
        f"ratio_{size}_{k}": row[f"ratio_{k}"] for size, row in res["sizes"].items() for k in ("hit", "miss")
    }
    summary["target_met"] = all(v <= 0.5 for v in summary.values())
    path = save_run("sched", {"model": args.model, "summary": summary, **res}, args.out)
    png = plot(res, chart_beside(args.out, "sched", args.model), env["device"])
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}" + (f"\nchart {png}" if png else ""))
    return 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def plot(res: dict, path, device: str) -> str | None:
    """Microseconds per get_num_new_matched_tokens call, ours and OffloadingConnector's, per prompt
    length, hit and miss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = list(res["sizes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, case in zip(axes, ("hit", "miss")):
        for i, (name, label) in enumerate((("tpc", "this plugin"), ("offload", "OffloadingConnector"))):
            ys = [res["sizes"][n][name][f"{case}_us"] for n in sizes]
            ax.bar([x + 0.4 * i for x in range(len(sizes))], ys, 0.4, label=label)
        ax.set_xticks([x + 0.2 for x in range(len(sizes))], [f"{int(n):,} tokens" for n in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("us per request")
        ax.set_title("every block in the host tier" if case == "hit" else "the first block misses")
        ax.legend(fontsize=8)
    fig.suptitle(f"scheduler time per request on {device}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
