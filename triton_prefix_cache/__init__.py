"""triton-prefix-cache: a two-tier (GPU + pinned host RAM) prefix cache for vLLM-style engines.

The core package is engine-agnostic: it imports torch, numpy and triton, never an engine.
"""
from .index import IndexFullError, PrefixIndex
from .keys import keys_from_block_hashes

__version__ = "0.1.0"
__all__ = ["IndexFullError", "PrefixIndex", "keys_from_block_hashes"]
