"""Scheduler half of the connector: decides what the host tier serves and what gets demoted.

Runs in vLLM's EngineCore, next to its Scheduler. Per step it answers host-tier lookups
(`get_num_new_matched_tokens`, after vLLM's own GPU hit), pins the slots of the loads it promised
(`update_state_after_alloc`), and in `build_connector_meta` hands the worker this step's loads and
stores. Invariants:
- a block is offered from the host tier only if its full 128-bit key is in the index, i.e. its
  store has completed (the tier makes keys findable only then);
- a slot promised to a load is pinned from `update_state_after_alloc` until the worker reports
  the load finished, so no store can reuse it meanwhile;
- a GPU block being copied to the host is held (one extra reference, out of vLLM's free queue)
  from the step that plans the copy until the worker reports it done, so vLLM cannot reuse it;
- keys are derived from `Request.block_hashes` once per block per request (cached on `_ReqState`);
- a store copies a GPU block only while it holds the request's block (its cached hash is that
  block's): blocks a sliding-window group frees mid-request may go to another request;
- in a group of sliding-window layers only, a hit needs host copies of its blocks inside the
  window of the request's next token (`_window_hit`), and a load writes only the blocks vLLM
  allocated, never its null block (put where the hit's blocks lie before that window);
- a job (a load or a store) is over only when every rank has reported it (`_Awaited`): its slots
  stay pinned and its GPU blocks held until then, and it succeeded only if it succeeded on every
  rank (a store that failed anywhere is never findable; a load that failed anywhere is recomputed
  by vLLM on every rank, from the block ids that rank reported). A job some rank has not reported
  `report_timeout_s` after it was handed over stops the engine with an error (`ReportTimeout`)
  instead of leaving its request and blocks waiting for good.

Tensor parallelism: this side decides once for all ranks. Every rank's worker runs the same loads
and stores on its own shard of each block and slot (`host_cache_gib` is the total over the ranks),
and reports each job once.

Load modes: a layer-wise load runs in the request's own step, each layer's attention waiting for
that layer's copy, so the whole step (every other request's decode in it too) waits for the copy;
an async load lets the request wait while the others keep stepping. `load="auto"` picks per
request: layer-wise when no other request runs (nothing to stall; the lowest TTFT), async
otherwise.

The remote tier (`remote`, tensor parallel size 1): this side keeps its own store client, without
a pool, for existence checks; the worker's client moves the bytes. Invariants:
- a lookup that stops in the host tier asks the store once per request about the blocks that
  follow (one batched check, at most `lookup_timeout_ms`); blocks it holds are fetched into host
  slots taken with `begin_store` (STORING: not findable, never evicted or reused) while the
  request waits (`get_num_new_matched_tokens` answers None: asked again next step) and the host
  hit found so far stays pinned; a fetched block becomes findable only once the worker has read
  and verified it, then the request loads it as any host hit;
- a request whose next block another request's fetch brings waits for that fetch;
- every block a store copies to the host is then written on to the store by the worker (a put
  after the copy, same job id): its slot is STORING until the copy is reported and pinned from
  then until the put is reported with its slots free, so the put never reads a reused slot;
- the store's failures cost misses, never a request: a fetch that fails or times out lets its
  request go on without the blocks (their slots are freed only once the store no longer writes
  them), and a store gone away answers every check "absent" until it is back.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from triton_prefix_cache.config import PrefixCacheConfig
from triton_prefix_cache.keys import keys_from_block_hashes
from triton_prefix_cache.remote.keys import RemoteNamespace

from . import LOGGER_NAME, compat
from .host_tier import HostTier
from .metadata import FetchJob, LoadJob, RemoteReport, StoreJob, TPCMetadata, TPCWorkerMetadata
from .stats import Diagnostics, TPCStats, remote_stats_into

if TYPE_CHECKING:
    from triton_prefix_cache.remote.store import RemoteStore
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.request import Request

logger = logging.getLogger(LOGGER_NAME)


#: A request's keys before any are converted (shared: `keys_for` replaces it, never writes into it).
_NO_KEYS = torch.empty((0, 2), dtype=torch.int64)


#: The most blocks one fetch from the remote tier asks for: half the worker client's blocks in
#: flight (`remote.store.DEFAULT_MAX_INFLIGHT_BLOCKS`), so that a very long prompt's fetch is never
#: refused as too big; the rest of such a prompt is computed.
MAX_FETCH_BLOCKS = 4096
#: The part of `report_timeout_s` after which a fetch's request stops waiting for it.
FETCH_PATIENCE = 0.5

#: Requests that may start in the next step without having been looked up yet (each can round one
#: partial block up): the slack of `demotion_window`.
NEW_REQUEST_SLACK = 64


def demotion_window(budget_blocks: int, max_num_seqs: int, live_requests: int) -> int:
    """How many blocks at the head of vLLM's free queue lazy demotion keeps copied: what the next
    step can allocate. Its prompt and decode tokens fit the token budget (`budget_blocks` full
    blocks), and each request it schedules can round up one partial block more; those are the
    requests the connector knows (running or waiting) plus a few arriving, never more than
    `max_num_seqs`. Counting a partial block for every one of `max_num_seqs` (1,024 by default on
    a GPU) would make the window a whole KV cache of a few GiB, and copy every cached block to the
    host, also those that never leave VRAM. A step that outruns the window evicts blocks the host
    tier then lacks: a later miss (`partial_host_hits`), never wrong KV."""
    return budget_blocks + min(max_num_seqs, live_requests + NEW_REQUEST_SLACK)


@dataclass
class _ReqState:
    """What the adapter remembers about one request between hooks."""

    keys: torch.Tensor = _NO_KEYS
    # Lookup result of the last get_num_new_matched_tokens: first block looked at, and the length
    # of the leading run found in the host tier.
    plan_start: int = 0
    plan_n: int = 0
    # write_through: the request's GPU block ids, and how many of its leading full blocks were
    # handled (stored, being stored, or found in the host tier already).
    block_ids: list[int] = field(default_factory=list)
    stored_blocks: int = 0
    counted: bool = False
    fresh: bool = False  # a lookup happened that update_state_after_alloc has not accounted yet
    load_async: bool = False  # how the load planned by the last lookup runs
    noted: tuple[int, int] | None = None  # the last partial hit recorded (first block, blocks found)
    load_failed: bool = False  # a load of this request failed: it recomputes, never asks the tier again
    request: Any = None
    sched_seconds: float = 0.0  # scheduler time spent in the adapter's hooks for this request
    remote_checked: bool = False  # the remote tier was asked about this request (once per request)
    fetch_job: int | None = None  # the fetch this request waits for
    remote_blocks: frozenset[int] = frozenset()  # indices of the blocks the remote tier delivered
    remote_tokens: int = 0  # of the hit last admitted: tokens the remote tier delivered

    def keys_for(self, request: Request) -> torch.Tensor:
        """Keys of all the request's full blocks; only blocks hashed since the last call are converted."""
        hashes = request.block_hashes
        n_have = self.keys.shape[0]
        if len(hashes) > n_have:
            new = keys_from_block_hashes(hashes[n_have:])
            self.keys = new if n_have == 0 else torch.cat([self.keys, new])
        return self.keys


