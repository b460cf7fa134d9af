#!/usr/bin/env bash
# The work of a GPU host without a package registry (docs/gpu-host.md), as named suites.
#
#   bash scripts/gpu.sh stage K          keep the staged folder .gpu-stage/pK on the host (one call each)
#   bash scripts/gpu.sh install          vLLM 0.26.0 (after the last stage), this package, wheels in .whl/
#   bash scripts/gpu.sh SUITE [ARGS]     run a suite in the foreground
#   bash scripts/gpu.sh start SUITE...   run suites one after another in the background: they outlive the
#                                        call that started them (the host stays up between calls)
#   bash scripts/gpu.sh wait SECONDS     wait up to SECONDS for the background suites, then copy what
#                                        they produced to $OUT
# Suites:
#   gpu-tests       kernels, index, host pool, copies and tiers compiled; the adapter's engine tests
#   pytest ARGS     python -m pytest ARGS (e.g. one test file's GPU tests: -m gpu tests/unit/test_index.py)
#   gpu-copy-tests  the GPU tests of the host pool and the copy paths alone (a few minutes)
#   bench-serve     python -m bench.serve (ARGS: its arguments; default the headline: prefix, every config)
#   bench-variants  bench.serve prefix at 16 and 64 in flight: this plugin's load modes side by side
#   bench-docqa     python -m bench.compare document QA, one request at a time (offloading vs this plugin)
#   bench-copy      python -m bench.copy_bench (every copy path against pinned memcpy)
# Results of a host go to $RUN (default /root/tpc-run), outside the checkout: every call re-copies
# the checkout. `wait` brings back results.jsonl (only the lines this host appended), the charts, a
# tarball of logs and raw client files.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${TPC_GPU_SITE:-$HOME/tpc-site}
RUN=${TPC_RUN:-/root/tpc-run}
mkdir -p "$RUN"

env_setup() {
  export PYTHONPATH=$SITE:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
}

keep_rc() {  # keep_rc STATUS: the suite's rc is its first command's non-zero status, if any
  [ "$rc" -ne 0 ] || rc=$1
}

suite() {  # suite NAME [ARGS...]: one suite, its output in $RUN/NAME.log; returns the suite's rc
  local name=$1 rc=0
  shift
  env_setup
  echo "== $name $* ($(date +%T))"
  case "$name" in
    gpu-tests)
      timeout 900 python3 -m pytest -q -p no:cacheprovider tests/unit/test_host_pool.py \
        tests/unit/test_copy.py tests/unit/test_index.py tests/unit/test_tiers.py "$@"
      keep_rc $?  # the engine tests run whatever the unit tests gave
      timeout 900 python3 -m pytest -q -p no:cacheprovider tests/integration/test_engine.py "$@" ;;
    pytest)  # any tests: ARGS are pytest's
      timeout 600 python3 -m pytest -q -p no:cacheprovider "$@" ;;
    gpu-copy-tests)
      timeout 600 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_host_pool.py \
        tests/unit/test_copy.py "$@" ;;
    bench-serve)
      [ $# -gt 0 ] || set -- --workload prefix --configs offload ours prefix roof simple
      python3 -m bench.serve --record "$RUN/results.jsonl" --raw-dir "$RUN/raw" \
        --chart "$RUN/serve-$(workload_of "$@").png" "$@" ;;
    bench-variants)
      python3 -m bench.serve --workload prefix --concurrency 16 64 --label "load modes" \
        --configs ours:load=layerwise ours:load=async ours:demote=lazy "$@" \
        --record "$RUN/results.jsonl" --raw-dir "$RUN/raw" --chart "$RUN/serve-prefix-variants.png" ;;
    bench-docqa)
      python3 -m bench.compare --workload docqa --configs offload ours "$@" --record "$RUN/results.jsonl" \
        --chart-dir "$RUN" --raw-dir "$RUN/raw" ;;
    bench-copy)  # its result file is one line of the record: appended to the host's record
      python3 -m bench.copy_bench "$@" --out "$RUN/copy-llama-3.1-8b.json" &&
        python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(",", ":")))' \
          "$RUN/copy-llama-3.1-8b.json" >> "$RUN/results.jsonl" ;;
    *) echo "unknown suite $name" >&2; return 2 ;;
  esac
  keep_rc $?
  echo "== $name rc=$rc ($(date +%T))"
  return "$rc"
}

workload_of() {  # the value of --workload among bench.serve's arguments (default prefix)
  local w=prefix
  while [ $# -gt 0 ]; do [ "$1" = --workload ] && w=${2:-prefix}; shift; done
  echo "$w"
}

collect() {
  [ -n "${OUT:-}" ] || return 0
  [ -f "$RUN/results.jsonl" ] && cp "$RUN/results.jsonl" "$OUT/"
  cp "$RUN"/*.png "$OUT/" 2>/dev/null
  tar czf "$OUT/run.tgz" -C "$RUN" --exclude='*.png' --exclude=results.jsonl . 2>/dev/null
  return 0
}

case "${1:-}" in
  stage)
    bash ".gpu-stage/p$2/stage.sh" ;;
  install)
    bash "${TPC_GPU_STAGE:-$HOME/tpc-stage}/install_vllm.sh" || exit 1
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$SITE" --upgrade . 2>&1 | tail -3
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    env_setup
    python3 -c "import triton_prefix_cache_vllm, importlib.metadata as m; print('entry points:', [e.name for e in m.entry_points(group='vllm.general_plugins')])"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import setuptools; print('setuptools', setuptools.__version__)" ;;
  start)
    shift
    rm -f "$RUN/done"
    env -u OUT setsid nohup bash -c 'for s in "$@"; do bash scripts/gpu.sh $s; done; date > "'"$RUN"'/done"' _ "$@" \
      >>"$RUN/suites.log" 2>&1 < /dev/null &
    echo "started: $* (log $RUN/suites.log)" ;;
  wait)
    deadline=$(( $(date +%s) + ${2:-540} ))
    while [ ! -f "$RUN/done" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    [ -f "$RUN/done" ] && echo "suites done: $(cat "$RUN/done")" || echo "suites still running"
    grep -E "^== |ready in|c=[0-9]+: |FAILED|Error|error" "$RUN/suites.log" | tail -n 60
    collect ;;
  "")
    sed -n '2,21p' "$0"; exit 2 ;;
  *)
    name=$1
    shift
    suite "$name" "$@" 2>&1 | tee -a "$RUN/$name.log"
    rc=$?
    collect
    exit "$rc" ;;
esac
