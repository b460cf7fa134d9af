#!/usr/bin/env bash
# Steps on a GPU host without a package registry (shared/gpu/README.md), one per device call:
#   bash scripts/gpu_host.sh stage K     keep staged folder .gpu-stage/pK on the host
#   bash scripts/gpu_host.sh install     install vLLM 0.26.0 (after the last stage), this package and
#                                        the test wheels carried in .whl/ (pytest, hypothesis)
# Then `source scripts/gpu_env.sh` before Python.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${TPC_GPU_SITE:-$HOME/tpc-site}
case "${1:-}" in
  stage)
    bash ".gpu-stage/p$2/stage.sh" ;;
  install)
    bash "${TPC_GPU_STAGE:-$HOME/tpc-stage}/install_vllm.sh"
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$SITE" . 2>&1 | tail -3
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    PYTHONPATH="$SITE" python3 -c "import triton_prefix_cache_vllm, importlib.metadata as m; print('entry points:', [e.name for e in m.entry_points(group='vllm.general_plugins')])"
    ;;
  *) echo "usage: $0 stage K | install" >&2; exit 2 ;;
esac
