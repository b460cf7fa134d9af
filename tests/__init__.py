"""The tests, by level: `unit/` (kernels and core units, no vLLM), `integration/` (vLLM end to end),
`soak/` (a long stream through one engine), and `support/`, the helpers they share.

A package so that tests import helpers as `tests.support.<module>` and helper scripts run as
`python -m tests.support.<module>` from the repo root, with no edits to sys.path.
"""
