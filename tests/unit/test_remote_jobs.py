"""RemoteStore's bookkeeping over an in-memory stand-in for the Mooncake client: keys and headers,
job reports, timeouts whose slots stay held until the call returns, degradation logged once and
the probe that ends it. No store process: fast, and runs without the Mooncake client."""

from __future__ import annotations

import ctypes
import logging
import threading
import time

import numpy as np
import pytest

pytest.importorskip("xxhash")

from triton_prefix_cache.host_pool import HostPool, HostPoolConfig
from triton_prefix_cache.remote.keys import (
    HEADER_BYTES,
    RemoteNamespace,
    check_headers,
    pack_headers,
)
from triton_prefix_cache.remote.store import (
    NO_AVAILABLE_HANDLE,
    OBJECT_NOT_FOUND,
    BlockStatus,
    RemoteStore,
)
from triton_prefix_cache.remote.url import parse_remote_url

LAYERS, PAGE = 2, 4096
NS = RemoteNamespace("m", "bfloat16", 16, LAYERS, PAGE, "test:xxh3")
RPC_FAIL = -900


class MemoryClient:
    """The StoreClient calls over a dict. `gate` (an Event) makes puts and gets wait for it;
    `down` makes every call answer RPC_FAIL; `capacity` bounds the number of values."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.values: dict[str, bytes] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.down = False
        self.capacity = capacity
        self.calls: list[str] = []

    def register_buffer(self, ptr: int, size: int) -> int:
        return 0

    def unregister_buffer(self, ptr: int) -> int:
        return 0

    def batch_is_exist(self, keys):
        self.calls.append("exists")
        return [RPC_FAIL if self.down else int(k in self.values) for k in keys]

    def batch_put_from_multi_buffers(self, keys, ptrs, sizes):
        self.calls.append("put")
        self.gate.wait()
        out = []
        for k, ps, ss in zip(keys, ptrs, sizes):
            if self.down:
                out.append(RPC_FAIL)
            elif len(self.values) >= self.capacity:
                out.append(NO_AVAILABLE_HANDLE)
            else:
                self.values[k] = b"".join(ctypes.string_at(p, s) for p, s in zip(ps, ss))
                out.append(0)
        return out

    def batch_get_into_multi_buffers(self, keys, ptrs, sizes):
        self.calls.append("get")
        self.gate.wait()
        out = []
        for k, ps, ss in zip(keys, ptrs, sizes):
            if self.down:
                out.append(RPC_FAIL)
                continue
            v = self.values.get(k)
            if v is None:
                out.append(OBJECT_NOT_FOUND)
                continue
            off = 0
            for p, s in zip(ps, ss):
                ctypes.memmove(p, v[off:off + s], min(s, len(v) - off))
                off += s
            out.append(len(v))
        return out

    def remove(self, key, force=False):
        self.values.pop(key, None)
        return 0

    def close(self):
        return 0


def test_without_a_pool_it_answers_lookups_only():
    url = parse_remote_url("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/m")
    writer, client, _ = make()
    keys = keys_for(2)
    writer.wait(writer.start_put(keys, [0, 1]))
    lookups = RemoteStore(client, url, NS, None)
    assert lookups.exists(keys).all()
    with pytest.raises(RuntimeError, match="lookups only"):
        lookups.start_get(keys, [0, 1])
    with pytest.raises(ValueError, match="slots"):
        writer.start_get(keys, [0, 99])


def make(client=None, url_params="", slots=32, **kw):
    pool = HostPool(HostPoolConfig(size_bytes=slots * LAYERS * PAGE, num_layers=LAYERS, page_bytes=PAGE,
                                   device="cpu"))
    if "lookup_timeout_ms" not in url_params:  # tests that do not time lookups: never flaky on a busy machine
        url_params += "&lookup_timeout_ms=2000"
    url = parse_remote_url("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/m" + url_params)
    client = client or MemoryClient()
    store = RemoteStore(client, url, NS, pool, **kw)
    view = pool.slots.numpy()
    view[:] = np.random.default_rng(0).integers(0, 256, view.shape, dtype=np.uint8)
    return store, client, view


def keys_for(n, seed=1):
    return np.random.default_rng(seed).integers(-(2**63), 2**63 - 1, (n, 2), dtype=np.int64)


def test_object_keys_are_stable_and_namespaced():
    k = np.array([[1, -1]], dtype=np.int64)
    name = NS.object_keys(k)[0]
    assert name == f"tpc1/{NS.digest.hex()}/0000000000000001ffffffffffffffff"
    assert NS.object_keys(k) == RemoteNamespace("m", "bfloat16", 16, LAYERS, PAGE, "test:xxh3").object_keys(k)
    base = dict(model="m", dtype="bfloat16", block_size=16, num_layers=LAYERS, page_bytes=PAGE,
                hash_scheme="test:xxh3")
    for other in (dict(model="n"), dict(dtype="float16"), dict(block_size=32), dict(layout="HND"),
                  dict(tp_rank=1, tp_size=2), dict(hash_scheme="test:sha256"), dict(tenant="t"),
                  dict(num_layers=LAYERS * 2, page_bytes=PAGE // 2)):
        assert RemoteNamespace(**{**base, **other}).object_keys(k) != [name], other


@pytest.mark.parametrize("bad", [dict(model=""), dict(block_size=0), dict(tp_rank=2, tp_size=2),
                                 dict(page_bytes=-1), dict(hash_scheme=None)])
def test_namespace_fields_are_checked(bad):
    base = dict(model="m", dtype="bfloat16", block_size=16, num_layers=LAYERS, page_bytes=PAGE,
                hash_scheme="x")
    with pytest.raises(ValueError):
        RemoteNamespace(**{**base, **bad})


def test_headers_reject_another_key_namespace_or_any_flipped_byte():
    keys = keys_for(3)
    hdr = np.zeros((3, HEADER_BYTES), dtype=np.uint8)
    pack_headers(hdr, NS, keys, np.array([1, 2, 3], dtype=np.uint64))
    assert check_headers(hdr, NS, keys).all()
    assert check_headers(hdr, NS, keys[::-1]).tolist() == [False, True, False]  # the middle one is itself
    other = RemoteNamespace("m2", "bfloat16", 16, LAYERS, PAGE, "test:xxh3")
    assert not check_headers(hdr, other, keys).any()
    for byte in range(HEADER_BYTES):
        h = hdr.copy()
        h[1, byte] ^= 0x01
        assert check_headers(h, NS, keys).tolist() == [True, False, True], byte


def test_put_then_get_round_trip_and_ask_before_writing():
    store, client, view = make()
    keys = keys_for(8)
    r = store.wait(store.start_put(keys, np.arange(8)))
    assert r.status.tolist() == [BlockStatus.OK] * 8 and r.ok.all() and r.slots_free
    assert len(client.values) == 8
    assert store.wait(store.start_put(keys, np.arange(8))).status.tolist() == [BlockStatus.PRESENT] * 8
    assert client.calls.count("put") == 1  # the second job only asked
    r = store.wait(store.start_get(keys, np.arange(16, 24)))
    assert r.ok.all()
    assert (view[16:24] == view[:8]).all()
    assert store.leading_hits(np.concatenate([keys[:5], keys_for(1, seed=9), keys[5:]])) == 5
    s = store.stats
    assert (s.put_blocks, s.put_skipped_present, s.get_blocks, s.corrupt_blocks) == (8, 8, 8, 0)


def test_a_payload_flipped_in_the_store_is_corrupt_and_removed():
    store, client, _ = make()
    keys = keys_for(2)
    store.wait(store.start_put(keys, [0, 1]))
    name = NS.object_keys(keys[1:])[0]
    v = bytearray(client.values[name])
    v[-1] ^= 0x80
    client.values[name] = bytes(v)
    r = store.wait(store.start_get(keys, [2, 3]))
    assert r.status.tolist() == [BlockStatus.OK, BlockStatus.CORRUPT]
    assert name not in client.values and store.stats.corrupt_blocks == 1


def test_a_big_job_moves_in_calls_of_bounded_size(monkeypatch):
    from triton_prefix_cache.remote import store as store_module

    monkeypatch.setattr(store_module, "CALL_BYTES", 3 * (HEADER_BYTES + LAYERS * PAGE))
    store, client, view = make()
    keys = keys_for(8)
    assert store.wait(store.start_put(keys, np.arange(8))).ok.all()
    assert store.wait(store.start_get(keys, np.arange(8, 16))).ok.all()
    assert (client.calls.count("put"), client.calls.count("get")) == (3, 3)
    assert (view[8:16] == view[:8]).all()


def test_a_value_of_another_size_is_corrupt():
    store, client, _ = make()
    keys = keys_for(1)
    client.values[NS.object_keys(keys)[0]] = b"x" * 100
    assert store.wait(store.start_get(keys, [0])).status.tolist() == [BlockStatus.CORRUPT]


def test_the_same_key_in_flight_is_written_once():
    store, client, _ = make()
    client.gate.clear()
    keys = keys_for(4)
    first = store.start_put(keys, np.arange(4))
    second = store.start_put(keys[2:], [2, 3])
    r2 = store.wait(second, timeout=5)  # skipped at once: the first job writes them
    assert r2.status.tolist() == [BlockStatus.SKIPPED_INFLIGHT] * 2
    client.gate.set()
    assert store.wait(first, timeout=5).ok.all()
    assert store.stats.put_skipped_inflight == 2


def test_too_many_blocks_in_flight_are_dropped_not_queued():
    store, client, _ = make(max_inflight_blocks=4)
    client.gate.clear()
    j1 = store.start_put(keys_for(4), np.arange(4))
    j2 = store.start_get(keys_for(2, seed=2), [8, 9])
    assert store.wait(j2, timeout=1).status.tolist() == [BlockStatus.DROPPED_BUSY] * 2
    client.gate.set()
    assert store.wait(j1, timeout=5).ok.all()
    assert store.stats.drops_busy == 2


def test_a_full_store_drops_and_counts_without_degrading():
    store, _, _ = make(MemoryClient(capacity=3))
    r = store.wait(store.start_put(keys_for(5), np.arange(5)))
    assert r.status.tolist() == [BlockStatus.OK] * 3 + [BlockStatus.DROPPED_FULL] * 2
    assert store.stats.write_drops == 2 and not store.degraded


def test_a_call_past_its_timeout_reports_twice_and_degrades_once(caplog):
    store, client, _ = make(url_params="&timeout_ms=100&lookup_timeout_ms=50&retry_s=0")
    keys = keys_for(3)
    client.gate.clear()  # the store hangs
    with caplog.at_level(logging.WARNING, logger="triton_prefix_cache.remote.store"):
        job = store.start_get(keys, [5, 6, 7])
        t = time.monotonic()
        r = store.wait(job, timeout=5)
        assert time.monotonic() - t < 1
        assert r.timed_out and not r.slots_free and not r.ok.any()
        # while the call is stuck: lookups answer absent at once, new jobs are dropped
        assert not store.exists(keys).any()
        dropped = store.wait(store.start_put(keys, [0, 1, 2]), timeout=1)
        assert dropped.status.tolist() == [BlockStatus.DROPPED_DEGRADED] * 3 and dropped.slots_free
        assert store.poll() == []
        client.gate.set()  # the stuck call returns: now, and only now, its slots are free
        for _ in range(100):
            late = store.poll()
            if late:
                break
            time.sleep(0.01)
        assert [(x.job_id, x.late, x.slots_free, x.ok.any()) for x in late] == [(job, True, True, False)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "local tiers" in warnings[0].getMessage()
    assert store.stats.degradations == 1 and store.stats.timeouts == 1


def test_jobs_queued_behind_a_stuck_call_are_dropped_once_it_times_out():
    """A store that hangs holds its thread in the call: the jobs queued behind it never start, so
    they are reported at once (final, slots free) when the stuck call times out, not never."""
    store, client, _ = make(url_params="&timeout_ms=100&lookup_timeout_ms=50&retry_s=0")
    client.gate.clear()  # the store hangs
    stuck = store.start_get(keys_for(2), [5, 6])
    queued_get = store.start_get(keys_for(2, seed=50), [7, 8])  # queued behind it, same thread
    queued_put = store.start_put(keys_for(2, seed=80), [0, 1])  # the put thread is free: it hangs too
    queued_put2 = store.start_put(keys_for(2, seed=90), [2, 3])  # queued behind that put
    try:
        results = {}
        t = time.monotonic()
        while len(results) < 4 and time.monotonic() - t < 5:
            results.update((r.job_id, r) for r in store.poll())
            time.sleep(0.01)
        assert time.monotonic() - t < 2, "a queued job waited for the stuck call"
        assert results[stuck].timed_out and not results[stuck].slots_free
        assert results[queued_put].timed_out and not results[queued_put].slots_free
        for job in (queued_get, queued_put2):
            r = results[job]
            assert r.slots_free and not r.timed_out
            assert r.status.tolist() == [BlockStatus.DROPPED_DEGRADED] * 2
    finally:
        client.gate.set()
    # the dropped put let go of its keys: written by the next put once the store is back
    assert not store._inflight_puts - {tuple(k) for k in keys_for(2, seed=80).tolist()}


def test_a_failed_lookup_degrades_and_a_probe_ends_it(caplog):
    store, client, _ = make(url_params="&retry_s=0.05")
    keys = keys_for(2)
    store.wait(store.start_put(keys, [0, 1]))
    client.down = True
    with caplog.at_level(logging.WARNING, logger="triton_prefix_cache.remote.store"):
        assert not store.exists(keys).any() and store.degraded
        for _ in range(3):
            time.sleep(0.06)
            assert not store.exists(keys).any()  # probes fail quietly
        client.down = False
        deadline = time.monotonic() + 5
        while store.degraded and time.monotonic() < deadline:
            time.sleep(0.06)
            store.poll()
        assert not store.degraded
        assert store.exists(keys).all()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "local tiers" in messages[0] and "reachable again" in messages[1]
    assert (store.stats.degradations, store.stats.recoveries) == (1, 1)


def test_a_slow_lookup_times_out():
    store, client, _ = make(url_params="&timeout_ms=1000&lookup_timeout_ms=20&retry_s=0")
    release = threading.Event()
    real = client.batch_is_exist
    client.batch_is_exist = lambda keys: (release.wait(), real(keys))[1]
    t = time.monotonic()
    assert not store.exists(keys_for(2)).any()
    assert time.monotonic() - t < 0.5 and store.degraded and store.stats.timeouts == 1
    release.set()
    store.close()
