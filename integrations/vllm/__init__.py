"""vLLM adapter for triton-prefix-cache (import name `triton_prefix_cache_vllm`).

vLLM calls `register()` in every process through the `vllm.general_plugins` entry point declared
in pyproject.toml, so `--kv-transfer-config '{"kv_connector":"TritonPrefixCacheConnector", ...}'`
works with no module path and no PYTHONPATH. Importing this package imports nothing heavy: the
connector module loads lazily, when vLLM first asks for the class.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from triton_prefix_cache.config import PrefixCacheConfig

CONNECTOR_NAME = "TritonPrefixCacheConnector"
CONNECTOR_MODULE = "triton_prefix_cache_vllm.connector"
#: The one logger of every adapter module: under vLLM's `vllm` logger, so vLLM's logging config
#: (its handler, format and VLLM_LOGGING_LEVEL) applies to it.
LOGGER_NAME = "vllm.triton_prefix_cache"


def register() -> None:
    """Register the connector name with vLLM's KVConnectorFactory (idempotent, cheap).

    vLLM loads general plugins while it builds its command-line parser, before it parses the
    arguments: so `vllm serve ... --kv-transfer-config` with a config this connector refuses stops
    here, with one line naming the key (exit status 2, as vLLM's usage errors), instead of after
    the engine has loaded the model, where vLLM first builds the connector. Only in vLLM's own
    command-line process: a program that uses vLLM as a library keeps its arguments to itself."""
    import sys

    argv = _vllm_command_line()
    if argv is not None:
        from .cli import USAGE_ERROR, check_command_line

        error = check_command_line(argv)
        if error is not None:
            print(error, file=sys.stderr, flush=True)
            raise SystemExit(USAGE_ERROR)

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # The factory raises on a second registration of a name; plugins may be loaded more than once
    # per process (e.g. tests calling load_general_plugins directly).
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)


#: The `python -m` modules of vLLM's command line (its `vllm` script runs the first) and this
#: package's CLI in front of it.
VLLM_CLI_MODULES = ("vllm.entrypoints.cli.main", "vllm.entrypoints.openai.api_server",
                    "triton_prefix_cache_vllm.cli")


def _vllm_command_line() -> list[str] | None:
    """This process's arguments if it is vLLM's command line (the `vllm` script or one of
    VLLM_CLI_MODULES run as the main module, not a child process of one), else None."""
    import multiprocessing
    import os
    import sys

    argv = getattr(sys, "argv", None)
    if not argv or multiprocessing.parent_process() is not None:
        return None
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name in VLLM_CLI_MODULES or os.path.basename(argv[0]) == "vllm":
        return list(argv[1:])
    return None


def connector_config(extra_config: Any) -> PrefixCacheConfig:
    """The validated config of `kv_connector_extra_config`, as this adapter can serve it.

    Raises ConfigError naming the key. Every check of the command line, of vLLM's config build and
    of the connector's construction goes through here, so they refuse the same configs. What
    depends on the engine too (`remote` with tensor parallelism or randomly seeded block hashes)
    is checked where the engine's config is known: `remote_tier.check_remote`.
    """
    from triton_prefix_cache.config import PrefixCacheConfig

    return PrefixCacheConfig.validated(extra_config)


__all__ = ["CONNECTOR_NAME", "LOGGER_NAME", "connector_config", "register"]
