"""Key collisions: keys that share their first word (and their home bucket) never serve another block's KV.

The scheduler derives a block's 128-bit key from vLLM's block hash (`keys_from_block_hashes`, as
imported by the scheduler module). These tests patch that derivation inside a live engine so that
every key has the same first word while the second word still tells blocks apart, and, in the
harder variant, so that every key also lands on the same home slot of the index (one probe chain
holds them all). Then the document-QA and chat workloads must give exactly what built-in prefix
caching gives, every page restored from the host must equal the page demoted into that slot, and
the tier's bookkeeping must stay consistent. (Two different blocks with fully equal keys would be a
real collision, which 128-bit hashes make negligible; that is not what is tested here.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import harness as H
from triton_prefix_cache import keys as K
from triton_prefix_cache.tiers import SlotState

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FIRST_WORD = 0x1234_5678_9ABC_DEF0  # one first word for every block (not a reserved value)
BUCKET_BITS = 24  # the forced home slot is the same in every table of up to 2^24 slots
BUCKET = 0x5A5A5A
M64 = (1 << 64) - 1


def _u(x: int) -> int:
    return x & M64


def _s(x: int) -> int:
    x &= M64
    return x - (1 << 64) if x >> 63 else x


def _unxorshift(y: int, k: int) -> int:
    x = y
    for _ in range(64 // k + 1):
        x = y ^ (x >> k)
    return x


_INV1 = pow(_u(K.HASH_MUL_1), -1, 1 << 64)
_INV2 = pow(_u(K.HASH_MUL_2), -1, 1 << 64)
_INV_IN = pow(_u(K.HASH_MUL_IN), -1, 1 << 64)


def _second_word_for(mixed: int) -> int:
    """The second word w1 with hash_words(FIRST_WORD, w1) == mixed (the finalizer is a bijection)."""
    x = _unxorshift(_u(mixed), K.HASH_SHIFT_3)
    x = _u(x * _INV2)
    x = _unxorshift(x, K.HASH_SHIFT_2)
    x = _u(x * _INV1)
    x = _unxorshift(x, K.HASH_SHIFT_1)  # = FIRST_WORD ^ (w1 * HASH_MUL_IN)
    return _s((x ^ _u(FIRST_WORD)) * _INV_IN)


def shared_first_word(orig):
    """Keys with every first word replaced by FIRST_WORD; second words as derived (distinct)."""

    def keys(hashes):
        k = orig(hashes).clone()
        k[:, 0] = FIRST_WORD
        return k

    return keys


def shared_bucket(orig):
    """Keys with the same first word and the same home slot; the second word is chosen so the mixed
    hash keeps the derived key's 40 high bits of (w0 ^ w1) above the forced bucket bits."""

    def keys(hashes):
        k = orig(hashes)
        out = torch.empty_like(k)
        out[:, 0] = FIRST_WORD
        for i, (w0, w1) in enumerate(k.tolist()):
            tag = _u(w0 ^ w1) >> BUCKET_BITS
            out[i, 1] = _second_word_for((tag << BUCKET_BITS) | BUCKET)
        return out

    return keys


VARIANTS = {"first_word": (shared_first_word, "layerwise"), "first_word_and_bucket": (shared_bucket, "async")}


def test_forced_keys_share_what_they_claim():
    """The patched derivations do what the engine tests rely on: same first word, (same bucket), and
    still one key per block hash."""
    hashes = [bytes(np.random.default_rng(i).integers(0, 256, 32, dtype=np.uint8)) for i in range(300)]
    for name, (make, _) in VARIANTS.items():
        k = make(K.keys_from_block_hashes)(hashes)
        assert torch.all(k[:, 0] == FIRST_WORD), name
        assert len({tuple(r) for r in k.tolist()}) == len(hashes), name
        if name == "first_word_and_bucket":
            mixed = K.hash_words(k[:, 0], k[:, 1])
            assert torch.all((mixed & ((1 << BUCKET_BITS) - 1)) == BUCKET)
            for slots in (1 << 12, 1 << 16):
                assert len(set(K.home_slot(k, slots).tolist())) == 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shared_first_word_never_serves_another_blocks_kv(variant, runs, model_path, monkeypatch):
    import triton_prefix_cache_vllm.scheduler as sched_mod

    oracle = runs("oracle")  # before this test's engine starts: one engine at a time
    make, load = VARIANTS[variant]
    derived: dict[tuple[int, int], bytes] = {}
    orig = sched_mod.keys_from_block_hashes
    patched = make(orig)

    def spy(hashes):
        k = patched(hashes)
        for h, row in zip(hashes, k.tolist()):
            assert derived.setdefault(tuple(row), bytes(h)) == bytes(h), "two block hashes got one key"
        return k

    monkeypatch.setattr(sched_mod, "keys_from_block_hashes", spy)
    debug = {"record_pages": True, "load_delay_polls": 1 if load == "async" else 0}
    llm = H.make_llm(model_path, kv_blocks=80, kv_transfer_config=H.tpc_config(load=load, debug=debug))
    try:
        side = H.scheduler_of(llm).connector._sched
        for wl in ("docqa", "chat"):
            ours = [r for b in H.play(llm, getattr(H, wl)()) for r in b]
            ref = [r for b in oracle.outputs[wl] for r in b]
            # same hit boundaries as the big GPU cache: nothing lost to the crowded keys
            assert [r.num_cached_tokens for r in ours] == [r.num_cached_tokens for r in ref], wl
            H.compare_records(ours, ref, f"{variant}/{wl} vs built-in caching")
        tm = side.tier.manager
        side.tier.check()
        live = np.flatnonzero(tm._state == SlotState.READY)
        assert len(live) > 100, "the workloads were expected to fill the host tier with many blocks"
        assert np.all(tm._keys[live, 0] == FIRST_WORD)
        if variant == "first_word_and_bucket":
            homes = K.home_slot(torch.from_numpy(tm._keys[live]), tm.index.num_slots)
            assert len(set(homes.tolist())) == 1
        wk = H.worker_side()
        assert wk.debug_checked > 100
        assert wk.debug_mismatches == []
        m = H.metric_values(llm)
        assert m["vllm:tpc_host_hit_tokens"] > 0
    finally:
        H.shutdown(llm)
    assert len(derived) > 100
