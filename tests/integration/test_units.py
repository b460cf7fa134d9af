"""Adapter pieces without an engine: page views, host-tier bookkeeping, stats, LRU-preserving release."""
from __future__ import annotations

import pytest
import torch

from triton_prefix_cache.keys import keys_from_block_hashes

pytestmark = pytest.mark.vllm


def _keys(n: int, base: int = 0) -> torch.Tensor:
    return keys_from_block_hashes([(base + i).to_bytes(4, "little") * 8 for i in range(n)])


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "kv_split"])
def test_page_views_are_the_blocks_bytes(layout):
    from triton_prefix_cache_vllm.worker import page_views

    nb, h, n, d = 6, 2, 4, 8
    if layout == "contiguous":
        t = torch.randn(nb, h, n, 2 * d)
        blocks = [t[b].contiguous() for b in range(nb)]
        views = page_views([t], nb)
    elif layout == "permuted":  # vLLM's NHD: physical [B, N, H, C], logical [B, H, N, C]
        phys = torch.randn(nb, n, h, 2 * d)
        t = phys.permute(0, 2, 1, 3)
        blocks = [phys[b].contiguous() for b in range(nb)]
        views = page_views([t], nb)
    else:  # [2, num_blocks, ...]: K and V apart, two half pages per block
        t = torch.randn(2, nb, n, h, d)
        views = page_views([t], nb)
        assert len(views) == 2
        for b in range(nb):
            assert torch.equal(views[0][b], t[0, b].contiguous().view(torch.uint8).flatten())
            assert torch.equal(views[1][b], t[1, b].contiguous().view(torch.uint8).flatten())
        return
    (v,) = views
    assert v.shape == (nb, blocks[0].numel() * 4) and v.dtype == torch.uint8
    for b in range(nb):
        assert torch.equal(v[b], blocks[b].view(torch.uint8).flatten())
    v[2].zero_()  # a view, not a copy
    assert t[2].abs().sum() == 0


def test_page_views_refuse_scattered_blocks():
    from triton_prefix_cache_vllm.worker import page_views

    t = torch.randn(8, 4, 16)[:, :, ::2]  # every other element: not a dense page
    with pytest.raises(ValueError, match="dense page"):
        page_views([t], 8)
    with pytest.raises(ValueError, match="blocks"):
        page_views([torch.randn(5, 4)], 8)


def test_host_tier_lifecycle():
    from triton_prefix_cache_vllm.host_tier import HostTier

    from tests.support.harness import pinned_slots

    tier = HostTier(4, 100, index_backend="cpu")
    k = _keys(6)
    slots, present, dropped = tier.begin_store(k[:3])
    assert sorted(slots.tolist()) == [0, 1, 2] and dropped == 0 and not present.any()
    assert tier.match(k[:3]) == 0  # not findable before the copy completes
    again, _, _ = tier.begin_store(k[:1])
    assert again.tolist() == [-1]  # already being stored
    tier.end_store(slots.tolist(), ok=True)
    assert tier.match(k[:3]) == 3 and tier.match(k[1:3]) == 2 and tier.match(k[3:]) == 0
    assert tier.match(torch.cat([k[:1], k[4:5], k[1:2]])) == 1
    tier.check()
    pinned = tier.pin(k[:2])  # a load reads the first two
    assert pinned == slots[:2].tolist() and pinned_slots(tier) == 2
    s2, _, dropped = tier.begin_store(k[3:6])  # 1 free slot + the one unpinned ready slot (k[2])
    assert dropped == 1 and sorted(s2[s2 >= 0].tolist()) == sorted([3, int(slots[2])])
    tier.end_store(s2[s2 >= 0].tolist(), ok=True)
    assert tier.match(k[:2]) == 2 and tier.match(k[2:3]) == 0
    s4, present, _ = tier.begin_store(k[:3])  # the first two are held; the third is gone
    assert present.tolist() == [True, True, False]
    tier.end_store(s4[s4 >= 0].tolist(), ok=False)
    tier.check()
    # reset while slots are pinned and a store is in flight: nothing from before is served after
    s3, _, _ = tier.begin_store(_keys(1, 100))
    assert tier.clear() is True
    assert len(tier) == 0 and tier.match(k) == 0
    tier.end_store(s3.tolist(), ok=True)  # completes after the reset: discarded
    assert tier.match(_keys(1, 100)) == 0
    tier.unpin(pinned)
    tier.check()
    assert pinned_slots(tier) == 0 and tier.manager.num_free == 4


