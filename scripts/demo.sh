#!/usr/bin/env bash
# The main job: set up (idempotent), then run the demo.
# Until the engine comparison lands this is the index microbenchmark: on a CPU machine it compares
# the torch backend with a Python dict; on a GPU host it adds the Triton kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if "${TPC_VENV:-.venv}/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec "${TPC_VENV:-.venv}/bin/python" -m bench.kernels "$@"
else
  exec "${TPC_VENV:-.venv}/bin/python" -m bench.kernels --sizes 1e3 1e4 1e5 "$@"
fi
