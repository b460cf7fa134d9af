"""The scheduler half without an engine: how each load runs, deferral, and the counters that say
whether demotion keeps up (a real vLLM BlockPool, fake requests and scheduler outputs)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from triton_prefix_cache.config import PrefixCacheConfig
from triton_prefix_cache.keys import keys_from_block_hashes

pytestmark = pytest.mark.vllm

BLOCK = 32


def _side(**extra):
    from triton_prefix_cache_vllm.scheduler import SchedulerSide

    spec = SimpleNamespace(block_size=BLOCK, page_size_bytes=1024)
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["l0", "l1"])])
    vc = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=256, max_num_seqs=8))
    cfg = PrefixCacheConfig.from_dict({"host_cache_gib": 64 * 2048 / 2**30, **extra})
    return SchedulerSide(cfg, vc, kv)


def _hashes(n: int, base: int) -> list[bytes]:
    return [(base + i).to_bytes(4, "little") * 8 for i in range(n)]


def _store(side, hashes) -> None:
    slots, _, _ = side.tier.begin_store(keys_from_block_hashes(hashes))
    side.tier.end_store(slots[slots >= 0].tolist(), ok=True)


def _request(req_id: str, hashes: list[bytes]):
    return SimpleNamespace(request_id=req_id, block_hashes=hashes, num_tokens=len(hashes) * BLOCK + 1,
                           num_computed_tokens=0)


def _step(side, *running: str) -> None:
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set())
    side.build_connector_meta(SimpleNamespace(num_scheduled_tokens=dict.fromkeys(running, 1),
                                              scheduled_new_reqs=[], scheduled_cached_reqs=cached))


@pytest.mark.parametrize("mode", ["auto", "layerwise", "async"])
def test_each_load_runs_as_its_mode_says(mode):
    side = _side(load=mode)
    hashes = _hashes(4, 0)
    _store(side, hashes)
    alone = side.get_num_new_matched_tokens(_request("a", hashes), 0)
    _step(side, "other")  # another request runs: a layer-wise load would stall its decode
    beside = side.get_num_new_matched_tokens(_request("b", hashes), 0)
    want_alone, want_beside = {"auto": (False, True), "layerwise": (False, False),
                               "async": (True, True)}[mode]
    assert alone == (4 * BLOCK, want_alone) and beside == (4 * BLOCK, want_beside)
    side.request_finished(_request("other", []), [])  # a finished request no longer counts
    assert side.get_num_new_matched_tokens(_request("c", hashes), 0) == (4 * BLOCK, want_alone)


def _admit(side, req, n_blocks: int) -> None:
    """vLLM allocates the request's blocks for a hit of n_blocks and the step hands its load over."""
    blocks = SimpleNamespace(get_block_ids=lambda: (list(range(10, 10 + n_blocks + 1)),))
    side.update_state_after_alloc(req, blocks, n_blocks * BLOCK)


def _report(side, **done) -> None:
    from triton_prefix_cache_vllm.metadata import TPCWorkerMetadata

    side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=TPCWorkerMetadata(**done)))


@pytest.mark.parametrize("mode", ["auto", "layerwise", "async"])
def test_a_prefix_an_async_load_reads_is_asked_again_later(mode):
    """vLLM caches an async load's blocks only when it completes: a request asking about the same
    prefix meanwhile is asked again later (then it hits them in VRAM). A layer-wise load's blocks
    are cached at allocation, so vLLM's own lookup finds them: no deferral."""
    side = _side(load=mode)
    hashes = _hashes(3, 100)
    _store(side, hashes)
    _step(side, "other")  # a request runs: auto loads async
    n, async_ = side.get_num_new_matched_tokens(_request("a", hashes), 0)
    assert n == 3 * BLOCK and async_ is (mode != "layerwise")
    _admit(side, _request("a", hashes), 3)
    _step(side, "other")
    b = side.get_num_new_matched_tokens(_request("b", hashes), 0)
    if mode == "layerwise":
        assert b[0] == 3 * BLOCK and side.stats.data["deferred_requests"] == 0
        return
    assert b == (None, False) and side.stats.data["deferred_requests"] == 1
    _report(side, loads_done=["a"])
    assert side.get_num_new_matched_tokens(_request("b", hashes), 0)[0] == 3 * BLOCK


