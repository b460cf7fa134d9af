"""The connector's counters in vLLM's connector-stats form: the log line and Prometheus.

Both sides fill one `TPCStats`: the scheduler side (hits per tier, drops, failed and retried
loads, its own time) and the worker side (bytes and seconds of copies each way). vLLM aggregates
the workers' and the scheduler's objects every step, rebuilds them in the logger process from
`data` (plain numbers and lists of numbers, so they cross process boundaries as they are), prints
`reduce()` in its "KV Transfer metrics" line and hands `data` to `TPCPromMetrics.observe`.

With tensor parallelism vLLM sums every rank's worker object. Each rank counts the bytes it moved
(its shard of each block: the sum is the blocks' bytes); counts of copies, their seconds and the
load-step histogram come from the lead rank (0) alone, so a job counts once and a time is one
rank's wall time (the copies of the ranks run side by side); the scheduler side counts what
depends on every rank (a failed or retried load, a dropped store) once per job.

With the remote tier on, the scheduler side counts the tokens it served that the store delivered
(`remote_hit_tokens`) and sets `remote_degraded`; each side adds what its own store client counted
(`RemoteStats`: bytes and seconds each way, write drops, corrupt blocks, store errors) since its
last interval. The log line shows the remote fields only where the tier is on.

Each side also sums what it handed over in its `totals` (counters only): vLLM 0.26's offline
`LLMEngine.step` records scheduler stats only for steps that produced outputs, so there the
Prometheus counters of an in-process `LLM` miss the steps that only scheduled a load (its online
`AsyncLLM` records every step). The tests read `totals` on 0.26 (`tests/support/harness.py`).

`Diagnostics` is the other public read-out: recent history the counters do not keep (each load's
size and device time, partial hits, step timings), for tools that run the engine in their own
process (`TritonPrefixCacheConnector.diagnostics()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

#: Counters (summed on aggregate). Names are the keys of `TPCStats.data`.
COUNTERS = (
    "queried_tokens",  # prompt tokens the adapter was asked about (after vLLM's own GPU hit)
    "gpu_hit_tokens",  # vLLM's own GPU prefix hit, as handed to the adapter
    "host_hit_tokens",  # tokens the adapter served from the host tier
    "lookups",  # get_num_new_matched_tokens calls that looked at the index
    "load_bytes",
    "load_seconds",
    "load_gpu_seconds",  # device time of the loads' copies (CUDA events), for their GB/s
    "loads",
    "store_bytes",
    "store_seconds",
    "stores",
    "dropped_stores",  # demotions skipped: host tier full of pinned slots, or block gone
    "failed_loads",
    "load_retries",  # layer-wise loads whose submission failed once on some rank and was retried
    "partial_host_hits",  # lookups that stopped at a missing block with later ones in the host tier
    "deferred_requests",  # asked again later because another request's async load reads that prefix
    "async_loads",  # loads the request waited for (the others ran layer-wise in their own step)
    "missed_demotions",  # cached GPU blocks vLLM evicted while the host tier had no copy of them
    "host_evictions",  # host-tier blocks evicted to make room
    "full_graph_loads",  # layer-wise loads waited for whole: their step replayed a full CUDA graph
    "sched_seconds",  # scheduler time spent inside the adapter (key derivation + lookup + bookkeeping)
    "sched_requests",  # requests that time is spread over
    "step_seconds",  # per-step adapter time (planning demotions, handling completions)
    "index_launches",  # operations the scheduler's index ran (on a device table: launch groups)
    "index_match_launches",  # of those, batched prefix matches (`MatchBatcher`)
    "index_matched_requests",  # request prefixes those matches answered
    # the remote tier (`remote`): hits by the scheduler, the store's counters by each side's client
    "remote_hit_tokens",  # prompt tokens served that the remote tier delivered (into the host tier)
    "remote_get_bytes",  # bytes read from the store into host slots (verified blocks, headers included)
    "remote_get_seconds",
    "remote_put_bytes",  # bytes written to the store from host slots (headers included)
    "remote_put_seconds",
    "remote_write_drops",  # blocks the store had no room for (not written; not an error)
    "remote_dropped_blocks",  # blocks not moved: too many in flight, or the store degraded
    "remote_corrupt_blocks",  # values whose header or checksum did not match: misses, removed
    "remote_store_errors",  # failed or timed-out store calls (the first degrades the store)
)
#: Observations (lists of values, concatenated on aggregate; Prometheus histograms).
OBSERVATIONS = (
    "sched_request_seconds",  # a finished request's scheduler time in the adapter
    "load_step_seconds",  # host time of a step that loads, start_load_kv to the end of get_finished
)
#: Gauges (the latest value wins on aggregate).
GAUGES = ("inflight_loads", "inflight_stores", "host_used_slots", "host_slots", "host_pool_pin_failures",
          "remote_degraded")

#: TPCStats counter <- the `RemoteStats` fields it sums (each side adds its client's increase)
REMOTE_COUNTERS = {
    "remote_get_bytes": ("bytes_got",),
    "remote_get_seconds": ("get_seconds",),
    "remote_put_bytes": ("bytes_put",),
    "remote_put_seconds": ("put_seconds",),
    "remote_write_drops": ("write_drops",),
    "remote_dropped_blocks": ("drops_busy", "drops_degraded"),
    "remote_corrupt_blocks": ("corrupt_blocks",),
    "remote_store_errors": ("store_errors",),
}


def remote_stats_into(stats: TPCStats, remote: Any, seen: dict[str, float]) -> None:
    """Add what a store client's `RemoteStats` (monotonic counters) gained since `seen` (the values
    at the last call, updated here) to this interval's counters."""
    now = remote.as_dict()
    for key, fields_ in REMOTE_COUNTERS.items():
        total = sum(now[f] for f in fields_)
        gained = total - seen.get(key, 0)
        if gained:
            stats.add(key, gained)
        seen[key] = total