def test_host_tier_failed_store_and_shrink():
    from triton_prefix_cache_vllm.host_tier import HostTier

    tier = HostTier(2, 100, index_backend="cpu")
    s, _, _ = tier.begin_store(_keys(2))
    tier.end_store(s.tolist(), ok=False)
    assert len(tier) == 0 and tier.manager.num_free == 2
    tier.limit(1)
    assert tier.num_slots == 1
    s, _, dropped = tier.begin_store(_keys(2, 10))
    assert dropped == 1 and s.tolist().count(-1) == 1
    with pytest.raises(RuntimeError, match="vanished"):
        tier.pin(_keys(1, 50))


def test_host_tier_places_its_index():
    """"auto" keeps the scheduler's table on the CPU, also where a GPU is present; "torch" is the
    deprecated name of the CPU table; "triton" puts it on the GPU (the interpreter without one)."""
    from triton_prefix_cache_vllm.host_tier import HostTier

    for name in ("auto", "cpu", "torch"):
        tier = HostTier(2, 100, index_backend=name)
        assert (tier.backend, tier.device.type, tier.manager.index.backend) == ("cpu", "cpu", "cpu"), name
    tier = HostTier(2, 100, index_backend="triton")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert (tier.backend, tier.device.type, tier.manager.index.backend) == ("triton", want, "triton")
    tier.end_store(tier.begin_store(_keys(2))[0].tolist(), ok=True)
    assert tier.match(_keys(3)) == 2


def test_stats_aggregate_and_reduce():
    from triton_prefix_cache_vllm.stats import TPCStats

    a, b = TPCStats(), TPCStats()
    a.add("host_hit_tokens", 64)
    a.add("load_bytes", 2e9)
    a.add("load_seconds", 1.0)
    a.set("inflight_loads", 3)
    b.add("host_hit_tokens", 32)
    b.add("sched_seconds", 1e-3)
    b.add("sched_requests", 2)
    b.set("inflight_loads", 1)
    r = a.aggregate(b).reduce()
    assert r["host_hit_tokens"] == 96 and r["load_GBps"] == 2.0
    assert r["inflight_loads"] == 1 and r["sched_us_per_req"] == 500.0
    assert TPCStats().is_empty() and not a.is_empty()


def test_release_keeps_lru_position():
    """A block held for demotion goes back to the head of vLLM's free queue unless a request used it."""
    from triton_prefix_cache_vllm import compat
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=32)
    order = [b.block_id for b in compat.iter_free_blocks(pool)]
    head = [pool.blocks[order[0]], pool.blocks[order[1]]]
    for i, b in enumerate(head):  # cached blocks (hashless ones always go to the head)
        if hasattr(b, "set_block_hash"):
            b.set_block_hash(bytes([i]) * 36)
        else:
            b.block_hash = bytes([i]) * 36
    compat.hold_blocks(pool, head)
    assert [b.block_id for b in compat.iter_free_blocks(pool)][:1] == [order[2]]
    compat.release_blocks(pool, head, [True, False])
    after = [b.block_id for b in compat.iter_free_blocks(pool)]
    assert after[0] == order[0] and after[-1] == order[1]
    assert all(b.ref_cnt == 0 for b in head)


class _RecordingHandle:
    """Stands in for a CopyHandle: records how the compute stream was ordered after the copy."""

    nbytes = 0
    num_blocks = 0
    submit_seconds = None

    def __init__(self, log: list, error: BaseException | None = None) -> None:
        self.log = log
        self.error = error

    def done(self) -> bool:
        return True

    def wait_all(self) -> None:
        self.log.append("whole")

    def wait_layer(self, layer: int) -> None:
        self.log.append(layer)

    def wait(self) -> None:
        pass

    def gpu_seconds(self):
        return None


