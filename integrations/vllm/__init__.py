"""vLLM adapter for triton-prefix-cache (import name `triton_prefix_cache_vllm`).

vLLM calls `register()` in every process through the `vllm.general_plugins` entry point declared
in pyproject.toml, so `--kv-transfer-config '{"kv_connector":"TritonPrefixCacheConnector", ...}'`
works with no module path and no PYTHONPATH. Importing this package imports nothing heavy: the
connector module loads lazily, when vLLM first asks for the class.
"""
from __future__ import annotations

CONNECTOR_NAME = "TritonPrefixCacheConnector"
CONNECTOR_MODULE = "triton_prefix_cache_vllm.connector"
#: The one logger of every adapter module: under vLLM's `vllm` logger, so vLLM's logging config
#: (its handler, format and VLLM_LOGGING_LEVEL) applies to it.
LOGGER_NAME = "vllm.triton_prefix_cache"


def register() -> None:
    """Register the connector name with vLLM's KVConnectorFactory (idempotent, cheap)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # The factory raises on a second registration of a name; plugins may be loaded more than once
    # per process (e.g. tests calling load_general_plugins directly).
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)


__all__ = ["CONNECTOR_NAME", "LOGGER_NAME", "register"]
