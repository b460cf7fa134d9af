"""What crosses between the two halves of the connector, once per step.

Scheduler -> worker: `TPCMetadata` (the loads, stores and remote fetches to run this step), the
same for every tensor parallel rank. Worker -> scheduler: `TPCWorkerMetadata` (which of them
completed), one per rank, which vLLM combines each step with `aggregate()`. These are the only
shared state: in vLLM's multi-process mode the halves live in different processes, so both are
plain, picklable data (keys travel as lists of two ints).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadJob:
    """Copy host slots into a request's freshly allocated GPU blocks (same length, same order).

    `layerwise`: the request's forward runs in this very step, so the worker must finish each
    layer before that layer's attention (`wait_for_layer_load`); otherwise the request waits
    (vLLM's WAITING_FOR_REMOTE_KVS) until the worker reports it through `get_finished`.
    """

    req_id: str
    slots: list[int]
    block_ids: list[int]
    layerwise: bool


@dataclass
class StoreJob:
    """Copy GPU blocks into host slots. The scheduler holds the GPU blocks until it hears back.

    `remote_keys` (the blocks' keys, in order; None: the remote tier is off): once the copy is
    done, the worker writes the slots on to the remote tier (a put with the same job id, reported
    as a `RemoteReport`). The slots are STORING until the scheduler hears of the copy, and then
    pinned until it hears of the put, so the put never reads a slot that was reused."""

    job_id: int
    block_ids: list[int]
    slots: list[int]
    remote_keys: list[list[int]] | None = None


@dataclass
class FetchJob:
    """Read blocks from the remote tier into host slots (STORING: not findable, never reused)
    and verify them; the scheduler publishes the verified ones when it hears back, and a request
    waiting for them then loads them as any host hit."""

    job_id: int
    keys: list[list[int]]
    slots: list[int]


@dataclass
class RemoteReport:
    """One report of a remote job (`kind` "put" or "fetch", the scheduler's job id).

    ok: per block, in the job's order: in the store (put) or read and verified in its slot (fetch).
    final: the store no longer touches the job's slots. A job whose call outlives the store's
    timeout is reported twice: at the timeout (all blocks failed, final False; a waiting request
    goes on without them) and when the call returns (final True; the slots are free then)."""

    kind: str
    job_id: int
    ok: list[bool]
    final: bool = True


@dataclass
class TPCMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)
    fetches: list[FetchJob] = field(default_factory=list)


@dataclass
class TPCWorkerMetadata(KVConnectorWorkerMetadata):
    """Completions one rank's worker saw since its last report; each rank reports each job it was
    handed exactly once, done or failed (the scheduler counts the ranks, see `SchedulerSide`).

    vLLM hands the scheduler one object per step: the ranks' reports of that step combined by
    `aggregate()`, which keeps each rank's report whole (`per_rank()`), so the scheduler can tell
    which ranks have reported a job and which have not."""

    stores_done: list[int] = field(default_factory=list)
    stores_failed: list[int] = field(default_factory=list)
    loads_done: list[str] = field(default_factory=list)
    loads_failed: list[str] = field(default_factory=list)
    #: layer-wise loads whose first submission failed and that were submitted again (each is also
    #: in loads_done or loads_failed)
    loads_retried: list[str] = field(default_factory=list)
    #: slots the worker's host pool really has (it may come out smaller than asked); first report only
    pool_slots: int | None = None
    #: remote jobs (puts after stores, fetches) reported since the last report
    remote: list[RemoteReport] = field(default_factory=list)
    #: the fields of the worker's remote namespace (`RemoteNamespace`), once connected; first report
    #: only. The scheduler's lookups use exactly this namespace.
    remote_namespace: dict | None = None
    #: the reporting worker's tensor parallel rank
    rank: int = 0
    #: the same step's reports of other ranks (`aggregate`), each whole
    others: list[TPCWorkerMetadata] = field(default_factory=list)

    def per_rank(self) -> Iterator[TPCWorkerMetadata]:
        """Each rank's report in this object (one, or one per rank after `aggregate`)."""
        yield replace(self, others=[]) if self.others else self
        yield from self.others

    def aggregate(self, other: KVConnectorWorkerMetadata) -> TPCWorkerMetadata:
        assert isinstance(other, TPCWorkerMetadata)
        return replace(self, others=[*self.others, *other.per_rank()])

    def is_empty(self) -> bool:
        return all(not (r.stores_done or r.stores_failed or r.loads_done or r.loads_failed or r.remote)
                   and r.pool_slots is None and r.remote_namespace is None for r in self.per_rank())
