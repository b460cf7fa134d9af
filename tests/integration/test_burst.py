"""A burst of concurrent requests sharing one long prefix that lives only in the host tier.

vLLM's own offloading copies such a prefix once per request (vllm-project/vllm#44294). Here it must cross
once: with layer-wise loads vLLM caches the loaded blocks at once and the other requests hit them in
VRAM; with async loads the adapter asks again later about a request whose prefix another request is
still loading (`deferred_requests`), and the async copies are held in flight for two extra polls
(`debug.load_delay_polls`) so that the burst really overlaps them. Outputs must equal built-in prefix
caching with a KV cache big enough for everything.
"""
from __future__ import annotations

import random

import pytest

from tests.support import harness as H

pytestmark = [pytest.mark.vllm]

PREFIX_BLOCKS = 24
BURST = 8
SMALL_KV_BLOCKS = 80


def _prompts() -> tuple[list[int], list[list[int]], list[list[int]]]:
    rng = random.Random(11)
    prefix = [rng.randrange(100, 30000) for _ in range(PREFIX_BLOCKS * H.BLOCK)]
    # Unrelated documents, 1.5x the KV cache, push the prefix out of VRAM (into the host tier).
    fillers = [[rng.randrange(100, 30000) for _ in range(PREFIX_BLOCKS * H.BLOCK)] for _ in range(5)]
    burst = [prefix + [rng.randrange(100, 30000) for _ in range(40)] for _ in range(BURST)]
    return prefix + [7] * 40, fillers, burst


def _play(llm) -> list[H.Record]:
    warm, fillers, burst = _prompts()
    H.play_prompts(llm, [warm], per_call=1)
    H.play_prompts(llm, fillers, per_call=1)
    return H.play_prompts(llm, burst, per_call=BURST)


@pytest.fixture(scope="module")
def reference(model_path) -> list[H.Record]:
    llm = H.make_llm(model_path, kv_blocks=1200)
    try:
        return _play(llm)
    finally:
        H.shutdown(llm)


@pytest.mark.parametrize("load", ["layerwise", "async"])
def test_shared_prefix_crosses_once(model_path, reference, load):
    debug = {"record_pages": True, "load_delay_polls": 2 if load == "async" else 0}
    llm = H.make_llm(model_path, kv_blocks=SMALL_KV_BLOCKS,
                     kv_transfer_config=H.tpc_config(load=load, debug=debug), max_num_seqs=BURST)
    try:
        side = H.scheduler_of(llm).connector._sched
        warm, fillers, burst = _prompts()
        H.play_prompts(llm, [warm], per_call=1)
        H.play_prompts(llm, fillers, per_call=1)
        before = side.tier.manager.stats.blocks_from_host
        ours = H.play_prompts(llm, burst, per_call=BURST)
        loaded = side.tier.manager.stats.blocks_from_host - before
        H.compare_records(ours, reference, f"burst/{load}")
        # Every request saw the whole prefix cached (host tier or VRAM) ...
        assert all(r.num_cached_tokens >= (PREFIX_BLOCKS - 1) * H.BLOCK for r in ours), [
            r.num_cached_tokens for r in ours]
        # ... and the prefix crossed from the host tier once, not once per request.
        assert 0 < loaded <= PREFIX_BLOCKS, (loaded, PREFIX_BLOCKS)
        wk = H.worker_side()
        assert wk.debug_checked > 0 and wk.debug_mismatches == []
    finally:
        H.shutdown(llm)
