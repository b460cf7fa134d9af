"""RemoteStore: the host tier's blocks in a shared Mooncake Store, moved straight from and into
host-pool slots.

Operations (one caller thread; the store's own threads do the I/O):
- `exists(keys)`: which blocks the store holds (one batched check, `lookup_timeout_ms` at most);
- `start_put(keys, slots)`: write-behind of host slots: asks first and writes only the blocks the
  store lacks, each value a header (`keys.py`) then the slot, zero-copy from the registered pool;
- `start_get(keys, slots)`: reads values into host slots (zero-copy into the registered pool) and
  verifies each header and checksum; a block that fails is a miss, never KV;
- `poll()`: the reports of finished jobs; `wait(job_id)`: one job's report, blocking.

Every job started with blocks is reported exactly once with its outcome. A job moves its blocks in
calls of at most CALL_BYTES; one whose call outlives `timeout_ms` is reported at the timeout (all
blocks failed, `slots_free=False`) and once more when that call returns (`slots_free=True`): until
then the store may still read or write its slots, so the caller keeps them. The first failed or
timed-out call degrades the store: a warning is logged once, lookups answer "absent" and jobs fail
at once, until a probe every `retry_s` finds it back.
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import itertools
import logging
import mmap
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from ..host_pool import HostPool
from ..stats import RemoteStats
from .keys import HEADER_BYTES, RemoteNamespace, check_headers, checksum, header_checksums, pack_headers
from .url import RemoteURL, parse_remote_url

log = logging.getLogger(__name__)

#: Mooncake Store error codes (mooncake-store/include/types.h) that this module tells apart.
BUFFER_OVERFLOW = -10
NO_AVAILABLE_HANDLE = -200  # no space left in the store
INVALID_PARAMS = -600
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
REPLICA_NOT_FOUND = -710
REPLICA_IS_GONE = -712
#: codes that mean the key is absent (or not yet readable): a miss, not an error
ABSENT_CODES = (REPLICA_IS_NOT_READY, OBJECT_NOT_FOUND, REPLICA_NOT_FOUND, REPLICA_IS_GONE)
#: put codes that mean another writer has (or is writing) the key
PRESENT_CODES = (OBJECT_ALREADY_EXISTS, OBJECT_HAS_LEASE, REPLICA_IS_NOT_READY)
#: get codes that mean the stored value has another size than asked for: not this format
SIZE_CODES = (BUFFER_OVERFLOW, INVALID_PARAMS)

#: header rows in the registered arena: the most blocks in flight at once
DEFAULT_MAX_INFLIGHT_BLOCKS = 8192
#: the most bytes one put or get call moves; `timeout_ms` applies to each call
CALL_BYTES = 64 << 20
#: a job still queued this many `timeout_ms` after it was submitted (behind slow calls) is dropped
QUEUED_TIMEOUTS = 4
CONNECT_TIMEOUT_S = 30.0
PROBE_KEY = "probe"


class RemoteStoreError(RuntimeError):
    """The store cannot be used at start-up (library missing, unreachable, refused); the message
    names the config key `remote`."""


class BlockStatus(enum.IntEnum):
    """What happened to one block of a job."""

    OK = 0  # put: written; get: read and verified
    PRESENT = 1  # put: the store already had it (or another writer is writing it)
    ABSENT = 2  # get: the store does not have it (any more)
    CORRUPT = 3  # get: header or checksum mismatch (the value is removed)
    DROPPED_FULL = 4  # put: the store had no room
    DROPPED_BUSY = 5  # too many blocks in flight here
    DROPPED_DEGRADED = 6  # the store is degraded: not tried
    SKIPPED_INFLIGHT = 7  # put: the same key is being written by an earlier job here
    ERROR = 8  # the call failed or timed out


@dataclass
class RemoteResult:
    """One report of a job. `ok[i]`: block i is in the store (put) or verified in its slot (get).

    timed_out: reported at the timeout, all blocks failed; `slots_free` is then False and a second
    report with `slots_free=True` follows when the store's call returns (its outcome is ignored).
    """

    job_id: int
    kind: str
    keys: np.ndarray
    slots: np.ndarray
    status: np.ndarray
    nbytes: int = 0
    seconds: float = 0.0
    timed_out: bool = False
    slots_free: bool = True
    late: bool = False

    @property
    def ok(self) -> np.ndarray:
        good = (BlockStatus.OK, BlockStatus.PRESENT) if self.kind == "put" else (BlockStatus.OK,)
        return np.isin(self.status, good)


class StoreClient(Protocol):
    """The part of Mooncake's `MooncakeDistributedStore` this module calls."""

    def register_buffer(self, buffer_ptr: int, size: int) -> int: ...
    def unregister_buffer(self, buffer_ptr: int) -> int: ...
    def batch_is_exist(self, keys: list[str]) -> list[int]: ...
    def batch_put_from_multi_buffers(self, keys: list[str], all_buffer_ptrs: list[list[int]],
                                     all_sizes: list[list[int]]) -> list[int]: ...
    def batch_get_into_multi_buffers(self, keys: list[str], all_buffer_ptrs: list[list[int]],
                                     all_sizes: list[list[int]]) -> list[int]: ...
    def remove(self, key: str, force: bool = False) -> int: ...
    def close(self) -> int: ...


