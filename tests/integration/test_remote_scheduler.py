"""The scheduler half's remote tier without an engine or a store: fetches planned from a lookup,
requests waiting for them, slots held until the store lets go of them, puts pinning what they
read. A stand-in answers the existence checks; reports are built by hand as the worker sends them
(the engine tests with a real store: test_remote.py)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tests.integration.test_scheduler_side import BLOCK, _hashes, _report, _request, _side, _store
from triton_prefix_cache.keys import keys_from_block_hashes
from triton_prefix_cache.stats import RemoteStats
from triton_prefix_cache.tiers import SlotState

pytestmark = pytest.mark.vllm

NS = dict(model="m", dtype="auto:float32", block_size=BLOCK, num_layers=2, page_bytes=512,
          hash_scheme="test", layout="x")


class Lookups:
    """The scheduler's client as the scheduler uses it: leading existence checks, stats, state."""

    def __init__(self, hashes: list[bytes] = ()) -> None:
        self.held = {tuple(k) for k in keys_from_block_hashes(list(hashes)).tolist()} if hashes else set()
        self.url = SimpleNamespace(master="127.0.0.1:1")
        self.namespace = None
        self.stats = RemoteStats()
        self.degraded = False
        self.asked = 0

    def close(self) -> bool:
        self.closed = True
        return True

    def leading_hits(self, keys) -> int:
        self.asked += 1
        n = 0
        for k in keys.tolist():
            if tuple(k) not in self.held:
                break
            n += 1
        return n


def _remote_side(store: Lookups, **extra):
    side = _side(**extra)
    side.remote = store
    _report(side, remote_namespace=NS, pool_slots=side.tier.num_slots)  # the worker's first report
    assert side.remote_ready and store.namespace.block_size == BLOCK
    return side


def _remote(kind: str, job: int, ok: list[bool], final: bool = True):
    from triton_prefix_cache_vllm.metadata import RemoteReport

    return RemoteReport(kind, job, ok, final)


def _meta(side):
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set())
    return side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}, scheduled_new_reqs=[],
                                                     scheduled_cached_reqs=cached))


def _state(side, hashes) -> list[SlotState | None]:
    return side.tier.manager.key_states(keys_from_block_hashes(hashes))


def test_a_lookup_that_stops_in_the_host_tier_fetches_the_rest_while_the_request_waits():
    hashes = _hashes(6, 0)
    store = Lookups(hashes[2:])
    side = _remote_side(store, load="async")
    _store(side, hashes[:2])
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)  # wait: blocks 2..5 are coming
    (fetch,) = _meta(side).fetches
    assert fetch.keys == keys_from_block_hashes(hashes[2:]).tolist() and len(fetch.slots) == 4
    assert side.tier.manager.snapshot().loading_slots == 2  # the host hit so far stays pinned
    assert _state(side, hashes[2:]) == [SlotState.STORING] * 4  # not findable, not reusable
    # another request stopping at the same block waits for this fetch, asks the store nothing
    assert side.get_num_new_matched_tokens(_request("b", hashes), 0) == (None, False)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False) and store.asked == 1
    assert side.has_pending_stores() is False  # handed over: the request's waiting keeps vLLM stepping
    _report(side, remote=[_remote("fetch", fetch.job_id, [True, True, False, True])])  # block 4 corrupt
    assert _state(side, hashes[2:]) == [SlotState.READY, SlotState.READY, None, SlotState.READY]
    assert side.tier.manager.snapshot().loading_slots == 0
    # the request loads what arrived as any host hit, and asks the store no more
    assert side.get_num_new_matched_tokens(req, 0) == (4 * BLOCK, True) and store.asked == 1
    blocks = SimpleNamespace(get_block_ids=lambda: (list(range(10, 16)),))
    side.update_state_after_alloc(req, blocks, 4 * BLOCK)
    assert side.stats.data["remote_hit_tokens"] == 2 * BLOCK
    sources = side.get_external_cache_hit_sources(req, 4 * BLOCK)
    if side.hit_source is not None:
        assert sources == {side.remote_source: 2 * BLOCK, side.hit_source: 2 * BLOCK}
    # b (which waited for the fetch) asks the store about the block the fetch could not deliver
    # (the store removes a corrupt value) once a's load is done
    store.held.discard(tuple(keys_from_block_hashes(hashes[4:5]).tolist()[0]))
    assert [job.req_id for job in _meta(side).loads] == ["a"]
    _report(side, loads_done=["a"])
    assert side.get_num_new_matched_tokens(_request("b", hashes), 0) == (4 * BLOCK, True)
    assert store.asked == 2
    side.tier.check()


