"""Kernels and core units: the index, tiers, host pool, copies, config, bench's pure functions. No vLLM."""