class _RecordingEngine:
    def __init__(self, error: BaseException | None = None) -> None:
        self.log: list = []
        self.error = error

    def promote(self, slots, block_ids, layerwise=False):
        self.log.append(("promote", layerwise))
        return _RecordingHandle(self.log, self.error)


@pytest.mark.parametrize("full_graph", [False, True])
def test_layerwise_loads_wait_whole_when_the_step_replays_a_full_graph(full_graph):
    """A full CUDA graph replay calls no wait_for_layer_load: the load must be waited for before it."""
    from types import SimpleNamespace

    from triton_prefix_cache_vllm import compat
    from triton_prefix_cache_vllm.metadata import LoadJob, TPCMetadata
    from triton_prefix_cache_vllm.worker import WorkerSide
    from vllm.config import CUDAGraphMode

    from triton_prefix_cache.config import PrefixCacheConfig

    def ctx(mode, attn_metadata: object = {}):
        return SimpleNamespace(cudagraph_runtime_mode=mode, attn_metadata=attn_metadata)

    mode = CUDAGraphMode.FULL if full_graph else CUDAGraphMode.PIECEWISE
    assert compat.replays_full_cuda_graph(ctx(mode)) is full_graph
    assert compat.replays_full_cuda_graph(ctx(CUDAGraphMode.NONE)) is False
    # vLLM 0.26's model runner v2 calls start_load_kv outside any forward context right before it
    # replays a FULL graph (vllm/v1/worker/gpu/model_runner.py): a default context, mode NONE
    assert compat.replays_full_cuda_graph(ctx(CUDAGraphMode.NONE, None)) is True
    assert compat.cuda_graph_mode_name(ctx(CUDAGraphMode.NONE, None)) == "NO_CONTEXT"
    assert compat.replays_full_cuda_graph(object()) is True  # unknown: the safe answer

    w = WorkerSide(PrefixCacheConfig(host_cache_gib=1), None, None)
    eng = w.engine = _RecordingEngine()
    w.layer_index = {"l0": 0, "l1": 1}
    meta = TPCMetadata(loads=[LoadJob("a", [0, 1], [5, 6], True), LoadJob("b", [2], [7], False)])
    w.start_load_kv(meta, full_graph=compat.replays_full_cuda_graph(ctx(mode)))
    # only the layer-wise load is waited for whole, and only under a full graph
    want = [("promote", True), ("promote", False)] + (["whole"] if full_graph else [])
    assert eng.log == want
    w.wait_for_layer_load("l0")
    w.wait_for_layer_load("l1")
    assert eng.log[len(want):] == [0, 1]  # per-layer waits stay (harmless after a whole wait)
    assert w.full_graph_loads == (1 if full_graph else 0)
    st = w.get_stats()  # and the counter reaches vLLM's stats (vllm:tpc_full_graph_loads)
    assert (st.data["full_graph_loads"] if st is not None else 0) == (1 if full_graph else 0)


def test_loads_that_fail_in_the_submission_thread_are_recomputed():
    """A DMA load is submitted by the copy engine's thread; when that fails (the handle's `error`),
    its blocks are reported as load errors (vLLM recomputes them), never as loaded."""
    from triton_prefix_cache_vllm.metadata import LoadJob, TPCMetadata
    from triton_prefix_cache_vllm.worker import WorkerSide

    from triton_prefix_cache.config import PrefixCacheConfig

    w = WorkerSide(PrefixCacheConfig(host_cache_gib=1), None, None)
    w.engine = _RecordingEngine(error=RuntimeError("injected"))
    w.layer_index = {"l0": 0}
    meta = TPCMetadata(loads=[LoadJob("a", [0, 1], [5, 6], True), LoadJob("b", [2], [7], False)])
    w.start_load_kv(meta)
    w.wait_for_layer_load("l0")
    _, recving = w.get_finished(set())
    assert recving == {"b"}  # the async load is finished (failed), so vLLM stops waiting for it
    assert w.get_block_ids_with_load_errors() == {5, 6, 7}  # the GPU blocks (slots are 0-2)
    report = w.build_worker_meta()
    assert report is not None and sorted(report.loads_failed) == ["a", "b"] and not report.loads_done
    assert not w.load_blocks


