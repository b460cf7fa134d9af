"""Worker half of the connector: moves KV pages between vLLM's KV cache and the host pool.

Runs next to the model runner. `register_kv_caches` builds one byte view `[num_blocks, page_bytes]`
per layer from the tensor's storage (so the copy code does not depend on vLLM's layout) and the
host pool `[num_slots, num_layers, page_bytes]`. Each step `start_load_kv` submits the step's
stores and loads on the copy engine's side streams. Completion:
- stores: in the default multi-process engine, polled at the end of every step (they overlap the
  forward and later steps), reported through the worker metadata once done, the scheduler holding
  their GPU blocks until then; in an in-process engine, waited for at the end of their step;
- layer-wise loads: `wait_for_layer_load` orders each layer's attention after that layer's copy;
- async loads: polled every step; a finished one is reported through `get_finished` (vLLM then
  schedules the request) and through the worker metadata (the scheduler unpins its slots).

Tensor parallelism: every rank runs one WorkerSide over its own KV heads. Its host pool holds
this rank's shard of every slot (the pool is `host_cache_gib` divided by the tensor parallel
size), it runs every job of the step's metadata on its shard and reports each job exactly once,
done or failed: vLLM counts the ranks' `get_finished` reports, the scheduler side the worker
metadata. Counters (`get_stats`): every rank reports the bytes it moved (their sum is the blocks'
bytes); the lead rank (0) alone reports counts of copies and their times, so a job counts once
and a time is one rank's.

The remote tier (`remote`, tensor parallel size 1): this side connects the store client that moves
bytes between the store and the host pool (zero copy: the pool is registered with the client) and
reports its namespace once. A store job with remote keys is followed, once its copy is done, by a
put of its slots; a fetch job reads values into its slots and verifies them. Both run on the
client's threads, never in the step: `get_finished` polls them and reports each through the
worker metadata (`RemoteReport`), a timed-out one twice (at the timeout, and once the store no
longer touches its slots).
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any

import numpy as np
import torch

from triton_prefix_cache.config import PrefixCacheConfig
from triton_prefix_cache.copy_engine import CopyEngine, CopyHandle
from triton_prefix_cache.host_pool import HostPool, HostPoolConfig

from . import LOGGER_NAME, compat
from .metadata import RemoteReport, TPCMetadata, TPCWorkerMetadata
from .stats import Diagnostics, TPCStats, remote_stats_into

logger = logging.getLogger(LOGGER_NAME)

#: copy_backend="auto" in a CUDA engine: the first of these the machine offers. Staged DMA (needs
#: cuda.bindings) moves pages on the copy engines; torch copies are SM kernels reading pinned memory
#: over PCIe, which slow the forward they overlap.
AUTO_ENGINE_BACKENDS = ("staged", "torch")

#: Loads whose (bytes, device seconds) the worker keeps for `diagnostics()`, and loading steps timed.
RECENT = 4096

#: Host pools a remote store call may still write after their engine's shutdown: kept alive for
#: the life of the process, never unmapped under the store's client.
_STRANDED_POOLS: list[HostPool] = []

#: The stats every tensor parallel rank reports: the bytes it moved (its shard of each block) and
#: its own gauges. The rest (counts of copies, their seconds, the load-step histogram) comes from
#: the lead rank alone.
PER_RANK_STATS = ("load_bytes", "store_bytes", "inflight_loads", "host_pool_pin_failures")


def page_views(tensors: list[torch.Tensor], num_blocks: int | None = None) -> list[torch.Tensor]:
    """uint8 `[num_blocks, page_bytes]` views over each layer's storage (no copy).

    Dim 0 of each tensor must index blocks and each block's elements must fill one dense page in
    some dimension order (vLLM's NHD/HND layouts, permuted or not, and 0.32's shared buffer).
    """
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(f"kv cache {i}: expected a tensor [num_blocks, ...], got {type(t).__name__}")
        if num_blocks is not None and t.shape[0] == 2 and t.shape[1] == num_blocks and num_blocks != 2:
            # [2, num_blocks, ...] (K and V apart): two half pages per block, each its own "layer";
            # a host slot still holds the whole block.
            out.extend(page_views([t[0], t[1]], num_blocks))
            continue
        if num_blocks is not None and t.shape[0] != num_blocks:
            raise ValueError(f"kv cache {i}: dim 0 has {t.shape[0]} entries, expected {num_blocks} blocks")
        inner = sorted(zip(t.stride()[1:], t.shape[1:]))
        expect = 1
        for stride, size in inner:
            if size > 1 and stride != expect:
                raise ValueError(f"kv cache {i}: a block is not one dense page (shape {tuple(t.shape)}, "
                                 f"strides {t.stride()}); this layout is not supported")
            expect *= size
        es = t.element_size()
        page = expect * es
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        out.append(torch.as_strided(raw, (t.shape[0], page), (t.stride(0) * es, 1), t.storage_offset() * es))
    return out


class WorkerSide:
    def __init__(self, cfg: PrefixCacheConfig, vllm_config: Any, kv_cache_config: Any) -> None:
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        #: the remote tier's client over the host pool (`register_kv_caches`), None when off
        self.remote: Any = None
        #: the client's job id -> (kind, the scheduler's job id), until its final report
        self.remote_jobs: dict[int, tuple[str, int]] = {}
        #: store job id -> (keys, slots) of its blocks, for the put that follows its copy
        self.puts_after: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._remote_seen: dict[str, float] = {}
        self.rank = compat.tensor_parallel_rank()
        self.lead = self.rank == 0  # reports every counter; the other ranks only PER_RANK_STATS
        #: this rank's part of host_cache_gib: its shard of every host slot
        self.tp = compat.tensor_parallel_size(vllm_config)
        self.pool_bytes = cfg.host_cache_bytes // self.tp
        self.layer_names: list[str] = []
        self.num_blocks: int | None = None
        if kv_cache_config is not None:
            self.layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
            self.num_blocks = kv_cache_config.num_blocks
        self.layer_index: dict[str, int] = {}
        self.layers: list[torch.Tensor] = []
        self.pool: HostPool | None = None
        self.engine: CopyEngine | None = None
        # (job or request id, handle, submitted at, whether this entry accounts the handle's bytes and
        # time): a step's jobs share one copy per direction (start_load_kv)
        self.stores: list[tuple[int, CopyHandle, float, bool]] = []
        self.sync_loads: list[tuple[str, CopyHandle, float, bool]] = []
        self.sync_handles: list[CopyHandle] = []  # the distinct handles of sync_loads (one a step)
        self.full_graph_loads = 0  # layer-wise loads waited for whole (full CUDA graph steps)
        #: (step has loads, CUDA graph mode) -> steps: which steps replayed a full CUDA graph
        self.step_modes: collections.Counter = collections.Counter()
        self.async_loads: dict[str, tuple[CopyHandle, float, bool]] = {}
        self.load_blocks: dict[str, list[int]] = {}  # the GPU blocks of each load in flight
        self.failed_blocks: set[int] = set()
        self.report = TPCWorkerMetadata(rank=self.rank)
        self.stats = TPCStats()
        #: every counter this side has handed to vLLM, summed (in-process readers: see stats.py)
        self.totals: dict[str, float] = {}
        debug = cfg.debug
        # debug.record_pages: what every store wrote, by slot, and what the loads found.
        self.debug_pages: dict[int, torch.Tensor] | None = {} if debug.record_pages else None
        self.debug_checked = 0
        self.debug_mismatches: list[tuple[int, int]] = []
        # debug.load_delay_polls / store_delay_polls: polls each async load / store has been
        # held back so far (CPU copies are instant; late reports exercise the waiting paths).
        self._polls: dict[str, int] = {}
        self._store_polls: dict[int, int] = {}
        # Stores are polled where an idle engine keeps stepping until they are reported (the default
        # multi-process engine core: has_pending_push_work). An in-process engine stops stepping with
        # its last request, so a store left copying would hold its GPU blocks (and fail
        # reset_prefix_cache) until the next request: there they are waited for at the end of their
        # step. debug.poll_stores overrides.
        self.poll_stores = compat.multiprocess_engine() if debug.poll_stores is None else debug.poll_stores
        #: (bytes, device seconds) of the latest loads whose device time is known (CUDA)
        self.recent_loads: collections.deque[tuple[int, float]] = collections.deque(maxlen=RECENT)
        self.loads_timed = 0  # loads ever appended to recent_loads
        self._load_step_t0: float | None = None  # start_load_kv of the open step, if it loads
        self._step_timer = _StepTimer(debug.step_timing)

    # ---- setup ---------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.pool is not None:
            # vLLM keeps one worker-side connector per process: a second in-process engine would
            # re-point the first engine's copies at its own KV cache (wrong KV for the first).
            raise RuntimeError(
                "TritonPrefixCacheConnector: a second vLLM engine registered its KV cache with this "
                "process's connector while the first engine is alive; vLLM keeps one KV connector per "
                "process, so run each engine in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1, the "
                "default) or shut the first engine down before starting the next")
        names = [n for n in self.layer_names if n in kv_caches] or list(kv_caches)
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"TritonPrefixCacheConnector: no KV cache tensor for layers {missing}")
        self.layers = []
        for n in names:
            self.layers.extend(page_views([kv_caches[n]], self.num_blocks))
            self.layer_index[n] = len(self.layers) - 1  # its last page view: wait for that one
        page_bytes = self.layers[0].shape[1]
        device = self.layers[0].device
        self.pool = HostPool(HostPoolConfig(
            size_bytes=self.pool_bytes, num_layers=len(self.layers), page_bytes=page_bytes,
            device=device if device.type == "cuda" else "cpu"))
        self.report.pool_slots = self.pool.num_slots
        self.engine = None
        if self.pool.num_slots == 0:  # pinning failed outright: serve without the host tier
            logger.warning("triton-prefix-cache: the host pool has no slot (pinning failed); running "
                           "without a host tier")
            return
        backend = self.cfg.copy_backend
        if device.type != "cuda" and backend not in ("auto", "torch"):
            logger.warning("triton-prefix-cache: copy_backend=%r needs CUDA; a CPU engine copies with torch",
                           backend)
            backend = "torch"
        if backend == "auto" and device.type == "cuda":
            # Never page-wise DMA: the driver's cost per descriptor makes submitting a long load's
            # pages one by one take about as long as copying them.
            for preferred in AUTO_ENGINE_BACKENDS:
                try:
                    self.engine = self._copy_engine(preferred)
                    break
                except ValueError as e:
                    logger.info("triton-prefix-cache: copy backend %s unavailable (%s)", preferred, str(e))
        if self.engine is None:
            self.engine = self._copy_engine(backend)
        warm = ""
        if device.type == "cuda":
            # Block 0 is vLLM's null block (never holds a request's KV); the round trip leaves it as
            # it was. The copy path's one-time set-up (kernel compilation, driver state) then happens
            # here rather than in the first host hit.
            warm = f", warmed up in {1e3 * self.engine.warm_up(block=0, slot=0):.0f} ms"
        # Log records keep their arguments (a handler may hold them): pass text, never the pool.
        rank = f" (rank {self.rank} of {self.tp}: its KV heads)" if self.tp > 1 else ""
        logger.info("triton-prefix-cache: host tier %s%s, copies %s%s", repr(self.pool), rank,
                    self.engine.backend, warm)
        if self.cfg.remote is not None:
            self._connect_remote([kv_caches[n] for n in names], page_bytes)

    def _connect_remote(self, tensors: list[torch.Tensor], page_bytes: int) -> None:
        """Connect the store client over the host pool; fails (naming `remote`) if the store cannot
        be reached, so an engine never starts without the tier it was configured with."""
        from triton_prefix_cache.remote.store import RemoteStore

        from .remote_tier import namespace_fields, worker_namespace

        ns = worker_namespace(self.cfg, self.vllm_config, self.kv_cache_config, tensors, len(self.layers),
                              page_bytes)
        self.remote = RemoteStore.connect(self.cfg.remote_url, ns, self.pool, role="transfers")
        self.report.remote_namespace = namespace_fields(self.remote.namespace)
        logger.info("triton-prefix-cache: remote store %s, namespace %s: %s", self.remote.url.master,
                    self.remote.namespace.digest.hex(), self.remote.namespace.canonical())

    def _copy_engine(self, backend: str) -> CopyEngine:
        return CopyEngine(self.layers, self.pool, backend=backend, layerwise_ahead=self.cfg.layerwise_ahead,
                          staging_bytes=self.cfg.staging_mib << 20)

    # ---- per step --------------------------------------------------------------------------------------
    def start_load_kv(self, meta: TPCMetadata, full_graph: bool = False, mode: str = "?") -> None:
        """Submit the step's stores and loads. full_graph: the forward replays one full CUDA graph,
        which makes no `wait_for_layer_load` calls, so this step's layer-wise loads are waited for
        whole (on the device) before it. mode: the step's CUDA graph mode, counted for tests."""
        self.step_modes[(bool(meta.loads), mode)] += 1
        eng = self.engine
        if eng is None:  # no host tier (or shut down): nothing can be copied; say so, never hang
            self._fail_all(meta)
            return
        for fetch in meta.fetches:  # the store's threads read them; nothing here waits
            self._start_remote("fetch", fetch.job_id, fetch.keys, fetch.slots)
        if meta.loads:
            self._load_step_t0 = time.perf_counter()
        timing = self._step_timer.begin(bool(meta.loads))
        # One copy for the step's stores and one for its layer-wise loads, not one per job: the copy
        # path's fixed cost (two launches per layer with torch, a driver call per chunk with DMA) is
        # paid once per step, not once per request. The forward waits for every layer-wise load
        # anyway; async loads stay one copy each, so each request is ready as soon as its own is.
        # Loads first: the forward waits for them, not for the stores, and a large staged store goes
        # to the copy engine's thread, whose Python work competes for the GIL with this thread's
        # load submission. The order is free: a step's stores read blocks held out of vLLM's free
        # queue and slots not yet findable, its loads write blocks allocated in this step from
        # slots whose stores completed.
        sync_jobs = [job for job in meta.loads if job.layerwise]
        if sync_jobs:
            self._load_group(eng, sync_jobs, True)
        for job in meta.loads:
            if not job.layerwise:
                self._load_group(eng, [job], False)
        if meta.stores:
            self._store_group(eng, meta.stores)
        if full_graph and self.sync_loads:
            for h in self.sync_handles:
                h.wait_all()
            self.stats.add("full_graph_loads", len(self.sync_loads))
            self.full_graph_loads += len(self.sync_loads)
        if timing:
            self._step_timer.submitted()

    def _store_group(self, eng: CopyEngine, jobs: list) -> None:
        t0 = time.perf_counter()
        blocks, slots = _concat(jobs)
        try:
            h = eng.demote(blocks, slots)
        except Exception as e:  # a failed store is a future miss, never an error
            logger.warning("triton-prefix-cache: store of %d blocks failed: %s", len(slots), repr(e))
            self.report.stores_failed.extend(job.job_id for job in jobs)
            return
        for i, job in enumerate(jobs):  # the first entry of a handle accounts its bytes and time
            self.stores.append((job.job_id, h, t0, i == 0))
            if job.remote_keys is not None and self.remote is not None:
                self.puts_after[job.job_id] = (job.remote_keys, job.slots)
        if self.debug_pages is not None:
            self._debug_record(blocks, slots, h)

    def _load_group(self, eng: CopyEngine, jobs: list, layerwise: bool) -> None:
        t0 = time.perf_counter()
        blocks, slots = _concat(jobs)
        try:
            h = self._promote(eng, slots, blocks, layerwise, jobs)
        except Exception as e:
            logger.warning("triton-prefix-cache: load of %d blocks failed: %s", len(slots), repr(e))
            for job in jobs:
                self.failed_blocks.update(job.block_ids)
                self.report.loads_failed.append(job.req_id)
                if not layerwise:
                    self.async_loads[job.req_id] = (_DONE, t0, False)  # still reported as received
            return
        if self.debug_pages is not None:
            self._debug_check(blocks, slots, h)
        if layerwise:
            self.sync_handles.append(h)
        for i, job in enumerate(jobs):
            self.load_blocks[job.req_id] = job.block_ids
            if layerwise:
                self.sync_loads.append((job.req_id, h, t0, i == 0))
            else:
                self.async_loads[job.req_id] = (h, t0, i == 0)

    def _promote(self, eng: CopyEngine, slots: list[int], blocks: list[int], layerwise: bool,
                 jobs: list) -> CopyHandle:
        """Submit one load; a layer-wise load whose submission fails is submitted once more.

        A layer-wise load feeds this very step's forward, which runs whatever happens; vLLM then
        recomputes the blocks reported as failed and drops the step's token, but with async
        scheduling (vLLM 0.26's default) the next step is already scheduled on that token, so a
        failure reported there can still leak one token computed from unloaded KV (a known limit,
        see the top-level README). A second submission turns a transient failure (the copy engine
        already falls back from a failing backend to torch) into a served hit. An async load's
        failure is safe: its request waits for the report before it runs."""
        try:
            return eng.promote(slots, blocks, layerwise=layerwise)
        except Exception as e:
            if not layerwise:
                raise
            logger.warning("triton-prefix-cache: layer-wise load of %d blocks failed at submission (%s); "
                           "retrying once", len(slots), repr(e))
            # counted by the scheduler side, once per load whichever ranks retried it
            self.report.loads_retried.extend(job.req_id for job in jobs)
            return eng.promote(slots, blocks, layerwise=True)

    def _fail_all(self, meta: TPCMetadata) -> None:
        self.report.stores_failed.extend(job.job_id for job in meta.stores)
        for fetch in meta.fetches:
            self.report.remote.append(RemoteReport("fetch", fetch.job_id, [False] * len(fetch.slots)))
        for job in meta.loads:
            self.failed_blocks.update(job.block_ids)
            self.report.loads_failed.append(job.req_id)
            if not job.layerwise:
                self.async_loads[job.req_id] = (_DONE, time.perf_counter(), False)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self.sync_loads:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        for h in self.sync_handles:
            h.wait_layer(layer)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        s = self.stats
        # Polled stores are never waited for: the scheduler holds their GPU blocks until it hears
        # back, so a store may overlap any number of later steps instead of lengthening the step
        # that planned it.
        pending = []
        # a step's store jobs share one handle: ask it once
        ready = {id(h): not self.poll_stores or h.done() for h in _unique_handles(self.stores)}
        for entry in self.stores:
            job_id, h, t0, accounts = entry
            if self.cfg.debug.store_delay_polls:
                self._store_polls[job_id] = polls = self._store_polls.get(job_id, 0) + 1
                if polls <= self.cfg.debug.store_delay_polls:
                    pending.append(entry)
                    continue
                del self._store_polls[job_id]
            if not ready[id(h)]:
                pending.append(entry)
                continue
            h.wait()  # done (or, not polling, wait): releases the handle's index tensors
            put = self.puts_after.pop(job_id, None)
            if h.error is not None:  # failed in the copy engine's submission thread: a future miss
                if accounts:
                    logger.warning("triton-prefix-cache: store of %d blocks failed: %s",
                                   h.num_blocks, repr(h.error))
                self.report.stores_failed.append(job_id)
                continue
            if accounts:
                s.add("store_seconds", time.perf_counter() - t0)
                s.add("store_bytes", h.nbytes)
            s.add("stores", 1)
            self.report.stores_done.append(job_id)
            if put is not None:  # the slots hold the blocks now: write them on to the store
                self._start_remote("put", job_id, *put)
        self.stores = pending
        if self.remote is not None:
            self._poll_remote()
        for req_id, h, t0, accounts in self.sync_loads:
            h.wait()
            self._load_done(req_id, h, t0, accounts)
        self.sync_loads, self.sync_handles = [], []
        self._step_timer.end()
        recving: set[str] = set()
        for req_id, (h, t0, accounts) in list(self.async_loads.items()):
            if self.cfg.debug.load_delay_polls:
                self._polls[req_id] = polls = self._polls.get(req_id, 0) + 1
                if polls <= self.cfg.debug.load_delay_polls:
                    continue
                del self._polls[req_id]
            if h.done():
                del self.async_loads[req_id]
                recving.add(req_id)
                if h is not _DONE:
                    self._load_done(req_id, h, t0, accounts)
        if self._load_step_t0 is not None:  # a step that loads: its host time, forward included
            s.observe("load_step_seconds", time.perf_counter() - self._load_step_t0)
            self._load_step_t0 = None
        return None, (recving or None)

    def _load_done(self, req_id: str, h: CopyHandle, t0: float, accounts: bool) -> None:
        """One request's load is over. `accounts`: this request's entry counts the (shared) copy's
        bytes and times, which its step's other loads leave alone."""
        block_ids = self.load_blocks.pop(req_id, ())
        if h.error is not None:  # failed in the copy engine's submission thread: recompute
            if accounts:
                logger.warning("triton-prefix-cache: load of %d blocks failed: %s", h.num_blocks,
                               repr(h.error))
            self.failed_blocks.update(block_ids)
            self.report.loads_failed.append(req_id)
            return
        s = self.stats
        if accounts:
            if h.submit_seconds is not None:
                self._step_timer.note_submit(h.submit_seconds)
            gpu_s = h.gpu_seconds()
            if gpu_s is not None:
                s.add("load_gpu_seconds", gpu_s)
                self.recent_loads.append((h.nbytes, gpu_s))
                self.loads_timed += 1
            s.add("load_seconds", time.perf_counter() - t0)
            s.add("load_bytes", h.nbytes)
        s.add("loads", 1)
        self.report.loads_done.append(req_id)

    # ---- the remote tier --------------------------------------------------------------------------------
    def _start_remote(self, kind: str, job_id: int, keys: list[list[int]], slots: list[int]) -> None:
        """Start a put or a fetch on the client's threads; one that cannot start is reported failed
        at once (its slots untouched)."""
        if self.remote is None:
            self.report.remote.append(RemoteReport(kind, job_id, [False] * len(slots)))
            return
        start = self.remote.start_put if kind == "put" else self.remote.start_get
        try:
            store_job = start(np.asarray(keys, dtype=np.int64).reshape(-1, 2),
                              np.asarray(slots, dtype=np.int64))
        except Exception as e:  # a bad job is a miss, never an error for the step
            logger.warning("triton-prefix-cache: remote %s of %d blocks not started: %s", kind, len(slots),
                           repr(e))
            self.report.remote.append(RemoteReport(kind, job_id, [False] * len(slots)))
            return
        self.remote_jobs[store_job] = (kind, job_id)

    def _poll_remote(self) -> None:
        """Report the remote jobs the client finished (or gave up waiting for) since the last poll."""
        for r in self.remote.poll():
            entry = self.remote_jobs.get(r.job_id)
            if entry is None:
                continue
            if r.slots_free:
                del self.remote_jobs[r.job_id]
            kind, job_id = entry
            if kind == "fetch" and r.slots_free and not r.timed_out and self.debug_pages is not None:
                # debug.record_pages: a fetched slot holds what another engine stored; a load
                # from it must restore exactly these bytes
                for slot in r.slots[r.ok].tolist():
                    self.debug_pages[slot] = self.pool.slots[slot].clone()
            self.report.remote.append(RemoteReport(kind, job_id, r.ok.tolist(), final=r.slots_free))

    def diagnostics(self) -> Diagnostics:
        return Diagnostics(role="worker", loads_timed=self.loads_timed, recent_loads=tuple(self.recent_loads),
                           step_timings=tuple(dict(r) for r in self._step_timer.done))

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self.failed_blocks = self.failed_blocks, set()
        return out

    def build_worker_meta(self) -> TPCWorkerMetadata | None:
        if self.report.is_empty():
            return None
        out, self.report = self.report, TPCWorkerMetadata(rank=self.rank)
        return out

    def get_stats(self) -> TPCStats | None:
        self.stats.set("inflight_loads", len(self.async_loads))
        if self.pool is not None and self.pool.stats.pin_failures:
            self.stats.set("host_pool_pin_failures", self.pool.stats.pin_failures)
        if self.remote is not None:
            remote_stats_into(self.stats, self.remote.stats, self._remote_seen)
        if not self.lead:  # vLLM sums the ranks: a job counts once, a time is one rank's
            self.stats.data = {k: v for k, v in self.stats.data.items() if k in PER_RANK_STATS}
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, TPCStats()
        out.add_counters_to(self.totals)
        return out

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.remote is not None:
            # Puts in flight finish (up to the client's wait); a call stuck in the store may still
            # write the pool, which must then outlive this engine rather than be freed under it.
            quiet = self.remote.close()
            self.remote = None
            if not quiet:
                logger.warning("triton-prefix-cache: a remote store call is still in flight at shutdown; "
                               "the host pool is left allocated")
                _STRANDED_POOLS.append(self.pool)  # referenced for good: its memory is never freed
                self.layers = []
                self.pool = None
                return
        if self.pool is not None:
            self.layers = []
            self.pool.close()
            self.pool = None

    # ---- debug.record_pages ----------------------------------------------------------------------------
    def _pages(self, block: int) -> torch.Tensor:
        return torch.stack([layer[block] for layer in self.layers]).cpu()

    def _debug_record(self, block_ids: list[int], slots: list[int], h: CopyHandle) -> None:
        h.wait()
        assert self.debug_pages is not None and self.pool is not None
        for b, s in zip(block_ids, slots):
            self.debug_pages[s] = self._pages(b).clone()

    def _debug_check(self, block_ids: list[int], slots: list[int], h: CopyHandle) -> None:
        h.wait()
        assert self.debug_pages is not None
        for b, s in zip(block_ids, slots):
            want = self.debug_pages.get(s)
            self.debug_checked += 1
            if want is None or not torch.equal(self._pages(b), want):
                self.debug_mismatches.append((b, s))