@dataclass
class TPCStats(KVConnectorStats):
    """Counters, gauges and observations of one interval. `data` holds plain values only: a number
    per counter and gauge, a list of numbers per observation."""

    def __post_init__(self) -> None:
        for k in COUNTERS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = {k: 0 for k in COUNTERS}

    def add(self, key: str, value: float) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def set(self, key: str, value: float) -> None:
        self.data[key] = value

    def observe(self, key: str, value: float) -> None:
        self.data.setdefault(key, []).append(value)

    def aggregate(self, other: KVConnectorStats) -> TPCStats:
        for k, v in other.data.items():
            if k in GAUGES:
                self.data[k] = v
            elif k in OBSERVATIONS:
                self.data[k] = self.data.get(k, []) + list(v)
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def is_empty(self) -> bool:
        return not any(self.data.get(k, 0) for k in (*COUNTERS, *OBSERVATIONS)) and not any(
            self.data.get(k, 0) for k in ("inflight_loads", "inflight_stores", "host_pool_pin_failures")
        )

    def add_counters_to(self, totals: dict[str, float]) -> None:
        """Sum this interval's counters into `totals` (gauges are not summed)."""
        for k in COUNTERS:
            totals[k] = totals.get(k, 0) + self.data.get(k, 0)

    def reduce(self) -> dict[str, int | float]:
        d = self.data

        def gbps(nbytes: str, secs: str) -> float:
            return round(d.get(nbytes, 0) / d[secs] / 1e9, 2) if d.get(secs, 0) > 0 else 0.0

        sched_us = 1e6 * d.get("sched_seconds", 0) / d["sched_requests"] if d.get("sched_requests") else 0.0
        return {
            "gpu_hit_tokens": int(d.get("gpu_hit_tokens", 0)),
            "host_hit_tokens": int(d.get("host_hit_tokens", 0)),
            "queried_tokens": int(d.get("queried_tokens", 0)),
            "load_GB": round(d.get("load_bytes", 0) / 1e9, 3),
            # Device time of the copies where CUDA events timed them, else wall time submission -> done.
            "load_GBps": gbps("load_bytes", "load_gpu_seconds" if d.get("load_gpu_seconds")
                              else "load_seconds"),
            "store_GB": round(d.get("store_bytes", 0) / 1e9, 3),
            "store_GBps": gbps("store_bytes", "store_seconds"),
            "dropped_stores": int(d.get("dropped_stores", 0)),
            "missed_demotions": int(d.get("missed_demotions", 0)),
            "host_evictions": int(d.get("host_evictions", 0)),
            "failed_loads": int(d.get("failed_loads", 0)),
            "inflight_loads": int(d.get("inflight_loads", 0)),
            "host_used_slots": int(d.get("host_used_slots", 0)),
            "host_slots": int(d.get("host_slots", 0)),
            "sched_us_per_req": round(sched_us, 1),
            "index_launches": int(d.get("index_launches", 0)),
            "requests_per_match": round(d["index_matched_requests"] / d["index_match_launches"], 2)
            if d.get("index_match_launches") else 0.0,
        } | (self._reduce_remote() if "remote_degraded" in d else {})

    def _reduce_remote(self) -> dict[str, int | float]:
        """The remote tier's part of the log line (only where it is on)."""
        d = self.data

        def gbps(nbytes: str, secs: str) -> float:
            return round(d.get(nbytes, 0) / d[secs] / 1e9, 2) if d.get(secs, 0) > 0 else 0.0

        return {
            "remote_hit_tokens": int(d.get("remote_hit_tokens", 0)),
            "remote_get_GB": round(d.get("remote_get_bytes", 0) / 1e9, 3),
            "remote_get_GBps": gbps("remote_get_bytes", "remote_get_seconds"),
            "remote_put_GB": round(d.get("remote_put_bytes", 0) / 1e9, 3),
            "remote_put_GBps": gbps("remote_put_bytes", "remote_put_seconds"),
            "remote_write_drops": int(d.get("remote_write_drops", 0)),
            "remote_store_errors": int(d.get("remote_store_errors", 0)),
            "remote_degraded": int(d.get("remote_degraded", 0)),
        }