def test_a_timed_out_fetch_lets_its_request_go_and_holds_its_slots_until_the_store_lets_go():
    hashes = _hashes(3, 100)
    side = _remote_side(Lookups(hashes))
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    (fetch,) = _meta(side).fetches
    assert ("fetch", fetch.job_id) in side.awaited  # the report deadline covers a waiting request
    _report(side, remote=[_remote("fetch", fetch.job_id, [False] * 3, final=False)])
    assert ("fetch", fetch.job_id) not in side.awaited
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # computes: nothing arrived
    assert _state(side, hashes) == [SlotState.STORING] * 3  # the store may still write them
    free = side.tier.manager.num_free
    _report(side, remote=[_remote("fetch", fetch.job_id, [True] * 3, final=True)])  # the late return
    assert _state(side, hashes) == [None] * 3 and side.tier.manager.num_free == free + 3
    assert not side.fetches and not side._fetching
    side.tier.check()


def test_absent_blocks_are_asked_about_once_per_request():
    hashes = _hashes(3, 200)
    store = Lookups()
    side = _remote_side(store)
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    assert store.asked == 1 and not _meta(side).fetches

def test_requests_wait_for_the_workers_first_report():
    """The namespace comes with the worker's first report (after the engine's first step): a lookup
    before it would miss the store. A worker without a host pool turns the tier off."""
    hashes = _hashes(3, 250)
    for namespace in (NS, None):
        side = _side()
        side.remote = store = Lookups(hashes)
        req = _request("a", hashes)
        assert side.get_num_new_matched_tokens(req, 0) == (None, False) and store.asked == 0
        _report(side, remote_namespace=namespace, pool_slots=0 if namespace is None else 64)
        if namespace is None:
            assert side.remote is None and store.closed
            assert side.get_num_new_matched_tokens(req, 0) == (0, False)
        else:
            assert side.get_num_new_matched_tokens(req, 0) == (None, False) and store.asked == 1


def _gpu_blocks(side, hashes):
    from triton_prefix_cache_vllm import compat
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=BLOCK)
    side.bind_gpu_block_pool(pool)
    blocks = list(compat.iter_free_blocks(pool))[: len(hashes)]
    for b, h in zip(blocks, hashes):
        cached = compat.cached_hash(h)
        if hasattr(b, "set_block_hash"):
            b.set_block_hash(cached)
        else:
            b.block_hash = cached
    return blocks


