"""Benchmarks and workloads (run as `python -m bench.<name>` from the repo root)."""
