"""Helpers the tests share: the engine harness, the index's torch reference, and the scripts that
tests start as subprocesses (`python -m tests.support.mp_run ...`)."""