@dataclass(frozen=True)
class Diagnostics:
    """A snapshot of one side's recent history, taken by `TritonPrefixCacheConnector.diagnostics()`.

    Plain values, copied at the call: reading it never touches the connector. Fields of the other
    side stay empty (the scheduler side and the worker side are different connector objects, in
    different processes in vLLM's default multi-process engine).

    role: "scheduler" or "worker".
    Worker side:
      loads_timed: loads whose device time is known (CUDA events), ever.
      recent_loads: (bytes, device seconds) of the latest of those (up to 4,096), oldest first.
      step_timings: the latest steps that loaded, oldest first, each a dict of milliseconds:
        submit_ms, submit_cpu_ms, load_submit_ms, host_ms, cpu_ms, other_cpu_ms, device_ms
        (`debug.step_timing` on CUDA only; empty otherwise).
    Scheduler side:
      recent_partial_hits: the latest 256 lookups that found only part of a prefix in the host
        tier, oldest first: req, gpu_blocks, host_blocks, wanted_blocks, next_key (the state of
        the first key missed: "STORING" or "absent"), later_in_host (blocks after it that the
        host tier holds: a hole when > 0), pending_stores.
      host_tier: the host tier's bookkeeping counters (`triton_prefix_cache.stats.TierStats`:
        blocks and bytes each way, evictions, drops_full, ...) and slot gauges.
    """

    role: str
    loads_timed: int = 0
    recent_loads: tuple[tuple[int, float], ...] = ()
    step_timings: tuple[dict[str, float], ...] = ()
    recent_partial_hits: tuple[dict[str, Any], ...] = ()
    host_tier: dict[str, float] = field(default_factory=dict)