@pytest.mark.parametrize("reset", [False, True])
def test_a_put_pins_the_slots_it_reads_from_the_copy_to_its_final_report(reset):
    """A block copied to the host is written on to the store by the worker once its copy is done:
    its slot is STORING until the copy is reported, then pinned (also across a reset of the host
    tier, which retires it) until the put's final report: a timed-out put still reads it."""
    hashes = _hashes(2, 300)
    side = _remote_side(Lookups(), demote="lazy")
    blocks = _gpu_blocks(side, hashes)
    side._plan_store(blocks, keys_from_block_hashes(hashes), lazy=True)
    (job,) = _meta(side).stores
    assert job.remote_keys == keys_from_block_hashes(hashes).tolist()
    assert side.has_pending_stores()
    _report(side, stores_done=[job.job_id])
    slots = np.asarray(job.slots)
    assert side.tier.manager.readers_of(slots).tolist() == [1, 1]
    assert side.has_pending_stores()  # the put is not reported yet
    if reset:
        side.reset_cache()
        assert side.tier.match(keys_from_block_hashes(hashes)) == 0  # retired: unfindable, still held
    _report(side, remote=[_remote("put", job.job_id, [False, False], final=False)])  # timed out
    assert side.tier.manager.readers_of(slots).tolist() == [1, 1] and not side.has_pending_stores()
    _report(side, remote=[_remote("put", job.job_id, [False, False], final=True)])
    assert side.tier.manager.readers_of(slots).tolist() == [0, 0] and not side.puts
    want = [None, None] if reset else [SlotState.READY] * 2
    assert _state(side, hashes) == want
    side.tier.check()


def test_a_failed_copy_has_no_put_and_the_remote_stats_reach_the_interval():
    hashes = _hashes(1, 400)
    side = _remote_side(Lookups(), demote="lazy")
    side._plan_store(_gpu_blocks(side, hashes), keys_from_block_hashes(hashes), lazy=True)
    (job,) = _meta(side).stores
    _report(side, stores_failed=[job.job_id])
    assert not side.puts and side.tier.manager.snapshot().loading_slots == 0
    side.remote.stats.store_errors += 2
    side.remote.degraded = True
    s = side.get_stats()
    assert s.data["remote_store_errors"] == 2 and s.data["remote_degraded"] == 1
    assert "remote_degraded" in s.reduce()
    again = side.get_stats()  # counted once
    assert again is None or again.data["remote_store_errors"] == 0


def test_a_fetch_into_a_full_host_tier_never_evicts_the_hit_it_extends():
    """The request's host hit is the least recently used content of a full host tier: the fetch's
    slots come from other blocks, and the hit stays READY and pinned while the rest arrives."""
    hashes = _hashes(6, 200)
    store = Lookups(hashes[2:])
    side = _remote_side(store, load="async")
    _store(side, hashes[:2])  # the oldest blocks of the tier
    _store(side, _hashes(side.tier.num_slots - 2, 1000))  # the tier is full
    assert side.tier.manager.num_free == 0
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    (fetch,) = _meta(side).fetches
    assert len(fetch.slots) == 4
    assert _state(side, hashes) == [SlotState.LOADING] * 2 + [SlotState.STORING] * 4  # pinned hit
    assert side.tier.manager.snapshot().loading_slots == 2
    _report(side, remote=[_remote("fetch", fetch.job_id, [True] * 4)])
    assert side.get_num_new_matched_tokens(req, 0) == (6 * BLOCK, True)
    side.tier.check()


def test_after_a_prefix_cache_reset_the_store_is_neither_asked_nor_written():
    hashes = _hashes(4, 300)
    store = Lookups(hashes)
    side = _remote_side(store, load="async")
    assert side.reset_cache() is True
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False) and store.asked == 0
    assert not _meta(side).fetches


def test_a_fetch_overdue_by_half_the_report_timeout_lets_its_request_go_never_stops_the_engine():
    hashes = _hashes(3, 400)
    side = _remote_side(Lookups(hashes), report_timeout_s=10)
    req = _request("a", hashes)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    (fetch,) = _meta(side).fetches
    side.awaited[("fetch", fetch.job_id)].since -= 6  # a slow store: 6 s of the 10
    side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=None))  # no ReportTimeout
    assert ("fetch", fetch.job_id) not in side.awaited
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # computes: nothing arrived
    assert _state(side, hashes) == [SlotState.STORING] * 3  # the store may still write them
    _report(side, remote=[_remote("fetch", fetch.job_id, [True] * 3, final=True)])  # it ends
    assert _state(side, hashes) == [None] * 3 and not side.fetches
    side.tier.check()
