"""triton-prefix-cache: a two-tier (GPU + pinned host RAM) prefix cache for vLLM-style engines.

The core package is engine-agnostic: it imports torch, numpy and triton, never an engine.
"""
__version__ = "0.1.0"
