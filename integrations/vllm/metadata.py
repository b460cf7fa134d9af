"""What crosses between the two halves of the connector, once per step.

Scheduler -> worker: `TPCMetadata` (the loads and stores to run this step). Worker -> scheduler:
`TPCWorkerMetadata` (which of them completed). These are the only shared state: in vLLM's
multi-process mode the halves live in different processes, so both are plain, picklable data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    """Completions seen by the worker since its last report."""

    stores_done: list[int] = field(default_factory=list)
    stores_failed: list[int] = field(default_factory=list)
    loads_done: list[str] = field(default_factory=list)
    loads_failed: list[str] = field(default_factory=list)
    #: slots the worker's host pool really has (it may come out smaller than asked); first report only
    pool_slots: int | None = None

    def aggregate(self, other: KVConnectorWorkerMetadata) -> TPCWorkerMetadata:
        # One worker (tensor parallel size 1) in this version; concatenation is still exact.
        assert isinstance(other, TPCWorkerMetadata)
        return TPCWorkerMetadata(
            self.stores_done + other.stores_done,
            self.stores_failed + other.stores_failed,
            self.loads_done + other.loads_done,
            self.loads_failed + other.loads_failed,
            self.pool_slots if other.pool_slots is None else other.pool_slots,
        )

    def is_empty(self) -> bool:
        return not (self.stores_done or self.stores_failed or self.loads_done or self.loads_failed) and (
            self.pool_slots is None
        )
