"""What crosses between the two halves of the connector, once per step.

Scheduler -> worker: `TPCMetadata` (the loads and stores to run this step), the same for every
tensor parallel rank. Worker -> scheduler: `TPCWorkerMetadata` (which of them completed), one per
rank, which vLLM combines each step with `aggregate()`. These are the only shared state: in vLLM's
multi-process mode the halves live in different processes, so both are plain, picklable data.
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
    """Copy GPU blocks into host slots. The scheduler holds the GPU blocks until it hears back."""

    job_id: int
    block_ids: list[int]
    slots: list[int]


@dataclass
class TPCMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)


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
        return all(not (r.stores_done or r.stores_failed or r.loads_done or r.loads_failed)
                   and r.pool_slots is None for r in self.per_rank())
