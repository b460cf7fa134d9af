"""Step time: what the adapter's scheduler half adds to every engine step, without an engine.

    python -m bench.step_time                         # 16 and 64 running requests, CPU table
    python -m bench.step_time --requests 64 --index-backend triton

R requests of --prompt-tokens are admitted together, then decode one token a step; a request's
block fills every 16 steps, at the same step for all of them (the worst case: every request
hands a block to write-through demotion at once). Each step calls what the engine calls once a
step: `update_connector_output` with the previous step's stores reported done, then
`build_connector_meta` (which plans this step's stores), on a real vLLM BlockPool. Reported: the
adapter's time per step, p50 / p99 / mean, over --steps steps (the step after admission apart:
it stores every prompt block), and the same for the steps that store. The counterpart in an engine
is `tpc_step_seconds`. Output: one line appended to bench/results.jsonl (kind "step").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

from bench.common import environment, save_run

BLOCK = 16


def run_steps(num_requests: int, steps: int, prompt_tokens: int, index_backend: str,
              num_layers: int = 32) -> dict:
    """One simulated run: per-step seconds of the adapter's two per-step hooks."""
    from triton_prefix_cache_vllm import compat
    from triton_prefix_cache_vllm.metadata import TPCWorkerMetadata
    from triton_prefix_cache_vllm.scheduler import SchedulerSide
    from vllm.v1.core.block_pool import BlockPool

    from triton_prefix_cache.config import PrefixCacheConfig

    page = 1024  # bytes per layer and block: only the slot count matters here
    spec = SimpleNamespace(block_size=BLOCK, page_size_bytes=page)
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(
        kv_cache_spec=spec, layer_names=[f"layer.{i}" for i in range(num_layers)])])
    vc = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=8192, max_num_seqs=256))
    blocks_per_req = -(-(prompt_tokens + steps) // BLOCK) + 1
    slots = 4 * num_requests * blocks_per_req  # the host tier never evicts here
    cfg = PrefixCacheConfig.from_dict({"host_cache_gib": slots * num_layers * page / 2**30,
                                       "index_backend": index_backend})
    side = SchedulerSide(cfg, vc, kv)
    pool = BlockPool(num_gpu_blocks=num_requests * blocks_per_req + 1, enable_caching=True,
                     hash_block_size=BLOCK)
    side.bind_gpu_block_pool(pool)
    counter = iter(range(1, 1 << 62))

    def allocate(req, n: int) -> list[int]:
        blocks = pool.get_new_blocks(n)
        hashes = [next(counter).to_bytes(8, "little") * 4 for _ in range(n)]
        for b, h in zip(blocks, hashes):
            cached = compat.cached_hash(h)
            if hasattr(b, "set_block_hash"):
                b.set_block_hash(cached)
            else:
                b.block_hash = cached
        req.block_hashes.extend(hashes)
        return [b.block_id for b in blocks]

    def cached_reqs():
        return SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set())

    def step(so, report) -> tuple[float, object]:
        t0 = time.perf_counter()
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=report))
        meta = side.build_connector_meta(so)
        return time.perf_counter() - t0, meta

    reqs = [SimpleNamespace(request_id=f"r{i}", block_hashes=[], num_tokens=prompt_tokens + 1,
                            num_computed_tokens=0) for i in range(num_requests)]
    admitted = []
    for r in reqs:  # the admission step: every request asked about, allocated, prefilled
        ids = allocate(r, prompt_tokens // BLOCK)
        side.get_num_new_matched_tokens(r, 0)
        side.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda ids=ids: (ids,)), 0)
        admitted.append(SimpleNamespace(req_id=r.request_id, block_ids=(ids,)))
        r.num_computed_tokens = prompt_tokens
    so = SimpleNamespace(num_scheduled_tokens={r.request_id: prompt_tokens for r in reqs},
                         scheduled_new_reqs=admitted, scheduled_cached_reqs=cached_reqs())
    step(so, TPCWorkerMetadata())  # plans nothing: a request's blocks are stored from the next step
    every, storing, stored = [], [], 0
    meta = None
    for s in range(steps + 1):
        cached = cached_reqs()
        for r in reqs:
            if s:
                r.num_computed_tokens += 1
                r.num_tokens += 1
            cached.req_ids.append(r.request_id)
            # the token this step computes opens a new block
            opens = s and r.num_computed_tokens % BLOCK == 1
            cached.new_block_ids.append((allocate(r, 1),) if opens else None)
        so = SimpleNamespace(num_scheduled_tokens={r.request_id: 1 for r in reqs}, scheduled_new_reqs=[],
                             scheduled_cached_reqs=cached)
        report = TPCWorkerMetadata(stores_done=[j.job_id for j in meta.stores] if meta else [])
        dt, meta = step(so, report)
        n = sum(len(j.block_ids) for j in meta.stores)
        stored += n
        if s == 0:  # every prompt block: reported apart
            first = dt
            continue
        every.append(dt)
        if n:
            storing.append(dt)
    if not storing:
        raise RuntimeError("no decode step stored a block: the run measured nothing it claims to")

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"p50_us": 1e6 * xs[len(xs) // 2], "p99_us": 1e6 * xs[min(len(xs) - 1, int(len(xs) * 0.99))],
                "mean_us": 1e6 * sum(xs) / len(xs), "steps": len(xs)}

    return {"requests": num_requests, "index_backend": side.tier.backend, "prompt_blocks_us": 1e6 * first,
            "prompt_blocks": num_requests * (prompt_tokens // BLOCK), "blocks_stored": stored,
            "every_step": stats(every), "storing_steps": stats(storing)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, nargs="+", default=[16, 64], metavar="R")
    p.add_argument("--steps", type=int, default=320, help="decode steps (a multiple of 16 stores evenly)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--index-backend", default="auto", choices=("auto", "cpu", "triton"))
    p.add_argument("--out", default=None,
                   help="write the result to this JSON file instead of appending it to bench/results.jsonl")
    args = p.parse_args(argv)
    if min(args.requests) < 1 or args.steps < 16 or args.prompt_tokens < BLOCK:
        p.error("--requests >= 1, --steps >= 16 and --prompt-tokens >= 16")
    env = environment()
    print(f"# {env['command']}\n# device: {env['device']} | vllm {env['vllm']}", flush=True)
    runs = []
    for r in args.requests:
        run = run_steps(r, args.steps, args.prompt_tokens, args.index_backend)
        runs.append(run)
        e, s = run["every_step"], run["storing_steps"]
        print(f"[step] {r} requests ({run['index_backend']} index): every step p50 {e['p50_us']:.0f} us, "
              f"mean {e['mean_us']:.0f} us; steps that store {r} blocks: p50 {s['p50_us']:.0f} us; "
              f"the step storing the {run['prompt_blocks']} prompt blocks {run['prompt_blocks_us']:.0f} us",
              flush=True)
    path = save_run("step", {"prompt_tokens": args.prompt_tokens, "decode_steps": args.steps, "runs": runs},
                    args.out)
    print(json.dumps({f"{r['requests']}": r["every_step"]["mean_us"] for r in runs}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
