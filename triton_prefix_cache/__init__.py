"""triton-prefix-cache: a two-tier (GPU + pinned host RAM) prefix cache for vLLM-style engines.

The core package is engine-agnostic: it imports torch, numpy and triton, never an engine.
"""
from .copy_engine import CopyEngine, CopyHandle, byte_views
from .host_pool import HostPool, HostPoolConfig
from .index import IndexFullError, PrefixIndex
from .keys import keys_from_block_hashes
from .policy import EvictionPolicy, LRUPolicy, make_policy
from .stats import CopyStats, PoolStats, TierStats
from .tiers import SlotState, StorePlan, StoreStatus, TierManager

__version__ = "0.1.0"
__all__ = [
    "CopyEngine",
    "CopyHandle",
    "CopyStats",
    "EvictionPolicy",
    "HostPool",
    "HostPoolConfig",
    "IndexFullError",
    "LRUPolicy",
    "PoolStats",
    "PrefixIndex",
    "SlotState",
    "StorePlan",
    "StoreStatus",
    "TierManager",
    "TierStats",
    "byte_views",
    "keys_from_block_hashes",
    "make_policy",
]
