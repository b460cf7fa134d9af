#!/usr/bin/env bash
# The main job: set up (idempotent), then compare this plugin with vLLM's built-in prefix caching.
# On a CPU machine: the tiny random Llama, configs none / prefix / ours, document QA and chat
# (a few minutes). Where CUDA is available: the Llama-3.1-8B shape with dummy weights and all
# five configs. Extra arguments go to `python -m bench.compare` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TPC_VENV:-.venv}/bin/python" -m bench.compare --workload docqa chat "$@"
