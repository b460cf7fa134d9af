#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite on this machine.
# On a CPU machine Triton kernels run in the interpreter and `gpu`-marked tests are skipped;
# on a GPU host the same tests run compiled. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TPC_VENV:-.venv}/bin/python" -m pytest -q -ra "$@"