def test_a_request_whose_load_failed_recomputes():
    """After a failed load vLLM frees the request's blocks and asks again; offering the same hit
    again could leave it at the head of the queue waiting for room it cannot get."""
    side = _side(load="async")
    hashes = _hashes(3, 200)
    _store(side, hashes)
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, True)
    _admit(side, req, 3)
    _step(side)
    _report(side, loads_failed=["a"])
    assert side.stats.data["failed_loads"] == 1
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    assert side.get_num_new_matched_tokens(_request("b", hashes), 0) == (3 * BLOCK, True)


def test_evictions_without_a_host_copy_count_as_missed_demotions():
    from triton_prefix_cache_vllm import compat
    from vllm.v1.core.block_pool import BlockPool

    side = _side(demote="lazy")
    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=BLOCK)
    side.bind_gpu_block_pool(pool)
    free = list(compat.iter_free_blocks(pool))[:4]
    hashes = _hashes(4, 200)
    for b, h in zip(free, hashes):
        cached = compat.cached_hash(h)
        if hasattr(b, "set_block_hash"):
            b.set_block_hash(cached)
        else:
            b.block_hash = cached
    _store(side, hashes[:1])  # a host copy
    slots, _, _ = side.tier.begin_store(keys_from_block_hashes(hashes[1:2]))
    side.tier.end_store(slots.tolist(), ok=False)  # its store failed: no copy
    side.tier.begin_store(keys_from_block_hashes(hashes[2:3]))  # being stored: a copy on its way
    # hashes[3]: never stored
    got = pool.get_new_blocks(5)  # vLLM reuses the four and one hashless block (not counted)
    assert [b.block_id for b in got][:4] == [b.block_id for b in free]
    _step(side)
    assert side.stats.data.get("missed_demotions", 0) == 2


def test_scheduler_time_per_request_and_host_evictions_reach_the_stats():
    from triton_prefix_cache_vllm.stats import TPCStats

    side = _side()
    hashes = _hashes(2, 300)
    _store(side, hashes)
    req = _request("a", hashes)
    side.get_num_new_matched_tokens(req, 0)
    side.request_finished(req, [])
    _store(side, _hashes(side.tier.num_slots, 1000))  # a full tier: the 2 above are evicted
    _store(side, _hashes(3, 5000))  # and 3 more
    s = side.get_stats()
    assert len(s.data["sched_request_seconds"]) == 1 and s.data["sched_request_seconds"][0] > 0
    assert s.data["host_evictions"] == 5
    merged = TPCStats().aggregate(s).aggregate(s)
    assert len(merged.data["sched_request_seconds"]) == 2
    assert side.get_stats() is None or side.get_stats().data.get("host_evictions", 0) == 0


def test_diagnostics_hold_partial_hits_and_host_tier_counters():
    """The scheduler side's public read-out: the latest partial hits (a hole here: the second block
    is missing, the third is there) and the host tier's counters, as plain values."""
    side = _side()
    hashes = _hashes(3, 400)
    _store(side, [hashes[0], hashes[2]])
    assert side.get_num_new_matched_tokens(_request("a", hashes), 0) == (BLOCK, False)
    d = side.diagnostics()
    assert d.role == "scheduler" and not d.recent_loads and not d.step_timings
    (hit,) = d.recent_partial_hits
    assert (hit["req"], hit["host_blocks"], hit["next_key"], hit["later_in_host"]) == ("a", 1, "absent", 1)
    assert d.host_tier["stores_completed"] == 2 and d.host_tier["ready_slots"] == 2
    side.recent_partial_hits.clear()
    assert len(d.recent_partial_hits) == 1  # a snapshot: it does not follow the connector


def test_auto_counts_requests_admitted_earlier_in_the_same_pass():
    side = _side(load="auto")
    hashes = _hashes(2, 300)
    _store(side, hashes)
    assert side.get_num_new_matched_tokens(_request("a", hashes), 0) == (2 * BLOCK, False)
    _admit(side, _request("a", hashes), 2)  # a runs in this step, its load layer-wise
    assert side.get_num_new_matched_tokens(_request("b", hashes), 0) == (2 * BLOCK, True)