class _CountingHandle:
    """A finished copy of `n` blocks of 100 bytes each."""

    error = None
    submit_seconds = None

    def __init__(self, n: int) -> None:
        self.nbytes, self.num_blocks = 100 * n, n

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def wait_layer(self, layer: int) -> None:
        pass

    def gpu_seconds(self):
        return None


class _CallEngine:
    def __init__(self) -> None:
        self.calls: list = []

    def demote(self, blocks, slots):
        self.calls.append(("demote", list(blocks), list(slots)))
        return _CountingHandle(len(blocks))

    def promote(self, slots, blocks, layerwise=False):
        self.calls.append(("promote", layerwise, list(blocks), list(slots)))
        return _CountingHandle(len(blocks))


def test_a_steps_jobs_share_one_copy_per_direction_and_kind():
    """Every store of a step goes in one demote and its layer-wise loads in one promote (async loads
    stay one copy each), loads submitted before stores (the forward waits for loads only); each job
    is still reported on its own and bytes are counted once."""
    from triton_prefix_cache_vllm.metadata import LoadJob, StoreJob, TPCMetadata
    from triton_prefix_cache_vllm.worker import WorkerSide

    from triton_prefix_cache.config import PrefixCacheConfig

    w = WorkerSide(PrefixCacheConfig(host_cache_gib=1), None, None)
    eng = w.engine = _CallEngine()
    w.layer_index = {"l0": 0}
    meta = TPCMetadata(
        loads=[LoadJob("a", [0, 1], [10, 11], True), LoadJob("b", [2], [12], False),
               LoadJob("c", [3], [13], True), LoadJob("d", [4, 5], [14, 15], False)],
        stores=[StoreJob(1, [20, 21], [30, 31]), StoreJob(2, [22], [32])],
    )
    w.start_load_kv(meta)
    assert eng.calls == [
        ("promote", True, [10, 11, 13], [0, 1, 3]),
        ("promote", False, [12], [2]),
        ("promote", False, [14, 15], [4, 5]),
        ("demote", [20, 21, 22], [30, 31, 32]),
    ]
    w.wait_for_layer_load("l0")
    _, recving = w.get_finished(set())
    assert recving == {"b", "d"}
    report = w.build_worker_meta()
    assert report is not None
    assert sorted(report.stores_done) == [1, 2] and sorted(report.loads_done) == ["a", "b", "c", "d"]
    st = w.get_stats()
    assert st is not None
    assert st.data["store_bytes"] == 300 and st.data["stores"] == 2
    assert st.data["load_bytes"] == 600 and st.data["loads"] == 4
    assert not w.load_blocks and not w.stores and not w.sync_loads and not w.async_loads


def test_demotion_window_is_what_the_next_step_can_allocate():
    """The token budget's blocks plus one partial block per request the step can schedule: the known
    ones and a few arriving, never more than max_num_seqs."""
    from triton_prefix_cache_vllm.scheduler import NEW_REQUEST_SLACK, demotion_window

    # vLLM's H200 defaults (16,384 tokens = 1,024 blocks, 1,024 sequences), one request alive: about
    # half a 4 GiB KV cache (2,048 blocks) instead of all of it
    assert demotion_window(1024, 1024, 1) == 1024 + 1 + NEW_REQUEST_SLACK
    assert demotion_window(1024, 1024, 5000) == 2048
    assert demotion_window(64, 8, 0) == 72  # the CPU tests' engines: capped at max_num_seqs


class _TimedHandle(_CountingHandle):
    """A finished copy whose device time is known (as CUDA events give it)."""

    def gpu_seconds(self):
        return 1e-3 * self.num_blocks


class _TimedEngine(_CallEngine):
    def promote(self, slots, blocks, layerwise=False):
        self.calls.append(("promote", layerwise, list(blocks), list(slots)))
        return _TimedHandle(len(blocks))


def _worker(**debug):
    from triton_prefix_cache_vllm.worker import WorkerSide

    from triton_prefix_cache.config import PrefixCacheConfig

    w = WorkerSide(PrefixCacheConfig(host_cache_gib=1, debug=debug), None, None)
    w.engine = _TimedEngine()
    w.layer_index = {"l0": 0}
    return w