@dataclass
class _Store:
    blocks: list[KVCacheBlock]
    slots: list[int]
    lazy: bool
    keys: torch.Tensor  # int64 (n, 2), the blocks' keys


@dataclass
class _Fetch:
    """A fetch from the remote tier into host slots, from planning until its final report."""

    req_id: str
    keys: np.ndarray  # int64 (n, 2)
    slots: list[int]  # STORING until the final report
    host_pins: list[int]  # the request's host hit so far, pinned until the first report
    blocks: list[int]  # the request's block index of each key
    released: bool = False  # the first report came: the request no longer waits
    timed_out: bool = False  # the first report came at the store's timeout: every block failed


@dataclass
class _Put:
    """The put that follows a store's copy: its slots, pinned once the copy is reported."""

    slots: list[int]
    pinned: bool = False
    reported: bool = False  # some report came (a timed-out put reports twice)
    final: bool = False  # the store no longer reads its slots


class ReportTimeout(RuntimeError):
    """Some rank did not report a job within `report_timeout_s` of its hand-over."""


@dataclass
class _Awaited:
    """A job handed to the workers, until every rank has reported it (done or failed)."""

    kind: str  # "load" or "store"
    since: float  # time.monotonic() of the hand-over
    ranks: set[int] = field(default_factory=set)  # ranks that reported it
    ok: bool = True  # no rank reported it failed
    retried: bool = False  # a rank submitted it a second time (layer-wise loads)