def test_requests_still_waiting_are_looked_up_in_one_launch_per_index_state():
    """vLLM asks about each waiting request again every step: after the index changes, the first
    question answers the others too (one match launch), with what each alone would get; an
    admitted request drops out. The counters reach the stats."""
    side = _side()
    side.tier.batcher.batch = True  # as on a device table (a CPU table answers each alone)
    prefixes = [_hashes(3, 400 + 10 * i) for i in range(3)]
    for h in prefixes[:2]:
        _store(side, h)
    reqs = [_request(f"r{i}", h) for i, h in enumerate(prefixes)]

    def ask_all(expect):
        assert [side.get_num_new_matched_tokens(r, 0)[0] for r in reqs] == [n * BLOCK for n in expect]

    ask_all([3, 3, 0])  # first questions: launches of their own
    b = side.tier.batcher
    launches, probed = b.launches, b.requests_probed
    ask_all([3, 3, 0])  # the same pass again: answered from the last launches
    assert b.launches == launches
    _store(side, prefixes[2][:2])  # a store completes: every answer is out of date
    # One launch for the three (r2 by its first block, the only key of a miss derived), then r2's
    # whole range once its first block hits.
    ask_all([3, 3, 2])
    assert (b.launches, b.requests_probed) == (launches + 2, probed + 4)
    _admit(side, reqs[0], 3)
    _store(side, prefixes[2][2:])
    assert side.get_num_new_matched_tokens(reqs[2], 0)[0] == 3 * BLOCK
    assert (b.launches, b.requests_probed) == (launches + 3, probed + 6)  # r1 and r2, not r0
    s = side.get_stats().data
    assert s["index_match_launches"] == b.launches and s["index_matched_requests"] == b.requests_probed
    assert s["index_launches"] >= b.launches + 4  # the matches, the stores' inserts, the load's pin


def test_step_benchmark_stores_every_filled_block_once(tmp_path):
    import json

    from bench import step_time

    out = tmp_path / "step.json"
    assert step_time.main(["--requests", "4", "--steps", "32", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    bs = step_time.BLOCK
    assert run["blocks_stored"] == 4 * (1024 // bs + 32 // bs)  # the prompts, then two decode blocks
    assert run["storing_steps"]["steps"] == 2 and run["every_step"]["steps"] == 32


def test_a_scheduling_pass_over_waiting_requests_matches_once():
    from bench.sched_time import run_pass

    row = run_pass(8, 16, "cpu", reps=2)  # the CPU table: each of the 8 asked alone
    assert row["match_launches_per_pass"] == 8 and row["index_backend"] == "cpu"


def test_write_through_plans_a_step_in_one_call_with_a_store_job_per_request():
    """One planning call for every request's new blocks, but a job per request: a job is what the
    worker reports and a remote put writes, fails or times out whole."""
    from triton_prefix_cache_vllm import compat
    from vllm.v1.core.block_pool import BlockPool

    side = _side()
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BLOCK)
    side.bind_gpu_block_pool(pool)
    admitted, want = [], {}
    for i, n in enumerate((3, 2)):
        hashes = _hashes(n, 600 + 10 * i)
        blocks = pool.get_new_blocks(n)
        for b, h in zip(blocks, hashes):
            if hasattr(b, "set_block_hash"):
                b.set_block_hash(compat.cached_hash(h))
            else:
                b.block_hash = compat.cached_hash(h)
        req = _request(f"r{i}", hashes)
        assert side.get_num_new_matched_tokens(req, 0) == (0, False)
        ids = [b.block_id for b in blocks]
        side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda ids=ids: (ids,)), 0)
        admitted.append(SimpleNamespace(req_id=req.request_id, block_ids=(ids,)))
        req.num_computed_tokens = n * BLOCK
        want[tuple(ids)] = keys_from_block_hashes(hashes).tolist()
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set())
    side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r0": 1, "r1": 1},
                                              scheduled_new_reqs=admitted, scheduled_cached_reqs=cached))
    calls = []
    begin = side.tier.begin_store
    side.tier.begin_store = lambda keys: calls.append(keys.shape[0]) or begin(keys)
    side.remote_ready = True  # each job then names its keys for the put that follows it
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r0": 1, "r1": 1},
                                                     scheduled_new_reqs=[], scheduled_cached_reqs=cached))
    assert calls == [5]
    assert {tuple(j.block_ids): j.remote_keys for j in meta.stores} == want
    assert len({j.job_id for j in meta.stores}) == 2 and len(side.puts) == 2