class _Worker:
    """One daemon thread running submitted calls in order. Daemon, so a call stuck in the store's
    C++ client never holds the process at exit (a ThreadPoolExecutor's threads are joined)."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._q.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        self._q.put(None)

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # reported through the future
                fut.set_exception(e)


class _HeaderArena:
    """Registered rows of HEADER_BYTES, one per block in flight (a value is sent as [row, slot])."""

    def __init__(self, rows: int) -> None:
        self._mmap = mmap.mmap(-1, rows * HEADER_BYTES)
        self.rows = np.frombuffer(self._mmap, dtype=np.uint8).reshape(rows, HEADER_BYTES)
        self.address = self.rows.ctypes.data
        self.nbytes = rows * HEADER_BYTES
        self._free = deque(range(rows))
        self._lock = threading.Lock()

    def alloc(self, n: int) -> np.ndarray | None:
        with self._lock:
            if n > len(self._free):
                return None
            return np.array([self._free.popleft() for _ in range(n)], dtype=np.int64)

    def release(self, rows: np.ndarray) -> None:
        with self._lock:
            self._free.extend(rows.tolist())

    @property
    def in_use(self) -> int:
        return len(self.rows) - len(self._free)


@dataclass
class _Job:
    """A job's blocks (`keys`, `slots`, `status`: all those asked for) and the part its thread
    works on (`todo`, with a header row each)."""

    id: int
    kind: str
    keys: np.ndarray
    slots: np.ndarray
    status: np.ndarray
    todo: np.ndarray
    rows: np.ndarray
    future: cf.Future | None = None
    started: float | None = None
    reported: bool = False
    queued: float = 0.0  # when it was submitted to its thread
    put_pairs: list = field(default_factory=list)  # keys this put holds in `_inflight_puts`

    def result(self, **kw: Any) -> RemoteResult:
        return RemoteResult(self.id, self.kind, self.keys, self.slots, self.status, **kw)


class RemoteStore:
    """Blocks of one namespace in a Mooncake Store, read and written through one host pool.

    Build with `connect(url, namespace, pool)`; tests may hand in any `StoreClient`. Without a pool
    (`pool=None`) it answers lookups only: a scheduler that decides, next to a worker that moves
    the bytes with its own RemoteStore over the pool. `role` names this client in its log lines
    (a process may hold several, each degrading on its own). Public state:
    `namespace`, `url`, `role`, `stats` (RemoteStats), `degraded`.
    """

    def __init__(self, client: StoreClient, url: RemoteURL, namespace: RemoteNamespace, pool: HostPool | None,
                 max_inflight_blocks: int = DEFAULT_MAX_INFLIGHT_BLOCKS, role: str = "") -> None:
        if pool is not None and (pool.num_layers, pool.page_bytes) != (namespace.num_layers,
                                                                        namespace.page_bytes):
            raise ValueError(
                f"namespace: geometry {namespace.num_layers} x {namespace.page_bytes} B differs from the "
                f"host pool's {pool.num_layers} x {pool.page_bytes} B")
        self.client = client
        self.url = url
        self.namespace = namespace
        self.pool = pool
        self.role = role
        self._name = f"{url.master} ({role})" if role else url.master
        self.stats = RemoteStats()
        self._slots_np = pool.slots.numpy() if pool is not None and pool.num_slots else None
        self._arena = _HeaderArena(max_inflight_blocks if pool is not None else 1)
        self._registered: list[int] = []
        if pool is not None:
            self._register(self._arena.address, self._arena.nbytes, "header arena")
            if pool.nbytes:
                self._register(pool.address, pool.nbytes, "host pool")
        self._timeout = url.timeout_ms / 1000  # per call of at most CALL_BYTES
        self._queue_limit = QUEUED_TIMEOUTS * self._timeout  # a job queued longer is dropped
        self._lookup_timeout = url.lookup_timeout_ms / 1000
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._ready: deque[RemoteResult] = deque()
        self._inflight_puts: set[tuple[int, int]] = set()
        self._degraded_since: float | None = None
        self._probe: cf.Future | None = None
        self._closed = False
        self._quiet = False  # closed with no call left in flight (`close`)
        self._lookup_worker = _Worker("tpc-remote-lookup")
        self._put_worker = _Worker("tpc-remote-put")
        self._get_worker = _Worker("tpc-remote-get")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: RemoteURL | str, namespace: RemoteNamespace, pool: HostPool | None,
                connect_timeout_s: float = CONNECT_TIMEOUT_S, **kwargs: Any) -> RemoteStore:
        """Connect to the store named by `url` (the config key `remote`). Raises RemoteStoreError,
        naming the key, if the client library is missing or the master or metadata server cannot
        be reached; never waits longer than `connect_timeout_s`."""
        if isinstance(url, str):
            url = parse_remote_url(url)
        namespace = replace(namespace, tenant=url.namespace)
        try:
            from mooncake.store import MooncakeDistributedStore
        except (ImportError, OSError) as e:
            raise RemoteStoreError(
                f"config key 'remote': the Mooncake client cannot be loaded ({e}); install it with "
                "pip install 'triton-prefix-cache[remote]', and Debian's libibverbs1, which it needs "
                "even over TCP (scripts/setup.sh does both)") from e
        _check_reachable(url.host, url.port, "the Mooncake master", min(5.0, connect_timeout_s))
        meta = urlsplit(url.metadata)
        if meta.scheme in ("http", "etcd"):
            _check_reachable(meta.hostname, meta.port, "the metadata server", min(5.0, connect_timeout_s))
        local = url.local_hostname or _route_address(url.host, url.port)
        client = MooncakeDistributedStore()
        worker = _Worker("tpc-remote-connect")
        fut = worker.submit(client.setup, local, url.metadata, url.segment_bytes, 0, url.protocol,
                            url.device, url.master)
        worker.stop()
        try:
            rc = fut.result(timeout=connect_timeout_s)
        except cf.TimeoutError:
            raise RemoteStoreError(
                f"config key 'remote': the Mooncake client did not connect to {url.master} within "
                f"{connect_timeout_s:g} s") from None
        except Exception as e:
            raise RemoteStoreError(f"config key 'remote': connecting to {url.master} failed: {e!r}") from e
        if rc != 0:
            raise RemoteStoreError(
                f"config key 'remote': the Mooncake client refused the set-up (code {rc}) for master "
                f"{url.master}, metadata {url.metadata}, protocol {url.protocol}, local address {local}")
        try:
            store = cls(client, url, namespace, pool, **kwargs)
        except BaseException:
            client.close()
            raise
        log.info("remote store %s: connected (%s)", store._name, url.protocol)
        return store

    def _register(self, address: int, nbytes: int, what: str) -> None:
        rc = self.client.register_buffer(address, nbytes)
        if rc != 0:
            raise RemoteStoreError(f"config key 'remote': registering the {what} ({nbytes} bytes) "
                                   f"with the Mooncake client failed (code {rc})")
        self._registered.append(address)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        return self._degraded_since is not None

    def _degrade(self, why: str) -> None:
        with self._lock:
            self.stats.store_errors += 1
            if self._degraded_since is not None:
                return
            self._degraded_since = time.monotonic()
            self.stats.degraded = 1
            self.stats.degradations += 1
        again = f"probing it every {self.url.retry_s:g} s" if self.url.retry_s else "not probing it again"
        log.warning("remote store %s: %s; serving from the local tiers only, %s", self._name, why, again)

    def _maybe_probe(self) -> None:
        """While degraded: after `retry_s`, one existence check of a probe key on the lookup
        thread; an answer from the master ends the degradation."""
        since = self._degraded_since
        if since is None or not self.url.retry_s or self._closed:
            return
        if self._probe is not None:
            if not self._probe.done():
                return
            probe, self._probe = self._probe, None
            try:
                healthy = probe.result()[0] >= 0
            except Exception:
                healthy = False
            if healthy:
                with self._lock:
                    self._degraded_since = None
                    self.stats.degraded = 0
                    self.stats.recoveries += 1
                log.warning("remote store %s: reachable again; using it", self._name)
            else:
                self._degraded_since = time.monotonic()
            return
        if time.monotonic() - since >= self.url.retry_s:
            self._probe = self._lookup_worker.submit(self.client.batch_is_exist,
                                                     [self.namespace.prefix + PROBE_KEY])

    # ---- lookups -------------------------------------------------------------------------------
    def exists(self, keys: np.ndarray) -> np.ndarray:
        """Which of these block keys (int64 (n, 2)) the store holds; all False while degraded or
        when the check fails or takes longer than `lookup_timeout_ms` (which degrades the store)."""
        keys = _as_keys(keys)
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        if n == 0 or self._closed:
            return found
        self._maybe_probe()
        if self.degraded:
            return found
        fut = self._lookup_worker.submit(self.client.batch_is_exist, self.namespace.object_keys(keys))
        try:
            codes = np.asarray(fut.result(timeout=self._lookup_timeout), dtype=np.int64)
        except cf.TimeoutError:
            with self._lock:
                self.stats.timeouts += 1
            self._degrade(f"an existence check took longer than {self.url.lookup_timeout_ms} ms")
            return found
        except Exception as e:
            self._degrade(f"an existence check failed: {e!r}")
            return found
        if (codes < 0).any():
            self._degrade(f"an existence check failed (code {int(codes[codes < 0][0])})")
        found = codes == 1
        with self._lock:
            self.stats.lookups += 1
            self.stats.lookup_blocks += n
            self.stats.hit_blocks += int(found.sum())
        return found

    def leading_hits(self, keys: np.ndarray) -> int:
        """How many of these consecutive blocks, from the first, the store holds."""
        found = self.exists(keys)
        return int(np.argmin(np.append(found, False)))

    # ---- jobs ----------------------------------------------------------------------------------
    def start_put(self, keys: np.ndarray, slots: np.ndarray) -> int:
        """Write these blocks from their host slots, skipping those the store already has. The
        slots must stay unchanged until the job's report with `slots_free`. Returns the job id."""
        keys, slots = _as_keys(keys), _as_slots(slots, len(keys))
        status = np.full(len(keys), BlockStatus.OK, dtype=np.int8)
        pairs = list(map(tuple, keys.tolist()))
        with self._lock:
            for i, k in enumerate(pairs):
                if k in self._inflight_puts:
                    status[i] = BlockStatus.SKIPPED_INFLIGHT
                else:
                    self._inflight_puts.add(k)
            self.stats.put_skipped_inflight += int((status == BlockStatus.SKIPPED_INFLIGHT).sum())
        todo = np.flatnonzero(status == BlockStatus.OK)
        return self._start("put", keys, slots, status, todo, self._put_worker, self._run_put,
                           [pairs[i] for i in todo])

    def start_get(self, keys: np.ndarray, slots: np.ndarray) -> int:
        """Read these blocks into their host slots and verify them. The slots belong to the job
        until its report with `slots_free`; only blocks with status OK hold KV. Returns the job id."""
        keys, slots = _as_keys(keys), _as_slots(slots, len(keys))
        status = np.full(len(keys), BlockStatus.OK, dtype=np.int8)
        return self._start("get", keys, slots, status, np.arange(len(keys)), self._get_worker,
                           self._run_get, [])

    def _start(self, kind: str, keys: np.ndarray, slots: np.ndarray, status: np.ndarray, todo: np.ndarray,
               worker: _Worker, run: Callable, put_pairs: list) -> int:
        if self.pool is None:
            with self._lock:
                self._inflight_puts.difference_update(put_pairs)
            raise RuntimeError("this RemoteStore has no host pool: it answers lookups only")
        if len(slots) and (slots.min() < 0 or slots.max() >= self.pool.num_slots):
            with self._lock:
                self._inflight_puts.difference_update(put_pairs)
            raise ValueError(f"slots: expected indices in [0, {self.pool.num_slots}), got {slots.min()}.."
                             f"{slots.max()}")
        job_id = next(self._ids)
        drop = None
        if self._closed or self.degraded:
            self._maybe_probe()
            drop = BlockStatus.DROPPED_DEGRADED
        rows = self._arena.alloc(len(todo)) if drop is None and len(todo) else None
        if drop is None and len(todo) and rows is None:
            drop = BlockStatus.DROPPED_BUSY
        if drop is not None or not len(todo):
            if drop is not None:
                status[todo] = drop
                with self._lock:
                    self._inflight_puts.difference_update(put_pairs)
                    if drop == BlockStatus.DROPPED_BUSY:
                        self.stats.drops_busy += len(todo)
                    else:
                        self.stats.drops_degraded += len(todo)
            self._ready.append(RemoteResult(job_id, kind, keys, slots, status))
            return job_id
        job = _Job(job_id, kind, keys, slots, status, todo, rows, queued=time.monotonic(),
                   put_pairs=put_pairs)
        job.future = worker.submit(run, job, put_pairs)
        self._jobs[job_id] = job
        with self._lock:
            self.stats.inflight_blocks = self._arena.in_use
        return job_id

    def poll(self) -> list[RemoteResult]:
        """Reports of jobs that finished or timed out since the last poll (never blocks)."""
        self._collect()
        self._maybe_probe()
        out = list(self._ready)
        self._ready.clear()
        return out

    def wait(self, job_id: int, timeout: float | None = None) -> RemoteResult:
        """Block until `job_id`'s outcome is known (at most its timeout after it starts, or
        `timeout`); other jobs' reports stay for `poll`. TimeoutError if `timeout` passes first."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._collect()
            for r in self._ready:
                if r.job_id == job_id and not r.late:
                    self._ready.remove(r)
                    return r
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(f"job {job_id}: unknown or already reported")
            step = 0.05
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still running after {timeout} s")
                step = min(step, left)
            cf.wait([job.future], timeout=step)

    def _collect(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.future.done():
                del self._jobs[job_id]
                self._arena.release(job.rows)
                try:
                    nbytes, seconds = job.future.result()
                except Exception as e:  # an exception from the client: the job failed
                    self._degrade(f"a {job.kind} raised {e!r}")
                    job.status[job.todo] = BlockStatus.ERROR
                    nbytes, seconds = 0, 0.0
                if job.reported:  # its outcome went out at the timeout; now its slots are free
                    job.status[:] = BlockStatus.ERROR
                    self._ready.append(job.result(late=True))
                else:
                    self._ready.append(job.result(nbytes=nbytes, seconds=seconds))
            elif job.started is None and (self.degraded or now - job.queued > self._queue_limit) \
                    and job.future.cancel():
                # Still queued behind a call that hangs (the store went away) or behind slow ones:
                # never started, so its slots were never touched. Dropped, reported final now.
                del self._jobs[job_id]
                self._arena.release(job.rows)
                drop = BlockStatus.DROPPED_DEGRADED if self.degraded else BlockStatus.DROPPED_BUSY
                job.status[job.todo] = drop
                with self._lock:
                    self._inflight_puts.difference_update(job.put_pairs)
                    if drop == BlockStatus.DROPPED_BUSY:
                        self.stats.drops_busy += len(job.todo)
                    else:
                        self.stats.drops_degraded += len(job.todo)
                self._ready.append(job.result())
            elif job.started is not None and not job.reported and now - job.started > self._timeout:
                job.reported = True
                with self._lock:
                    self.stats.timeouts += 1
                self._degrade(f"a {job.kind} of {len(job.todo)} blocks took longer than "
                              f"{self.url.timeout_ms} ms")
                status = np.full(len(job.keys), BlockStatus.ERROR, dtype=np.int8)
                self._ready.append(RemoteResult(job_id, job.kind, job.keys, job.slots, status,
                                                timed_out=True, slots_free=False))
        with self._lock:
            self.stats.inflight_blocks = self._arena.in_use

    # ---- the I/O threads -----------------------------------------------------------------------
    def _addresses(self, rows: np.ndarray, slots: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        hdr = (self._arena.address + rows * HEADER_BYTES).tolist()
        slot = (self.pool.address + slots * self.pool.slot_bytes).tolist()
        sizes = [HEADER_BYTES, self.pool.slot_bytes]
        return [[h, s] for h, s in zip(hdr, slot)], [sizes] * len(hdr)

    def _call(self, job: _Job, fn: Callable[..., Any], *args: Any) -> np.ndarray:
        """One client call of a job: its start is what the timeout counts from."""
        job.started = time.monotonic()
        return np.asarray(fn(*args), dtype=np.int64)

    def _chunks(self, idx: np.ndarray) -> list[np.ndarray]:
        """Split a job's blocks into calls of at most CALL_BYTES, so that `timeout_ms` bounds one
        call of a known size, not a whole job of any size."""
        per_call = max(1, CALL_BYTES // (HEADER_BYTES + self.pool.slot_bytes))
        return [idx[i:i + per_call] for i in range(0, len(idx), per_call)]

    def _run_put(self, job: _Job, pairs: list[tuple[int, int]]) -> tuple[int, float]:
        t0 = time.monotonic()
        keys, slots, rows = job.keys[job.todo], job.slots[job.todo], job.rows
        status = np.full(len(keys), BlockStatus.DROPPED_DEGRADED, dtype=np.int8)
        full = HEADER_BYTES + self.pool.slot_bytes
        try:
            if self.degraded:
                with self._lock:
                    self.stats.drops_degraded += len(keys)
                return 0, 0.0
            names = self.namespace.object_keys(keys)
            there = self._call(job, self.client.batch_is_exist, names)
            if (there < 0).any():
                status[:] = BlockStatus.ERROR
                self._degrade(f"an existence check before a put failed (code {int(there[there < 0][0])})")
                return 0, 0.0
            status[there == 1] = BlockStatus.PRESENT
            ptrs, sizes = self._addresses(rows, slots)
            for part in self._chunks(np.flatnonzero(there == 0)):
                if self.degraded:
                    break
                sums = np.array([checksum(self._slots_np[i]) for i in slots[part]], dtype=np.uint64)
                self._arena.rows[rows[part]] = _packed(self.namespace, keys[part], sums)
                status[part] = BlockStatus.ERROR
                codes = self._call(job, self.client.batch_put_from_multi_buffers, [names[i] for i in part],
                                   [ptrs[i] for i in part], [sizes[i] for i in part])
                status[part[codes == 0]] = BlockStatus.OK
                status[part[np.isin(codes, PRESENT_CODES)]] = BlockStatus.PRESENT
                status[part[codes == NO_AVAILABLE_HANDLE]] = BlockStatus.DROPPED_FULL
                bad = codes[(codes != 0) & ~np.isin(codes, PRESENT_CODES) & (codes != NO_AVAILABLE_HANDLE)]
                if len(bad):
                    self._degrade(f"a put failed (code {int(bad[0])})")
            written = int((status == BlockStatus.OK).sum())
            nbytes, seconds = written * full, time.monotonic() - t0
            with self._lock:
                s = self.stats
                s.put_blocks += written
                s.put_skipped_present += int((status == BlockStatus.PRESENT).sum())
                s.write_drops += int((status == BlockStatus.DROPPED_FULL).sum())
                s.drops_degraded += int((status == BlockStatus.DROPPED_DEGRADED).sum())
                s.bytes_put += nbytes
                s.put_seconds += seconds
            return nbytes, seconds
        finally:
            job.status[job.todo] = status
            with self._lock:
                self._inflight_puts.difference_update(pairs)

    def _run_get(self, job: _Job, _pairs: list) -> tuple[int, float]:
        t0 = time.monotonic()
        keys, slots, rows = job.keys[job.todo], job.slots[job.todo], job.rows
        status = np.full(len(keys), BlockStatus.DROPPED_DEGRADED, dtype=np.int8)
        full = HEADER_BYTES + self.pool.slot_bytes
        try:
            names = self.namespace.object_keys(keys)
            ptrs, sizes = self._addresses(rows, slots)
            for part in self._chunks(np.arange(len(keys))):
                if self.degraded:
                    break
                status[part] = BlockStatus.ERROR
                codes = self._call(job, self.client.batch_get_into_multi_buffers, [names[i] for i in part],
                                   [ptrs[i] for i in part], [sizes[i] for i in part])
                status[part[np.isin(codes, ABSENT_CODES)]] = BlockStatus.ABSENT
                wrong_size = np.isin(codes, SIZE_CODES) | ((codes > 0) & (codes != full))
                status[part[wrong_size]] = BlockStatus.CORRUPT
                got = part[codes == full]
                if len(got):
                    hdr = self._arena.rows[rows[got]]
                    good = check_headers(hdr, self.namespace, keys[got])
                    sums = header_checksums(hdr)
                    for j in np.flatnonzero(good):
                        good[j] = checksum(self._slots_np[slots[got[j]]]) == int(sums[j])
                    status[got] = np.where(good, BlockStatus.OK, BlockStatus.CORRUPT)
                bad = codes[(codes < 0) & ~np.isin(codes, ABSENT_CODES) & ~np.isin(codes, SIZE_CODES)]
                if len(bad):
                    self._degrade(f"a get failed (code {int(bad[0])})")
            for i in np.flatnonzero(status == BlockStatus.CORRUPT):
                # a value that is not what its key promises would fail every reader: drop it
                self._call(job, self.client.remove, names[i], True)
            ok = int((status == BlockStatus.OK).sum())
            nbytes, seconds = ok * full, time.monotonic() - t0
            with self._lock:
                s = self.stats
                s.get_blocks += ok
                s.get_misses += int((status == BlockStatus.ABSENT).sum())
                s.corrupt_blocks += int((status == BlockStatus.CORRUPT).sum())
                s.drops_degraded += int((status == BlockStatus.DROPPED_DEGRADED).sum())
                s.bytes_got += nbytes
                s.get_seconds += seconds
            return nbytes, seconds
        finally:
            job.status[job.todo] = status

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> bool:
        """Stop taking jobs, wait up to `timeout` for those in flight, release the client.
        Idempotent. A call still stuck in the client keeps its buffers registered and the client
        open (closing under it would free memory it writes). Returns whether no call is left that
        may touch the registered buffers: only then may their owner free them (the host pool)."""
        if self._closed:
            return self._quiet
        self._closed = True
        end = time.monotonic() + timeout
        for job in list(self._jobs.values()):
            cf.wait([job.future], timeout=max(0.0, end - time.monotonic()))
        stuck = any(not j.future.done() for j in self._jobs.values())
        stuck = stuck or (self._probe is not None and not self._probe.done())
        for w in (self._lookup_worker, self._put_worker, self._get_worker):
            w.stop()
        if stuck:
            log.warning("remote store %s: closed with calls still in flight; the client is left open",
                        self._name)
            return False
        self._quiet = True
        closer = _Worker("tpc-remote-close")
        fut = closer.submit(self._release)
        closer.stop()
        try:
            fut.result(timeout=max(0.5, end - time.monotonic()))
        except Exception as e:  # a dead store may make even close fail or hang: not our failure
            log.info("remote store %s: closing the client: %r", self._name, e)
        return True

    def _release(self) -> None:
        for address in self._registered:
            self.client.unregister_buffer(address)
        self._registered = []
        self.client.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _packed(ns: RemoteNamespace, keys: np.ndarray, sums: np.ndarray) -> np.ndarray:
    out = np.empty((len(keys), HEADER_BYTES), dtype=np.uint8)
    pack_headers(out, ns, keys, sums)
    return out


def _as_keys(keys: Any) -> np.ndarray:
    if hasattr(keys, "numpy"):  # a torch tensor on the CPU
        keys = keys.numpy()
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if keys.ndim != 2 or keys.shape[1] != 2:
        raise ValueError(f"keys: expected int64 (n, 2), got shape {keys.shape}")
    return keys


def _as_slots(slots: Any, n: int) -> np.ndarray:
    if hasattr(slots, "numpy"):
        slots = slots.numpy()
    slots = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
    if len(slots) != n:
        raise ValueError(f"slots: expected {n} slot indices, got {len(slots)}")
    return slots


def _check_reachable(host: str | None, port: int | None, what: str, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise RemoteStoreError(f"config key 'remote': cannot reach {what} at {host}:{port} ({e})") from None


def _route_address(host: str, port: int) -> str:
    """The local address that routes to `host` (no packet is sent: a UDP socket only binds)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
