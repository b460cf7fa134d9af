"""Counters of the host tier (pool, copies, bookkeeping) and their Prometheus text form.

Each owner keeps one dataclass of plain numbers and bumps it in place; exporters read
`as_dict()` or `prometheus()`. Fields are counters (only grow) unless marked as gauges.
Definitions that matter for hit rates: a *lookup block* is one block the scheduler asked the host
tier about; a *hit block* is one in the leading run found there; misses = lookup - hit blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def gauge(default: float = 0) -> Any:
    """A field that is a level (may go down), exported as a Prometheus gauge."""
    return field(default=default, metadata={"kind": "gauge"})


@dataclass
class Counters:
    """Base: a flat record of numbers with dict and Prometheus views."""

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(f.default))

    def prometheus(self, prefix: str = "tpc", labels: dict[str, str] | None = None) -> str:
        """Prometheus text exposition: one `# TYPE` line and one sample per field."""
        lab = ""
        if labels:
            lab = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items())) + "}"
        lines = []
        for f in fields(self):
            kind = f.metadata.get("kind", "counter")
            name = f"{prefix}_{f.name}" + ("_total" if kind == "counter" else "")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{lab} {getattr(self, f.name)}")
        return "\n".join(lines) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class PoolStats(Counters):
    """What the host pool asked for and what it got (gauges), and pinning failures (counter)."""

    requested_bytes: int = gauge(0)
    allocated_bytes: int = gauge(0)
    pinned_bytes: int = gauge(0)
    num_slots: int = gauge(0)
    chunks_pinned: int = gauge(0)
    create_seconds: float = gauge(0.0)
    prefault_seconds: float = gauge(0.0)
    register_seconds: float = gauge(0.0)
    alloc_failures: int = 0
    pin_failures: int = 0
    unregister_failures: int = 0


@dataclass
class CopyStats(Counters):
    """Copies submitted by a CopyEngine (counted at submission) and backend fallbacks."""

    demotes: int = 0
    promotes: int = 0
    blocks_to_host: int = 0
    bytes_to_host: int = 0
    blocks_from_host: int = 0
    bytes_from_host: int = 0
    backend_fallbacks: int = 0
    #: layer groups of layer-wise copies submitted after `promote` returned (`layerwise_ahead`)
    late_groups: int = 0


@dataclass
class TierStats(Counters):
    """Bookkeeping of the host tier: lookups, stores (demotions), loads (promotions), evictions."""

    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    stores_started: int = 0
    stores_completed: int = 0
    stores_aborted: int = 0
    store_skipped_present: int = 0
    store_skipped_in_flight: int = 0
    drops_full: int = 0
    evictions: int = 0
    loads_started: int = 0
    loads_completed: int = 0
    loads_aborted: int = 0
    blocks_to_host: int = 0
    bytes_to_host: int = 0
    blocks_from_host: int = 0
    bytes_from_host: int = 0
    ready_slots: int = gauge(0)
    storing_slots: int = gauge(0)
    loading_slots: int = gauge(0)
    free_slots: int = gauge(0)

    @property
    def miss_blocks(self) -> int:
        return self.lookup_blocks - self.hit_blocks


@dataclass
class RemoteStats(Counters):
    """The shared store under the host tier (`remote.store.RemoteStore`), in blocks and bytes.

    A *lookup block* is one block asked about with `exists`; *hit blocks* are those present. Puts
    ask first and write only the missing blocks; a write the store had no room for is a
    *write drop*. A *corrupt* block is a value whose header or checksum did not match: a miss.
    *Store errors* are failed or timed-out calls; the first one of an episode degrades the store
    (`degraded` = 1) until a probe finds it back.
    """

    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    put_blocks: int = 0
    put_skipped_present: int = 0
    put_skipped_inflight: int = 0
    bytes_put: int = 0
    put_seconds: float = 0.0
    write_drops: int = 0
    drops_busy: int = 0
    drops_degraded: int = 0
    get_blocks: int = 0
    get_misses: int = 0
    corrupt_blocks: int = 0
    bytes_got: int = 0
    get_seconds: float = 0.0
    store_errors: int = 0
    timeouts: int = 0
    degradations: int = 0
    recoveries: int = 0
    degraded: int = gauge(0)
    inflight_blocks: int = gauge(0)

    @property
    def put_gbps(self) -> float:
        """Bytes written over the time spent writing them (checksums included), GB/s."""
        return self.bytes_put / self.put_seconds / 1e9 if self.put_seconds else 0.0

    @property
    def get_gbps(self) -> float:
        """Bytes read over the time spent reading them (checks included), GB/s."""
        return self.bytes_got / self.get_seconds / 1e9 if self.get_seconds else 0.0