class SchedulerSide:
    def __init__(self, cfg: PrefixCacheConfig, vllm_config: Any, kv_cache_config: Any) -> None:
        self.cfg = cfg
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        self.block_size: int = spec.block_size
        self.num_layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
        #: a group of sliding-window layers only: the tokens before the next one whose blocks vLLM
        #: keeps (`_window_hit`); None where every token's KV is kept
        self.window: int | None = compat.attention_window(kv_cache_config)
        self.page_bytes: int = spec.page_size_bytes  # one rank's page: its KV heads
        self.tp = compat.tensor_parallel_size(vllm_config)
        #: one host slot: a block, all layers, the shards of every rank
        self.slot_bytes = self.num_layers * self.page_bytes * self.tp
        num_slots = cfg.host_cache_bytes // self.slot_bytes
        if num_slots < 1:
            ranks = f" x {self.tp} ranks" if self.tp > 1 else ""
            raise ValueError(
                f"config key 'host_cache_gib' = {cfg.host_cache_gib} holds no block: one block of this model "
                f"takes {self.slot_bytes} bytes ({self.num_layers} layers x {self.page_bytes}{ranks})"
            )
        #: reports each job needs, one per rank (what vLLM's KVOutputAggregator counts too)
        self.num_ranks = compat.reporting_ranks(vllm_config)
        #: (kind, job id or request id) -> the job, from its hand-over until every rank reported it;
        #: in hand-over order, so the oldest is first (the report deadline)
        self.awaited: dict[tuple[str, Any], _Awaited] = {}
        self.tier = HostTier(num_slots, self.slot_bytes, index_backend=cfg.index_backend,
                             eviction=cfg.eviction)
        sched = vllm_config.scheduler_config
        # Lazy demotion copies the blocks vLLM will reuse next (`demotion_window`).
        self.budget_blocks = -(-sched.max_num_batched_tokens // self.block_size)
        self.max_num_seqs = sched.max_num_seqs
        self.load_mode = cfg.load
        #: the requests the latest step scheduled (finished ones leave at once): the batch a
        #: layer-wise load would stall
        self.running: set[str] = set()
        self.pool: BlockPool | None = None
        #: (GPU block id, block hash) of cached blocks vLLM evicted since the last step, checked
        #: against the host tier once per step (`missed_demotions`)
        self._evicted: list[tuple[int, bytes]] = []
        self._evictions_seen = 0
        #: the index's counters at the last get_stats (its start-up compilation not counted)
        self._index_seen: dict[str, int] = {"index_launches": self.tier.manager.index.operations}
        self.reqs: dict[str, _ReqState] = {}
        self.pending_loads: list[LoadJob] = []
        self.inflight_loads: dict[str, list[int]] = {}  # req id -> pinned slots
        #: host slots that async loads in flight read, with how many read each: vLLM caches an async
        #: load's blocks only when it completes, so a request asking about those keys waits for it
        self._async_reads: collections.Counter[int] = collections.Counter()
        self._async_loads: dict[str, list[int]] = {}  # req id -> the slots its async load reads
        self.pending_stores: list[_Store] = []  # write_through: planned at request finish
        self.inflight_stores: dict[int, _Store] = {}
        #: GPU block id held by a store -> whether a request used the block meanwhile (it then goes
        #: back to the LRU tail of vLLM's free queue, else to the head where it was)
        self.held_by_store: dict[int, bool] = {}
        #: the latest partial host hits (`_note_partial`), for `diagnostics()`
        self.recent_partial_hits: collections.deque[dict] = collections.deque(maxlen=256)
        # GPU block id -> the block hash its host copy matches. Lets the per-step demotion scan skip
        # blocks it already settled; cleared whenever the host tier evicts or resets (a host copy
        # may be gone then).
        self._settled: dict[int, bytes] = {}
        self._evictions_when_settled = 0  # the host tier's evictions when `_settled` was last cleared
        self._last_scan: tuple | None = None
        self._job_ids = itertools.count()
        self.stats = TPCStats()
        self.stats.set("host_slots", num_slots)
        #: every counter this side has handed to vLLM, summed (in-process readers: see stats.py)
        self.totals: dict[str, float] = {}
        self.hit_source = compat.host_hit_source()
        self.remote_source = compat.remote_hit_source()
        #: the remote tier: this side's client (lookups only) and whether the worker has reported
        #: the namespace; no lookup happens before (the worker alone sees the KV layout)
        self.remote: RemoteStore | None = None
        self.remote_ready = False
        #: the worker's first report arrived (with its pool, and its namespace if it connected)
        self.worker_known = False
        self._remote_seen: dict[str, float] = {}
        #: fetch job id -> the fetch, from planning until its final report
        self.fetches: dict[int, _Fetch] = {}
        #: key (two ints) -> the fetch bringing it into the host tier, until its first report
        self._fetching: dict[tuple[int, int], int] = {}
        self.pending_fetches: list[FetchJob] = []
        #: store job id -> the put following its copy, until the put's final report
        self.puts: dict[int, _Put] = {}
        if cfg.remote is not None:
            self.remote = _connect_lookups(cfg, vllm_config, kv_cache_config)

    # ---- vLLM hooks ------------------------------------------------------------------------------
    def bind_gpu_block_pool(self, pool: BlockPool) -> None:
        self.pool = pool
        if not compat.watch_evictions(pool, self._on_evict):
            logger.info("triton-prefix-cache: this vLLM evicts GPU blocks without a hook; the "
                        "missed_demotions counter stays 0")

    def _on_evict(self, block: KVCacheBlock) -> None:
        if not block.is_null:  # the watch calls this for cached blocks only
            self._evicted.append((block.block_id, compat.block_hash_of(block)))

    def _loads_async(self, req_id: str) -> bool:
        if self.load_mode != "auto":
            return self.load_mode == "async"
        return any(r != req_id for r in self.running)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        t0 = time.perf_counter()
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _ReqState()
        bs = self.block_size
        start = num_computed_tokens // bs
        # At least one prompt token is left to compute, so the forward produces logits.
        end = (request.num_tokens - 1) // bs
        st.plan_start, st.plan_n, st.fresh, st.request = start, 0, True, request
        if st.fetch_job is not None:  # its blocks are still on their way from the remote tier
            return self._wait(st, t0)
        if self.remote is not None and not self.worker_known:
            # The namespace comes with the worker's first report, after the engine's first step
            # (an empty one, if every request waits): until then a lookup would miss the store.
            return self._wait(st, t0)
        # A request whose load failed recomputes: offering the same hit again could leave it, after
        # vLLM freed its blocks, at the head of the queue waiting for room it cannot get.
        eligible = end > start and num_computed_tokens % bs == 0 and not st.load_failed
        if eligible and len(self.tier):
            if self.window is not None:
                st.plan_n = self._window_hit(st.keys_for(request), start, end)
            else:
                st.plan_n = self._match(request, st, start, end)
        n = st.plan_n
        if eligible and n < end - start and self.remote_ready and not st.remote_checked:
            if self._remote_lookup(request, st, start, start + n, end):
                return self._wait(st, t0)
        # The host tier holds part of this prefix: record where and why, once per outcome (vLLM
        # asks again every step while the request waits for GPU blocks). Not in a sliding-window
        # group, whose host tier holds windows rather than whole prefixes.
        if 0 < n < end - start and st.noted != (start, n) and self.window is None:
            st.noted = (start, n)
            self._note_partial(request, start, n, end - start)
        s = self.stats
        if not st.counted:  # one request counts once, however often vLLM asks
            st.counted = True
            s.add("sched_requests", 1)
        # Another request's async load reads this prefix right now (vLLM caches its blocks only when
        # it completes): ask again later and hit them in VRAM then, rather than copying the same
        # prefix over PCIe once per request (a burst sharing one long prefix). A layer-wise load's
        # blocks are cached at allocation: vLLM's own lookup finds them.
        deferred = bool(n) and bool(self._async_reads) and self._read_by_async_load(
            request.request_id, st.keys[self._first_loaded(start, n)])
        if deferred:
            st.plan_n = 0
            s.add("deferred_requests", 1)
        st.load_async = bool(n) and self._loads_async(request.request_id)
        dt = time.perf_counter() - t0
        s.add("sched_seconds", dt)
        st.sched_seconds += dt
        return (None, False) if deferred else (n * bs, st.load_async)

    def _match(self, request: Request, st: _ReqState, start: int, end: int) -> int:
        """Blocks [start, end) of the request found in the host tier, leading ones. Answered with
        the other waiting requests' lookups (`HostTier.match_request`). Most misses happen at the
        first block: until it hits, only that block's key is derived and probed."""
        rid = request.request_id
        if st.keys.shape[0] <= start:
            if not self.tier.match_request(rid, start, keys_from_block_hashes(
                    request.block_hashes[start : start + 1])):
                return 0
        return self.tier.match_request(rid, start, st.keys_for(request)[start:end])

    def _wait(self, st: _ReqState, t0: float) -> tuple[None, bool]:
        """Ask again next step: the request's next blocks are being fetched from the remote tier."""
        st.plan_n = 0
        dt = time.perf_counter() - t0
        self.stats.add("sched_seconds", dt)
        st.sched_seconds += dt
        return None, False

    def _remote_lookup(self, request: Request, st: _ReqState, start: int, first: int, end: int) -> bool:
        """Blocks [first, end) missed the host tier: fetch the leading ones the store holds into
        host slots. True if the request must wait (a fetch, its own or another's, brings them)."""
        keys = st.keys_for(request)
        k0 = keys[first].tolist()
        if (k0[0], k0[1]) in self._fetching:  # another request's fetch brings it: wait for that one
            return True
        st.remote_checked = True
        found = self.remote.leading_hits(keys[first : min(end, first + MAX_FETCH_BLOCKS)])
        if not found:
            return False
        want = keys[first : first + found]
        # The hit found so far stays while the rest comes: pinned before the fetch takes slots, which
        # may evict (least recently used first, as the blocks just matched may well be).
        host = self.tier.manager.lookup(keys[start:first]).tolist() if first > start else []
        if any(slot < 0 for slot in host):  # gone since the match: the request computes the rest
            return False
        self.tier.pin_slots(host)
        slots, _, _ = self.tier.begin_store(want)
        # Keys already in the host tier or on their way there get no slot; a host tier whose slots
        # are all pinned drops the rest: the request computes those blocks, nothing waits for room.
        take = np.flatnonzero(slots >= 0)
        if not len(take):
            self.tier.unpin_slots(host)
            return False
        fetch_keys = want.numpy()[take]
        job = next(self._job_ids)
        fetch_slots = [int(x) for x in slots[take]]
        self.fetches[job] = _Fetch(request.request_id, fetch_keys, fetch_slots, host, (first + take).tolist())
        for a, b in fetch_keys.tolist():
            self._fetching[(a, b)] = job
        self.pending_fetches.append(FetchJob(job, fetch_keys.tolist(), fetch_slots))
        st.fetch_job = job
        return True

    def _window_hit(self, keys: torch.Tensor, start: int, end: int) -> int:
        """Blocks after `start` a request of a sliding-window group can take from the host tier: the
        longest hit whose blocks in the window of the request's next token are all READY. vLLM puts
        its null block in place of the hit's blocks before that window (attention never reads them),
        so those need no host copy; vLLM's own lookup of such a group searches from the right alike.
        (vLLM 0.32 by default hashes only the window before each prompt's end, so the blocks before
        it never reach the host tier at all.)"""
        ready = self.tier.ready(keys[start:end])
        if not ready.any():
            return 0
        n = len(ready)
        # for each hit length r (1..n blocks): the last missing block among the first r, and the
        # first block the hit needs (relative to start)
        missing = np.maximum.accumulate(np.where(ready, -1, np.arange(n)))
        r = np.arange(1, n + 1)
        first = np.maximum(compat.first_block_in_window((start + r) * self.block_size, self.window,
                                                        self.block_size) - start, 0)
        ok = np.flatnonzero(missing < first)
        return int(ok[-1]) + 1 if len(ok) else 0

    def _first_loaded(self, start: int, n: int) -> int:
        """The first block a hit of `n` blocks after `start` loads (see `_window_hit`)."""
        if self.window is None:
            return start
        return max(start, int(compat.first_block_in_window((start + n) * self.block_size, self.window,
                                                           self.block_size)))

    def _read_by_async_load(self, req_id: str, key: torch.Tensor) -> bool:
        if self.window is None:  # the hit's first block: its slot came with the match
            slot = int(self.tier.matched_slots(req_id)[0])
        else:
            slot = int(self.tier.manager.lookup(key[None])[0])
        return slot >= 0 and self._async_reads[slot] > 0

    def _note_partial(self, request: Request, gpu_blocks: int, host_blocks: int, want: int) -> None:
        """A partial host hit (diagnostics, `recent_partial_hits`): where the lookup stopped, the
        state of the first key it did not find (STORING: its store had not completed; absent: never
        stored, or evicted) and how many later blocks of the asked range the host tier holds. Most
        partial hits are natural (a document's new question, a chat's new turn: nothing later is
        stored); one with later blocks stored is a hole, a block lost or not yet stored in the middle
        of a stored prefix, and only those count in the stat `partial_host_hits`."""
        st = self.reqs[request.request_id]
        rest = st.keys_for(request)[gpu_blocks + host_blocks : gpu_blocks + want]
        state = self.tier.manager.key_states(rest[:1])[0]
        later = int((self.tier.manager.lookup(rest[1:]) >= 0).sum()) if len(rest) > 1 else 0
        if later:
            self.stats.add("partial_host_hits", 1)
        self.recent_partial_hits.append({
            "req": request.request_id, "gpu_blocks": gpu_blocks, "host_blocks": host_blocks,
            "wanted_blocks": want, "next_key": state.name if state is not None else "absent",
            "later_in_host": later, "pending_stores": len(self.pending_stores)})

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        t0 = time.perf_counter()
        st = self.reqs.get(request.request_id)
        if st is None:
            return
        self.tier.admitted(request.request_id)
        if st.fresh:  # vLLM's own GPU hit and what is left, counted once per admission
            st.fresh = False
            self.stats.add("gpu_hit_tokens", st.plan_start * self.block_size)
            self.stats.add("queried_tokens", request.num_tokens - st.plan_start * self.block_size)
        ids: list[int] | None = None
        if self.held_by_store:
            ids = compat.request_block_ids(blocks)
            for b in ids[: st.plan_start]:
                if b in self.held_by_store:
                    self.held_by_store[b] = True  # a request reads it: release to the LRU tail
        if num_external_tokens > 0:
            n = num_external_tokens // self.block_size
            assert n <= st.plan_n, (n, st.plan_n)
            lo = st.plan_start
            if ids is None:
                ids = compat.request_block_ids(blocks)
            loaded = list(range(n))
            keys = st.keys[lo : lo + n]
            if self.window is not None:
                # Only the blocks vLLM allocated are loaded: a sliding-window group gets its null
                # block in place of the hit's blocks that lie before the window of the request's
                # next token (attention never reads them). The last one, holding the token before
                # the next, is always in the window, so a load is never empty.
                hit = compat.request_blocks(blocks)[lo : lo + n]
                loaded = [i for i, b in enumerate(hit) if not b.is_null]
                if lo + loaded[0] < self._first_loaded(lo, n):
                    raise RuntimeError(
                        f"triton-prefix-cache: vLLM allocated block {lo + loaded[0]} of a sliding-window "
                        f"hit ending at block {lo + n}, before the window this connector checked the host "
                        "tier for; its window rule differs from compat.first_block_in_window")
                keys = keys[loaded]
            slots = self.tier.pin(keys)
            block_ids = [ids[lo + i] for i in loaded]
            if self.cfg.demote == "lazy":
                # These GPU blocks will hold copies of host blocks: the demotion scan can skip them
                # when they near eviction, instead of looking each one up again then.
                hashes = request.block_hashes[lo : lo + n]
                self._settled.update((ids[lo + i], compat.cached_hash(hashes[i])) for i in loaded)
            self.pending_loads.append(LoadJob(request.request_id, slots, block_ids, not st.load_async))
            self.inflight_loads[request.request_id] = slots
            s = self.stats
            s.add("host_hit_tokens", num_external_tokens)
            hit = range(st.plan_start, st.plan_start + n)
            remote = sum(b in hit for b in st.remote_blocks) * self.block_size
            st.remote_tokens, st.remote_blocks = remote, frozenset()  # counted once per fetch
            if remote:
                s.add("remote_hit_tokens", remote)
            if st.load_async:
                s.add("async_loads", 1)
                self._async_loads[request.request_id] = slots
                self._async_reads.update(slots)
            st.plan_n = 0
        # Scheduled in this pass: requests asked after it load async rather than stall it.
        self.running.add(request.request_id)
        dt = time.perf_counter() - t0
        self.stats.add("sched_seconds", dt)
        st.sched_seconds += dt

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict:
        if num_external_tokens == 0 or self.hit_source is None:
            return {}
        st = self.reqs.get(request.request_id)
        remote = min(st.remote_tokens, num_external_tokens) if st is not None else 0
        if not remote or self.remote_source is None:
            return {self.hit_source: num_external_tokens}
        st.remote_tokens = 0
        out = {self.remote_source: remote}
        if num_external_tokens > remote:
            out[self.hit_source] = num_external_tokens - remote
        return out

    def build_connector_meta(self, scheduler_output: Any) -> TPCMetadata:
        t0 = time.perf_counter()
        meta = TPCMetadata(loads=self.pending_loads, fetches=self.pending_fetches)
        self.pending_loads, self.pending_fetches = [], []
        if self.load_mode == "auto":
            self.running = set(scheduler_output.num_scheduled_tokens)
        if self._evicted:
            self._count_missed_demotions()
        if self.cfg.demote == "lazy":
            self._plan_lazy()
        else:
            self._plan_write_through(self._track_blocks(scheduler_output))
        for st_ in self.pending_stores:
            job = next(self._job_ids)
            self.inflight_stores[job] = st_
            # Write-behind: every block copied to the host goes on to the store (the worker asks
            # the store first and writes only what it lacks).
            remote_keys = st_.keys.tolist() if self.remote_ready else None
            if remote_keys is not None:
                self.puts[job] = _Put(st_.slots)
            meta.stores.append(StoreJob(job, [b.block_id for b in st_.blocks], st_.slots, remote_keys))
        self.pending_stores = []
        if meta.loads or meta.stores or meta.fetches:
            now = time.monotonic()
            keys = [("load", job.req_id) for job in meta.loads]
            keys += [("store", job.job_id) for job in meta.stores]
            # A fetch's request waits for its first report; the store reports it within its
            # timeout, so one that never comes is a lost job, as a lost load is.
            keys += [("fetch", job.job_id) for job in meta.fetches]
            for key in keys:
                self.awaited.pop(key, None)  # (a request loading again) stays in hand-over order
                self.awaited[key] = _Awaited(key[0], now)
        self.stats.add("step_seconds", time.perf_counter() - t0)
        return meta

    def update_connector_output(self, output: Any) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, TPCWorkerMetadata):
            t0 = time.perf_counter()
            for report in meta.per_rank():
                self._take_report(report)
            self.stats.add("step_seconds", time.perf_counter() - t0)
        if self.fetches:
            self._release_overdue_fetches()
        if self.awaited:
            self._check_report_deadline()

    def _take_report(self, report: TPCWorkerMetadata) -> None:
        """One rank's report: a job is settled once every rank has reported it."""
        if report.remote_namespace is not None and self.remote is not None:
            self._adopt_namespace(RemoteNamespace(**report.remote_namespace))
        if report.pool_slots is not None:
            self.worker_known = True
            if self.remote is not None and not self.remote_ready:
                # The worker has no host pool to move bytes through (pinning failed outright).
                logger.warning("triton-prefix-cache: the worker runs without a host pool; the remote tier "
                               "is off")
                self.remote.close()
                self.remote = None
        if report.pool_slots is not None and report.pool_slots < self.tier.num_slots:
            # Slots are numbered alike on every rank: the smallest pool bounds the tier.
            logger.warning("triton-prefix-cache: the worker's host pool holds %d slots, not %d%s; "
                           "shrinking the host tier", report.pool_slots, self.tier.num_slots,
                           f" (rank {report.rank})" if self.num_ranks > 1 else "")
            self.tier.limit(report.pool_slots)
            self._settled.clear()
            self._last_scan = None
        for req_id in report.loads_retried:
            job = self.awaited.get(("load", req_id))
            if job is not None:
                job.retried = True
        for kind, ids, ok in (("store", report.stores_done, True), ("store", report.stores_failed, False),
                              ("load", report.loads_done, True), ("load", report.loads_failed, False)):
            for job_id in ids:
                job = self._heard(kind, job_id, report.rank, ok)
                if job is None:
                    continue
                if kind == "store":
                    self._store_settled(job_id, job.ok)
                else:
                    self._load_settled(job_id, job)
        # After the stores: a put is reported no earlier than the copy it follows.
        for rep in report.remote:
            if rep.kind == "fetch":
                self._fetch_reported(rep)
            else:
                self._put_reported(rep)

    def _adopt_namespace(self, ns: RemoteNamespace) -> None:
        self.remote.namespace = ns
        self.remote_ready = True
        logger.info("triton-prefix-cache: remote tier on: store %s, namespace %s (block size %d, %d x %d B "
                    "slots, %s)", self.remote.url.master, ns.digest.hex(), ns.block_size, ns.num_layers,
                    ns.page_bytes, ns.hash_scheme)

    def _fetch_reported(self, rep: RemoteReport) -> None:
        f = self.fetches.get(rep.job_id)
        if f is None:
            return
        if not f.released:  # the first report: the request goes on with what arrived
            f.released = True
            f.timed_out = not rep.final
            self.awaited.pop(("fetch", rep.job_id), None)
            self.tier.unpin_slots(f.host_pins)
            for a, b in f.keys.tolist():
                if self._fetching.get((a, b)) == rep.job_id:
                    del self._fetching[(a, b)]
            st = self.reqs.get(f.req_id)
            if st is not None and st.fetch_job == rep.job_id:
                st.fetch_job = None
                if rep.final:
                    st.remote_blocks = frozenset(b for b, o in zip(f.blocks, rep.ok) if o)
        if not rep.final:
            return
        # Only now does the store no longer write these slots: verified blocks become findable,
        # the others are freed (a timed-out fetch's are all failed, whatever the late call did).
        ok = np.asarray(rep.ok, dtype=bool)
        if len(ok) != len(f.slots) or f.timed_out:
            ok = np.zeros(len(f.slots), dtype=bool)
        good = [s for s, o in zip(f.slots, ok.tolist()) if o]
        bad = [s for s, o in zip(f.slots, ok.tolist()) if not o]
        if good:
            self.tier.end_store(good, True)
        if bad:
            self.tier.end_store(bad, False)
        del self.fetches[rep.job_id]

    def _put_reported(self, rep: RemoteReport) -> None:
        put = self.puts.get(rep.job_id)
        if put is None:
            return
        put.reported = True
        if not rep.final:  # timed out: the store may still read the slots
            return
        put.final = True
        if put.pinned:
            self.tier.unpin_slots(put.slots)
            del self.puts[rep.job_id]
        # else its copy is not settled yet: `_store_settled` publishes the slots without a pin

    def _heard(self, kind: str, job_id: Any, rank: int, ok: bool) -> _Awaited | None:
        """Note a rank's report of a job; the job once every rank has reported it, else None."""
        key = (kind, job_id)
        job = self.awaited.get(key)
        if job is None:  # handed over before a reset of this bookkeeping, or a bug: nothing to settle
            return None
        if rank in job.ranks:
            logger.error("triton-prefix-cache: rank %d reported %s %r twice; ignoring the second report",
                         rank, kind, job_id)
            return None
        job.ranks.add(rank)
        job.ok = job.ok and ok
        if len(job.ranks) < self.num_ranks:
            return None
        del self.awaited[key]
        return job

    def _store_settled(self, job_id: int, ok: bool) -> None:
        st_ = self.inflight_stores.pop(job_id, None)
        if st_ is None:
            return
        # The put that follows the copy reads the slots: publish them pinned, in one call, so no
        # store in between can evict or reuse them. A failed copy has no put.
        put = self.puts.get(job_id)
        pin = put is not None and ok and not put.final
        if put is not None and not pin:
            del self.puts[job_id]
        self.tier.end_store(st_.slots, ok, pin=pin)
        if pin:
            put.pinned = True
        if ok:
            for b in st_.blocks:
                self._settled[b.block_id] = b.block_hash
        self._release(st_)
        if not ok:
            self.stats.add("dropped_stores", len(st_.slots))

    def _load_settled(self, req_id: str, job: _Awaited) -> None:
        slots = self.inflight_loads.pop(req_id, None)
        if slots is not None:
            self.tier.unpin(slots, job.ok)
        read = self._async_loads.pop(req_id, None)
        if read is not None:
            self._async_reads.subtract(read)
            self._async_reads += collections.Counter()  # drop the slots no async load reads now
        if not job.ok:
            self.stats.add("failed_loads", 1)
            st = self.reqs.get(req_id)
            if st is not None:
                st.load_failed = True
        if job.retried:
            self.stats.add("load_retries", 1)

    def _release_overdue_fetches(self) -> None:
        """A fetch is a bonus, never a reason to stop: one still unreported after FETCH_PATIENCE of
        `report_timeout_s` (many blocks from a slow store) lets its request go on, computing what
        has not arrived, as a timed-out fetch does; its slots stay held until the worker's final
        report, since the store may still write them."""
        limit = FETCH_PATIENCE * self.cfg.report_timeout_s
        now = time.monotonic()
        for (kind, job_id), job in list(self.awaited.items()):
            f = self.fetches.get(job_id) if kind == "fetch" else None
            if f is not None and not f.released and now - job.since > limit:
                logger.warning("triton-prefix-cache: fetch %d of %d blocks from the remote tier is not done "
                               "after %.0f s; its request goes on without it", job_id, len(f.slots),
                               now - job.since)
                self._fetch_reported(RemoteReport("fetch", job_id, [False] * len(f.slots), False))

    def _check_report_deadline(self) -> None:
        """Stop, naming the job and the silent ranks, if the oldest unsettled job is overdue: a rank
        that never reports a job would leave its request waiting (vLLM waits for every rank's
        `finished_recving`) or its GPU blocks held (a store), and the engine stepping for good."""
        (kind, job_id), job = next(iter(self.awaited.items()))
        age = time.monotonic() - job.since
        if age <= self.cfg.report_timeout_s:
            return
        missing = sorted(set(range(self.num_ranks)) - job.ranks)
        raise ReportTimeout(
            f"triton-prefix-cache: {kind} {job_id!r} was handed to the workers {age:.1f} s ago and rank(s) "
            f"{missing} of {self.num_ranks} have not reported it (reported by {sorted(job.ranks)}; "
            f"report_timeout_s={self.cfg.report_timeout_s:g}): a copy hangs or a worker lost track of it. "
            "Stopping rather than holding its request and blocks for good.")

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self.running.discard(request.request_id)
        self.tier.admitted(request.request_id)
        st = self.reqs.pop(request.request_id, None)
        if st is not None and st.counted:
            self.stats.observe("sched_request_seconds", st.sched_seconds)
        if st is not None and self.cfg.demote == "write_through" and self.pool is not None:
            # The last step's KV is written (its output came back): store what is still unstored.
            # The tracked block ids, where they cover the request: vLLM's list has its null block
            # in place of the blocks a sliding-window group freed, which may still hold their KV.
            if len(st.block_ids) >= len(block_ids):
                block_ids = st.block_ids
            n_full = min(request.num_computed_tokens // self.block_size, len(block_ids),
                         len(request.block_hashes))
            self._store_range(request, st, block_ids, n_full)
        # A load still in flight keeps its slots pinned until every rank reports it; vLLM itself
        # keeps the request's blocks until then (it waits for every rank's finished_recving).
        return False, None

    def diagnostics(self) -> Diagnostics:
        hits = tuple(dict(p) for p in self.recent_partial_hits)
        return Diagnostics(role="scheduler", recent_partial_hits=hits,
                           host_tier=self.tier.manager.snapshot().as_dict())

    def has_pending_stores(self) -> bool:
        """Work an idle engine must keep stepping for: copies to the host (they hold GPU blocks),
        fetches not handed over yet, and puts not reported yet (they hold host slots)."""
        return bool(self.inflight_stores or self.pending_stores or self.pending_fetches
                    or any(not p.reported for p in self.puts.values()))

    def shutdown(self) -> None:
        """Release the store client (it holds no pool and runs no job)."""
        if self.remote is not None:
            self.remote.close()
            self.remote = None
            self.remote_ready = False

    def reset_cache(self) -> bool:
        """Clear the host tier (vLLM's reset_prefix_cache(reset_connector=True))."""
        ok = self.tier.clear()
        self._settled.clear()
        self._last_scan = None
        if self.remote_ready:
            # The store keeps what was computed before the reset, under this engine's namespace:
            # fetching it back would serve KV the reset meant to drop (e.g. of the weights before
            # an in-place update). Fetches already running land in slots the clear retired.
            self.remote_ready = False
            logger.warning("triton-prefix-cache: prefix cache reset: the remote tier is off for the rest "
                           "of this engine's life (the store's blocks date from before the reset)")
        if not ok:
            logger.warning("triton-prefix-cache: host tier reset deferred entries still being copied; "
                           "they are dropped when done")
        return ok

    def get_stats(self) -> TPCStats | None:
        s = self.stats
        evictions = self.tier.evictions
        if evictions != self._evictions_seen:
            s.add("host_evictions", evictions - self._evictions_seen)
            self._evictions_seen = evictions
        for key, now in (("index_launches", self.tier.manager.index.operations),
                         ("index_match_launches", self.tier.batcher.launches),
                         ("index_matched_requests", self.tier.batcher.requests_probed)):
            if now != self._index_seen.get(key, 0):
                s.add(key, now - self._index_seen.get(key, 0))
                self._index_seen[key] = now
        s.set("host_used_slots", len(self.tier))
        s.set("inflight_loads", len(self.inflight_loads))
        s.set("inflight_stores", len(self.inflight_stores))
        if self.remote is not None:
            remote_stats_into(s, self.remote.stats, self._remote_seen)
            s.set("remote_degraded", int(self.remote.degraded))
        if s.is_empty():
            return None
        s.add_counters_to(self.totals)
        self.stats = TPCStats()
        self.stats.set("host_slots", self.tier.num_slots)
        return s

    # ---- demotion ---------------------------------------------------------------------------------
    def _count_missed_demotions(self) -> None:
        """Cached GPU blocks vLLM evicted while the host tier had no copy of them, stored or being
        stored: each is a recompute if its prefix comes back."""
        evicted, self._evicted = self._evicted, []
        held = self.tier.holds(keys_from_block_hashes([h for _, h in evicted]))
        missed = len(evicted) - int(np.count_nonzero(held))
        if missed:
            self.stats.add("missed_demotions", missed)

    def _plan_lazy(self) -> None:
        """Copy the cached GPU blocks vLLM will reuse first, unless the host tier has them already."""
        pool = self.pool
        if pool is None:
            return
        if self.tier.evictions != self._evictions_when_settled:
            self._settled.clear()
            self._evictions_when_settled = self.tier.evictions
        # Nothing entered or left the head of the free queue since the last scan (typical of decode
        # steps): the window holds what it held then, all of it already settled.
        window = demotion_window(self.budget_blocks, self.max_num_seqs, len(self.reqs))
        head = next(compat.iter_free_blocks(pool), None)
        sig = (head.block_id if head is not None else -1, head.block_hash if head is not None else None,
               pool.get_num_free_blocks(), self._evictions_when_settled, window)
        if sig == self._last_scan:
            return
        settled = self._settled
        cands: list[KVCacheBlock] = []
        hashes: list[bytes] = []
        scanned = 0
        for blk in compat.iter_free_blocks(pool):
            if scanned >= window:
                break
            scanned += 1
            bh = blk.block_hash
            if bh is None or settled.get(blk.block_id) == bh:
                continue
            cands.append(blk)
            hashes.append(compat.block_hash_of(blk))
        if cands:
            self._plan_store(cands, keys_from_block_hashes(hashes), lazy=True)
        if not self.pending_stores:  # settled: every block in the window has a host copy or is gone
            self._last_scan = sig

    def _plan_store(self, blocks: list[KVCacheBlock], keys: torch.Tensor, lazy: bool,
                    pieces: list[int] | None = None) -> None:
        """Copy these GPU blocks to the host unless the tier has (or is storing) their keys already.
        One planning call for all of them; `pieces` (sizes summing to len(blocks)) splits them into
        store jobs, one per request: a job is what a remote put writes, fails or times out whole."""
        slots, present, dropped = self.tier.begin_store(keys)
        if dropped:
            self.stats.add("dropped_stores", dropped)
        for i in np.flatnonzero(present).tolist():
            self._settled[blocks[i].block_id] = blocks[i].block_hash
        slot_list = slots.tolist()
        lo = 0
        for size in pieces or [len(blocks)]:
            ok = [i for i in range(lo, lo + size) if slot_list[i] >= 0]
            lo += size
            if not ok:
                continue
            job_blocks = [blocks[i] for i in ok]
            compat.hold_blocks(self.pool, job_blocks)
            for b in job_blocks:
                self.held_by_store[b.block_id] = not lazy
            self.pending_stores.append(_Store(job_blocks, [slot_list[i] for i in ok], lazy, keys[ok]))

    def _release(self, st_: _Store) -> None:
        back_to_head = []
        for b in st_.blocks:
            used = self.held_by_store.pop(b.block_id, True)
            back_to_head.append(st_.lazy and not used)
        compat.release_blocks(self.pool, st_.blocks, back_to_head)

    # ---- write-through ---------------------------------------------------------------------------
    def _track_blocks(self, so: Any) -> set[str]:
        """Keep each running request's GPU block ids, as the worker's block table does; returns the
        requests this step (re)admits."""
        admitted = set()
        for nr in so.scheduled_new_reqs:
            st = self.reqs.setdefault(nr.req_id, _ReqState())
            st.block_ids = list(nr.block_ids[0])
            admitted.add(nr.req_id)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new = cached.new_block_ids[i]
            if compat.is_resumed(cached, i, req_id):
                st.block_ids = list(new[0]) if new is not None else []
                admitted.add(req_id)
            elif new is not None:
                st.block_ids.extend(new[0])
        return admitted

    def _plan_write_through(self, admitted: set[str]) -> None:
        """Store the full blocks whose KV earlier steps wrote (this step's copy runs after them).

        A request (re)admitted in this step counts its prefix hits as computed, and vLLM may hand
        it a hit on blocks another request it schedules in the same step is computing (their
        attention reads them after the write, within the forward), while this step's copies run
        before its forward. So nothing of a request is stored in the step that admits it; from the
        next step on, whatever it counts as computed was written by a forward queued before that
        step's copies (with vLLM 0.26's asynchronous scheduling too: same stream). Storing earlier
        would copy, for instance, a block of a chat turn that the previous turn, admitted beside
        it, is still computing, and later hits on that key would serve its old contents."""
        if self.pool is None:
            return
        blocks: list[KVCacheBlock] = []
        keys: list[torch.Tensor] = []
        for req_id, st in self.reqs.items():
            req = st.request
            if req is None or req_id in admitted:
                continue
            n_full = min(req.num_computed_tokens // self.block_size, len(st.block_ids))
            got = self._unstored(req, st, st.block_ids, n_full)
            if got is not None:
                blocks += got[0]
                keys.append(got[1])
        if blocks:  # one planning call (one index lookup) for the whole step, a job per request
            self._plan_store(blocks, torch.cat(keys) if len(keys) > 1 else keys[0], lazy=False,
                             pieces=[k.shape[0] for k in keys])

    def _store_range(self, request: Request, st: _ReqState, block_ids: list[int], n_full: int) -> None:
        got = self._unstored(request, st, block_ids, n_full)
        if got is not None:
            self._plan_store(*got, lazy=False)

    def _unstored(self, request: Request, st: _ReqState, block_ids: list[int],
                  n_full: int) -> tuple[list[KVCacheBlock], torch.Tensor] | None:
        """The request's full blocks up to `n_full` not handed to a store yet, with their keys (None
        if there are none), marked handed over."""
        if n_full <= st.stored_blocks:
            return None
        keys = st.keys_for(request)
        n_full = min(n_full, keys.shape[0])
        lo, st.stored_blocks = st.stored_blocks, max(st.stored_blocks, n_full)
        blocks = [self.pool.blocks[b] for b in block_ids[lo:n_full]]
        k = keys[lo:n_full]
        # Only a block that still holds this request's block: a sliding-window group frees blocks
        # that fell out of the window, and vLLM may hand them to another request (their hash is
        # reset then), before this step's copy runs. The null block has no hash.
        hashes = request.block_hashes[lo:n_full]
        keep = [i for i, b in enumerate(blocks) if b.block_hash == compat.cached_hash(hashes[i])]
        if len(keep) == len(blocks):
            return blocks, k
        return ([blocks[i] for i in keep], k[keep]) if keep else None


def _connect_lookups(cfg: PrefixCacheConfig, vllm_config: Any, kv_cache_config: Any) -> RemoteStore:
    """This side's store client: existence checks only (no pool), lending the store no memory
    (`segment_gib` is the worker's). Connecting fails at startup, naming `remote`, where the store
    cannot be reached."""
    from triton_prefix_cache.remote.store import RemoteStore

    from .remote_tier import placeholder_namespace

    url = dataclasses.replace(cfg.remote_url, segment_gib=0.0)
    return RemoteStore.connect(url, placeholder_namespace(vllm_config, kv_cache_config), None, role="lookups")