# Prometheus names: counters get `_total` appended by the client library.
PROM_COUNTERS = {
    "host_hit_tokens": ("vllm:tpc_host_hit_tokens", "Prompt tokens served from the host tier."),
    "gpu_hit_tokens": ("vllm:tpc_gpu_hit_tokens", "Prompt tokens vLLM served from its own GPU prefix cache."),
    "queried_tokens": ("vllm:tpc_queried_tokens", "Prompt tokens looked up in the host tier."),
    "load_bytes": ("vllm:tpc_load_bytes", "Bytes copied host -> GPU."),
    "load_seconds": ("vllm:tpc_load_seconds", "Seconds spent in host -> GPU copies (one rank's)."),
    "store_bytes": ("vllm:tpc_store_bytes", "Bytes copied GPU -> host."),
    "store_seconds": ("vllm:tpc_store_seconds", "Seconds spent in GPU -> host copies (one rank's)."),
    "dropped_stores": ("vllm:tpc_dropped_stores", "Demotions dropped (host tier full of pinned slots)."),
    "failed_loads": ("vllm:tpc_failed_loads", "Host-tier loads that failed."),
    "load_retries": ("vllm:tpc_load_retries", "Layer-wise loads submitted a second time after a failure."),
    "partial_host_hits": ("vllm:tpc_partial_host_hits",
                          "Lookups that stopped at a block missing from the host tier while later "
                          "blocks of the same prompt were there (a hole)."),
    "deferred_requests": ("vllm:tpc_deferred_requests",
                          "Lookups deferred because another request was loading the same prefix."),
    "async_loads": ("vllm:tpc_async_loads",
                    "Host-tier loads the request waited for while others ran (the rest ran layer-wise)."),
    "missed_demotions": ("vllm:tpc_missed_demotions",
                         "Cached GPU blocks vLLM evicted while the host tier had no copy of them."),
    "host_evictions": ("vllm:tpc_host_evictions", "Host-tier blocks evicted to make room."),
    "full_graph_loads": ("vllm:tpc_full_graph_loads",
                         "Layer-wise loads waited for whole because their step replayed a full CUDA graph."),
    "sched_seconds": ("vllm:tpc_scheduler_seconds", "Scheduler time spent in the adapter's lookups."),
    "step_seconds": ("vllm:tpc_step_seconds", "Scheduler time spent in the adapter's per-step planning."),
    "sched_requests": ("vllm:tpc_scheduler_requests", "Requests the adapter looked up."),
    "index_launches": ("vllm:tpc_index_launches",
                       "Operations the scheduler's host-tier index ran (launch groups on a device table)."),
    "index_match_launches": ("vllm:tpc_index_match_launches",
                             "Prefix-match launches of the scheduler's index (on a device table each answers "
                             "every waiting request asked about before)."),
    "index_matched_requests": ("vllm:tpc_index_matched_requests",
                               "Request prefixes the batched matches answered (per launch: divide by "
                               "tpc_index_match_launches)."),
    "remote_hit_tokens": ("vllm:tpc_remote_hit_tokens",
                          "Prompt tokens served that were read from the remote tier (they are host hits "
                          "too: they reach the GPU through the host tier)."),
    "remote_get_bytes": ("vllm:tpc_remote_get_bytes", "Bytes read from the remote store (verified)."),
    "remote_get_seconds": ("vllm:tpc_remote_get_seconds", "Seconds spent reading from the remote store."),
    "remote_put_bytes": ("vllm:tpc_remote_put_bytes", "Bytes written to the remote store."),
    "remote_put_seconds": ("vllm:tpc_remote_put_seconds", "Seconds spent writing to the remote store."),
    "remote_write_drops": ("vllm:tpc_remote_write_drops", "Blocks the remote store had no room for."),
    "remote_dropped_blocks": ("vllm:tpc_remote_dropped_blocks",
                              "Blocks not moved to or from the remote store: too many in flight, or the "
                              "store degraded."),
    "remote_corrupt_blocks": ("vllm:tpc_remote_corrupt_blocks",
                              "Remote values that failed their header or checksum check (misses)."),
    "remote_store_errors": ("vllm:tpc_remote_store_errors", "Remote store calls that failed or timed out."),
}
PROM_HISTOGRAMS = {
    "sched_request_seconds": ("vllm:tpc_scheduler_seconds_per_request",
                              "Scheduler time the adapter spent on one request (lookups and planning).",
                              tuple(round(10 ** (k / 4), 7) for k in range(-20, 1))),  # 1e-5..1 s
    "load_step_seconds": ("vllm:tpc_load_step_seconds",
                          "Worker host time of a step that loads from the host tier, from the "
                          "connector's start_load_kv to the end of its get_finished (the forward "
                          "and the wait for layer-wise loads included).",
                          (1e-3, 3e-3, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0, 10.0)),
}
PROM_GAUGES = {
    "inflight_loads": ("vllm:tpc_inflight_loads", "Host -> GPU loads in flight."),
    "host_used_slots": ("vllm:tpc_host_used_slots", "Host-tier slots holding a block."),
    "host_slots": ("vllm:tpc_host_slots", "Host-tier slots (fewer than configured if pinning failed)."),
    "host_pool_pin_failures": ("vllm:tpc_host_pool_pin_failures",
                               "Pinned registrations of the host pool that failed (the pool shrank)."),
    "remote_degraded": ("vllm:tpc_remote_degraded",
                        "1 while the remote store is unreachable (lookups answer absent; the local "
                        "tiers serve)."),
}


class TPCPromMetrics(KVConnectorPromMetrics):
    """Registers the counters above per engine and adds each interval's values to them."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric) -> dict[int, Any]:
            return {i: metric.labels(*vals) for i, vals in per_engine_labelvalues.items()}

        self._counters = {
            key: per_engine(self._counter_cls(name=name, documentation=doc, labelnames=labelnames))
            for key, (name, doc) in PROM_COUNTERS.items()
        }
        self._gauges = {
            key: per_engine(self._gauge_cls(name=name, documentation=doc, labelnames=labelnames))
            for key, (name, doc) in PROM_GAUGES.items()
        }
        self._histograms = {
            key: per_engine(self._histogram_cls(name=name, documentation=doc, labelnames=labelnames,
                                                buckets=list(buckets)))
            for key, (name, doc, buckets) in PROM_HISTOGRAMS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, children in self._counters.items():
            v = transfer_stats_data.get(key, 0)
            if v:
                children[engine_idx].inc(v)
        for key, children in self._gauges.items():
            if key in transfer_stats_data:
                children[engine_idx].set(transfer_stats_data[key])
        for key, children in self._histograms.items():
            for v in transfer_stats_data.get(key, ()):
                children[engine_idx].observe(v)
