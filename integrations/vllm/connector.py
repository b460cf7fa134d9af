"""TritonPrefixCacheConnector: the vLLM KV connector that adds a host-RAM tier to prefix caching.

vLLM builds one instance per role: the SCHEDULER instance (in EngineCore, next to the Scheduler)
delegates to `SchedulerSide`, the WORKER instance (next to the model runner; one per tensor
parallel rank) to `WorkerSide`. The only state they share is the per-step metadata
(`metadata.py`). The configuration comes from `kv_connector_extra_config` and is validated before
anything is allocated: in the constructor, and earlier wherever vLLM asks the class while it
builds its own config (`requires_piecewise_for_cudagraph`; `triton_prefix_cache_vllm.cli` checks
the command line before vLLM starts). The model is checked as soon as vLLM asks the class with
its config (`get_required_kvcache_layout`), before vLLM groups the KV cache.

Public read-outs besides vLLM's hooks: the stats (`stats.py`: vLLM's log line and Prometheus),
`diagnostics()` (recent history, for tools running the engine in their own process) and, on the
scheduler side, `host_tier`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import LOGGER_NAME, compat, connector_config
from .metadata import TPCMetadata
from .stats import Diagnostics, TPCPromMetrics, TPCStats

logger = logging.getLogger(LOGGER_NAME)

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.request import Request

    from .host_tier import HostTier


class TritonPrefixCacheConnector(KVConnectorBase_V1):
    """Two-tier prefix cache: vLLM's GPU blocks (hot) and a host pool indexed by a PrefixIndex (warm)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        # Validate before the base class logs anything or we allocate anything.
        self.cfg = connector_config(vllm_config.kv_transfer_config.kv_connector_extra_config)
        if self.cfg.remote is not None:
            from .remote_tier import check_remote

            check_remote(vllm_config, kv_cache_config)
        compat.check_scope(vllm_config, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:  # the scheduler is the policy's only reader
            _set_load_failure_policy(vllm_config, kv_cache_config)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._sched = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import SchedulerSide

            self._sched = SchedulerSide(self.cfg, vllm_config, kv_cache_config)
        else:
            from .worker import WorkerSide

            self._worker = WorkerSide(self.cfg, vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped store is a future miss, never lost data.
        return False

    # ---- scheduler side ----------------------------------------------------------------------------
    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        if self._sched is not None:
            self._sched.bind_gpu_block_pool(gpu_block_pool)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict:
        return self._sched.get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        if self._sched is not None:
            self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self._sched.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        # Stores still copying hold GPU blocks: keep the engine stepping until they are reported
        # (vLLM's engine loop asks this; an idle in-process LLM does not step, see README limits).
        return self._sched is not None and self._sched.has_pending_stores()

    def reset_cache(self) -> bool | None:
        if self._sched is None:
            return None
        return self._sched.reset_cache()

    # ---- worker side ---------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, TPCMetadata):
            self._worker.start_load_kv(meta, full_graph=compat.replays_full_cuda_graph(forward_context),
                                       mode=compat.cuda_graph_mode_name(forward_context))

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores are planned by the scheduler and run from start_load_kv

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        return self._worker.build_worker_meta() if self._worker is not None else None

    # ---- both ------------------------------------------------------------------------------------------
    def diagnostics(self) -> Diagnostics:
        """A snapshot of this side's recent history (`stats.Diagnostics`): load sizes and device
        times, step timings (`debug.step_timing`) on the worker side; partial host hits and the host
        tier's counters on the scheduler side. Read-only, cheap, safe between engine steps; for
        tools that hold the connector objects, i.e. run the engine core in their own process (the
        worker side: vLLM's `get_kv_transfer_group()`; the scheduler side: the engine core's
        scheduler's `connector`). A deployment reads the metrics instead (`stats.py`)."""
        side = self._sched if self._sched is not None else self._worker
        return side.diagnostics()

    @property
    def host_tier(self) -> HostTier | None:
        """The scheduler side's host tier (bookkeeping only: slots, keys, the index), None on the
        worker side. For tools that drive the scheduler half without an engine, e.g. filling the
        tier with `begin_store` / `end_store` before timing lookups (bench.sched_time)."""
        return self._sched.tier if self._sched is not None else None

    def get_kv_connector_stats(self) -> TPCStats | None:
        side = self._sched if self._sched is not None else self._worker
        return side.get_stats()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()

    @classmethod
    def build_kv_connector_stats(cls, data: dict | None = None) -> TPCStats:
        return TPCStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> TPCPromMetrics:
        return TPCPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        # vLLM asks this with its whole config before it groups the KV cache: 0.32 in the engine
        # core right after loading the model (unless a layout is forced), 0.26 in the workers when
        # an attention backend first needs the layout. A model out of scope stops here, with its
        # kind named, rather than in vLLM's grouping (compat.check_model).
        compat.check_model(vllm_config)
        return None  # any layout: the copies work on byte views of each block (worker.page_views)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        # The one class method vLLM (0.26 and 0.32) calls with our config while it builds its own,
        # before the engine core starts: on CUDA with full CUDA graphs on (not with --enforce-eager,
        # nor on the CPU, where it only imports the class). Validate as early as that.
        connector_config(extra_config)
        # No: layer-wise loads wait per layer where Python runs between graph pieces (piecewise
        # graphs, eager), and wait whole before the forward where vLLM replays a full graph (it
        # says so in the forward context, see WorkerSide.start_load_kv). Asking for PIECEWISE would
        # cost every decode step its full CUDA graph.
        return False


def _set_load_failure_policy(vllm_config: Any, kv_cache_config: Any) -> None:
    """A host-tier copy that fails must cost a recompute, never the request: vLLM's
    kv_load_failure_policy 'fail' (its default) would end it with an error. The scheduler reads the
    policy right after building its connector (vLLM 0.26 and 0.32), so setting it here takes effect.

    Except where vLLM frees blocks outside the attention window (a model of sliding-window layers
    only): there vLLM's recompute restarts at the first failed block, whose window reaches into
    blocks it already replaced by its null block, and would compute on KV that is not there. A
    failed copy then ends its request with an error ('fail'), never with wrong tokens.

    Said at info level only where the policy differs from vLLM's default, i.e. someone chose it;
    vLLM's config cannot tell an explicit 'fail' from its default 'fail', which is overridden quietly
    (debug level)."""
    kvt = vllm_config.kv_transfer_config
    policy = getattr(kvt, "kv_load_failure_policy", "recompute")
    chosen = policy != compat.default_load_failure_policy(kvt)
    if compat.frees_blocks_outside_window(kv_cache_config):
        if policy == "fail":
            return
        kvt.kv_load_failure_policy = "fail"
        logger.warning("triton-prefix-cache: kv_load_failure_policy %r replaced by 'fail' for this "
                       "sliding-window model: vLLM cannot recompute part of a window whose earlier "
                       "blocks it freed, so a failed host-tier copy ends its request", policy)
        return
    if policy == "recompute":
        return
    kvt.kv_load_failure_policy = "recompute"
    logger.log(logging.INFO if chosen else logging.DEBUG,
               "triton-prefix-cache: kv_load_failure_policy %r replaced by 'recompute': a failed host-tier "
               "copy costs a recompute of its blocks, never the request", policy)