def test_steps_that_load_feed_the_load_step_histogram():
    """Host time of every step that loads, start_load_kv to the end of get_finished, always on; steps
    that only store observe nothing. It reaches Prometheus as vllm:tpc_load_step_seconds."""
    from triton_prefix_cache_vllm.metadata import LoadJob, StoreJob, TPCMetadata
    from triton_prefix_cache_vllm.stats import OBSERVATIONS, PROM_HISTOGRAMS, TPCStats

    w = _worker()
    w.start_load_kv(TPCMetadata(loads=[LoadJob("a", [0], [5], True)]))
    w.wait_for_layer_load("l0")
    w.get_finished(set())
    w.start_load_kv(TPCMetadata(stores=[StoreJob(1, [6], [1])]))
    w.get_finished(set())
    w.start_load_kv(TPCMetadata(loads=[LoadJob("b", [2, 3], [7, 8], False)]))
    w.get_finished(set())
    st = w.get_stats()
    assert st is not None and len(st.data["load_step_seconds"]) == 2
    assert all(0 <= v < 10 for v in st.data["load_step_seconds"])
    assert "load_step_seconds" in OBSERVATIONS
    assert PROM_HISTOGRAMS["load_step_seconds"][0] == "vllm:tpc_load_step_seconds"
    merged = TPCStats().aggregate(st).aggregate(st)  # lists concatenate across intervals and workers
    assert len(merged.data["load_step_seconds"]) == 4


def test_worker_diagnostics_are_a_snapshot_of_recent_loads():
    from triton_prefix_cache_vllm.metadata import LoadJob, TPCMetadata

    w = _worker()
    w.start_load_kv(TPCMetadata(loads=[LoadJob("a", [0, 1], [5, 6], True), LoadJob("b", [2], [7], False)]))
    w.wait_for_layer_load("l0")
    w.get_finished(set())
    d = w.diagnostics()
    assert d.role == "worker" and d.loads_timed == 2
    assert sorted(d.recent_loads) == [(100, 1e-3), (200, 2e-3)]
    assert d.step_timings == () and d.recent_partial_hits == () and d.host_tier == {}  # step_timing off
    w.recent_loads.clear()
    assert len(d.recent_loads) == 2


def test_debug_options_reach_the_worker():
    """debug.load_delay_polls / store_delay_polls hold reports back that many polls; debug.poll_stores
    forces polled stores (here, in-process, they would be waited for)."""
    from triton_prefix_cache_vllm.metadata import LoadJob, StoreJob, TPCMetadata

    w = _worker(load_delay_polls=2, store_delay_polls=1, poll_stores=True)
    assert w.poll_stores is True and w.debug_pages is None
    assert _worker(poll_stores=False).poll_stores is False
    assert _worker(record_pages=True).debug_pages == {}
    w.start_load_kv(TPCMetadata(loads=[LoadJob("a", [0], [5], False)], stores=[StoreJob(1, [6], [1])]))
    reports = []
    for _ in range(4):
        _, recving = w.get_finished(set())
        meta = w.build_worker_meta()
        reports.append((recving, list(meta.stores_done) if meta is not None else []))
    assert reports == [(None, []), (None, [1]), ({"a"}, []), (None, [])]


def test_the_adapter_logs_under_vllm_and_reads_no_environment():
    """One logger under vLLM's `vllm` logger (its handler and format apply), and every knob comes
    from the validated config: no adapter module reads the environment itself, except vLLM's own
    seed of its block hashes (PYTHONHASHSEED), which vLLM 0.26 reads only from there and the
    remote tier must know (compat.block_hash_seed)."""
    import importlib
    import pathlib
    import re

    import triton_prefix_cache_vllm as pkg

    assert pkg.LOGGER_NAME.startswith("vllm.")
    for name in ("compat", "connector", "scheduler", "worker"):
        assert importlib.import_module(f"triton_prefix_cache_vllm.{name}").logger.name == pkg.LOGGER_NAME
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        reads = [ln for ln in path.read_text().splitlines()
                 if re.search(r"os\.environ|getenv\(", ln) and 'get("PYTHONHASHSEED")' not in ln]
        assert not reads, (path.name, reads)