class _StepTimer:
    """debug.step_timing: timing of the steps that load. Host time `start_load_kv` takes (`submit_ms`),
    host time the copy engine's thread takes to submit the step's layer-wise loads
    (`load_submit_ms`), host time from `start_load_kv` to the end of `get_finished` (forward launch
    and the wait for the layer-wise loads included), and device time of the same span on the
    compute stream. Device times are read
    once their events complete, never by waiting. CPU time of the thread that runs the step over
    the same spans (`submit_cpu_ms`, `cpu_ms`; a wall time well above it: the thread waited, for
    the GIL or the OS) and of the process's other threads (`other_cpu_ms`), to tell a slow step's
    own work from contention."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and torch.cuda.is_available()
        self.done: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self._open: dict | None = None
        self._unresolved: list[dict] = []

    def begin(self, loads: bool) -> bool:
        if not (self.enabled and loads):
            return False
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._open = {"t0": time.perf_counter(), "ev0": ev, "c0": time.thread_time(),
                      "p0": time.process_time()}
        return True

    def submitted(self) -> None:
        if self._open is not None:
            self._open["submit_ms"] = 1e3 * (time.perf_counter() - self._open["t0"])
            self._open["submit_cpu_ms"] = 1e3 * (time.thread_time() - self._open["c0"])

    def note_submit(self, seconds: float) -> None:
        """The host time a load of the open step took to submit (in the copy engine's thread)."""
        if self._open is not None:
            self._open["load_submit_ms"] = max(self._open.get("load_submit_ms", 0.0), 1e3 * seconds)

    def end(self) -> None:
        if self._open is not None:
            rec = self._open
            self._open = None
            rec["host_ms"] = 1e3 * (time.perf_counter() - rec["t0"])
            cpu = time.thread_time() - rec.pop("c0")
            rec["cpu_ms"] = 1e3 * cpu
            rec["other_cpu_ms"] = 1e3 * (time.process_time() - rec.pop("p0") - cpu)
            rec["ev1"] = torch.cuda.Event(enable_timing=True)
            rec["ev1"].record()
            self._unresolved.append(rec)
        still = []
        for rec in self._unresolved:
            if rec["ev1"].query():
                ev0, ev1 = rec.pop("ev0"), rec.pop("ev1")
                rec["device_ms"] = ev0.elapsed_time(ev1)
                rec.pop("t0")
                self.done.append(rec)
            else:
                still.append(rec)
        self._unresolved = still


def _concat(jobs: list) -> tuple[list[int], list[int]]:
    """(GPU block ids, host slots) of a step's jobs, back to back, pairs in order."""
    return [b for job in jobs for b in job.block_ids], [s for job in jobs for s in job.slots]


def _unique_handles(entries: list) -> list[CopyHandle]:
    """The distinct handles of (id, handle, ...) entries, in order (a step's loads share one)."""
    seen: dict[int, CopyHandle] = {}
    for entry in entries:
        seen.setdefault(id(entry[1]), entry[1])
    return list(seen.values())


class _Done:
    """Stands in for the handle of a load that failed at submission: done, nothing moved."""

    nbytes = 0

    def done(self) -> bool:
        return True


_DONE: Any = _Done()
