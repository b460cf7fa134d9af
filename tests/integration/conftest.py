"""Engine fixtures: each configuration starts one in-process engine per session, lazily.

`runs(name)` starts the engine of that configuration the first time a test asks for it, plays
every workload through it, keeps the results (`harness.RunResult`) and shuts the engine down, so
at most one engine lives at a time and each starts once. Configurations:
  oracle     built-in prefix caching, KV cache big enough for every workload (no eviction)
  nocache    no prefix caching at all
  tpc        the connector with async loads and lazy demotion, KV cache far too small
  layerwise  layer-wise loads, lazy demotion
  ahead      layer-wise loads submitted group by group as the forward reaches them (layerwise_ahead=0)
  wt         layer-wise loads, write-through demotion
  defaults   the connector's defaults (load="auto": layer-wise alone, async beside other requests;
             write-through demotion)
  smallhost  layer-wise loads and lazy demotion with a host tier smaller than the working set
  triton     the defaults with the scheduler's index on the GPU (index_backend="triton"; GPU only:
             on a CPU its kernels would run in Triton's interpreter)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import harness as H

BIG_KV_BLOCKS = 1200
SMALL_KV_BLOCKS = 80  # < 4 documents of the docqa workload: LRU evicts each before its reuse
WORKLOADS = {"docqa": H.docqa, "chat": H.chat, "concurrent": H.concurrent, "preempt": H.preempt,
             "tail1": H.tail1, "samestep": H.samestep}

#: Every connector run checks its pages (debug.record_pages); runs whose loads may be async also
#: report them two polls late (debug.load_delay_polls), so requests really wait for them.
PAGES = {"record_pages": True}
LATE = {"record_pages": True, "load_delay_polls": 2}

CONFIGS: dict[str, dict] = {
    "oracle": dict(kv_blocks=BIG_KV_BLOCKS),
    "nocache": dict(kv_blocks=BIG_KV_BLOCKS, prefix_caching=False),
    "tpc": dict(kv_blocks=SMALL_KV_BLOCKS,
                kv_transfer_config=H.tpc_config(load="async", demote="lazy", debug=LATE)),
    "layerwise": dict(kv_blocks=SMALL_KV_BLOCKS,
                      kv_transfer_config=H.tpc_config(load="layerwise", demote="lazy", debug=PAGES)),
    "ahead": dict(kv_blocks=SMALL_KV_BLOCKS,
                  kv_transfer_config=H.tpc_config(load="layerwise", demote="lazy", layerwise_ahead=0,
                                                  debug=PAGES)),
    "wt": dict(kv_blocks=SMALL_KV_BLOCKS,
               kv_transfer_config=H.tpc_config(load="layerwise", demote="write_through", debug=PAGES)),
    "defaults": dict(kv_blocks=SMALL_KV_BLOCKS, kv_transfer_config=H.tpc_config(debug=LATE)),
    "triton": dict(kv_blocks=SMALL_KV_BLOCKS, kv_transfer_config=H.tpc_config(index_backend="triton",
                                                                              debug=LATE)),
    # 100 slots of 32 KiB: less than the docqa documents (150 blocks), so the host tier evicts too.
    "smallhost": dict(kv_blocks=SMALL_KV_BLOCKS,
                      kv_transfer_config=H.tpc_config(host_cache_gib=100 * H.PAGE_BYTES_PER_BLOCK / 2**30,
                                                      load="layerwise", demote="lazy", debug=PAGES)),
}


def _connector_state(llm) -> dict:
    """Scheduler- and worker-side facts the tests check, taken while the engine is alive."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    sched = H.scheduler_of(llm)
    side = sched.connector._sched
    side.tier.check()
    out = {
        "tier_ready": len(side.tier),
        "tier_evictions": side.tier.evictions,
        "pins": H.pinned_slots(side.tier),
        "held": len(side.held_by_store),
        "inflight_loads": len(side.inflight_loads),
        "inflight_stores": len(side.inflight_stores),
        "gpu_free": sched.kv_cache_manager.block_pool.get_num_free_blocks(),
        "gpu_total": sched.kv_cache_manager.block_pool.num_gpu_blocks,
        "partial_hits": list(side.recent_partial_hits),
    }
    if has_kv_transfer_group():
        wk = get_kv_transfer_group()._worker
        out.update(debug_checked=wk.debug_checked, debug_mismatches=list(wk.debug_mismatches),
                   late_groups=wk.engine.stats.late_groups if wk.engine is not None else 0,
                   full_graph_loads=wk.full_graph_loads, step_modes=dict(wk.step_modes))
    return out


def _run(name: str, model_path: Path, extra_checks: bool = True, **engine: object) -> H.RunResult:
    cfg = {**CONFIGS[name], **engine}
    res = H.RunResult(name)
    llm = H.make_llm(model_path, **cfg)
    try:
        vc = llm.llm_engine.vllm_config
        cg = vc.compilation_config.cudagraph_mode
        res.extra["full_cuda_graphs"] = bool(cg is not None and cg.has_full_cudagraphs())
        # What vLLM made of the model's layers (the layout a connector is handed), and its policy
        # for failed loads once the connector has set it.
        specs = [g.kv_cache_spec for g in H.scheduler_of(llm).kv_cache_config.kv_cache_groups]
        res.extra["kv_groups"] = [(type(sp).__name__, getattr(sp, "sliding_window", None)) for sp in specs]
        res.extra["load_failure_policy"] = getattr(vc.kv_transfer_config, "kv_load_failure_policy", None)
        is_tpc = cfg.get("kv_transfer_config") is not None
        for wname, make in WORKLOADS.items():
            res.outputs[wname] = H.play(llm, make())
            res.extra[f"metrics_after_{wname}"] = H.metric_values(llm)
            if is_tpc:
                res.extra[f"state_after_{wname}"] = _connector_state(llm)
        res.metrics = H.metric_values(llm)
        if name == "tpc" and extra_checks:
            _extra_checks_tpc(llm, res)
    finally:
        H.shutdown(llm)
    return res


def _extra_checks_tpc(llm, res: H.RunResult) -> None:
    """Abort mid-load, then reset, on the default configuration's engine (no extra engine start)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
    docs = H.docqa()
    # Ask about documents the host tier holds (round 1 prompts' documents with new questions),
    # abort one request right after the step that scheduled its load.
    prompts = [docs.batches[i][0][:-20] + [7] * 20 for i in range(3)]
    for i, p in enumerate(prompts):
        eng.add_request(f"abort-{i}", TokensPrompt(prompt_token_ids=p), sp)
    eng.step()
    eng.abort_request(["abort-1"])
    finished = {}
    for _ in range(200):
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = list(o.outputs[0].token_ids)
        if not eng.has_unfinished_requests():
            break
    res.extra["abort_finished"] = finished
    res.extra["abort_prompts"] = prompts
    res.extra["state_after_abort"] = _connector_state(llm)
    # reset: the host tier empties, and the same document is then a miss everywhere.
    res.extra["reset_ok"] = llm.reset_prefix_cache(reset_connector=True)
    res.extra["state_after_reset"] = _connector_state(llm)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], sp, use_tqdm=False)
    res.extra["after_reset_cached"] = out[0].num_cached_tokens
    res.extra["after_reset_tokens"] = list(out[0].outputs[0].token_ids)


#: (model, configuration) -> its run
_CACHE: dict[tuple[str, str], H.RunResult] = {}


@pytest.fixture(scope="session")
def runs(model_path):
    def get(name: str) -> H.RunResult:
        if ("tiny-llama", name) not in _CACHE:
            _CACHE[("tiny-llama", name)] = _run(name, model_path)
        return _CACHE[("tiny-llama", name)]

    return get


#: Engine arguments of a model's runs that differ from tiny-llama's. A model of sliding-window
#: layers only keeps just each prefix's last window cached (vLLM frees the rest, and 0.32 hashes
#: nothing else of it), so SMALL_KV_BLOCKS would hold every prefix of the workloads: its connector
#: runs get 40 blocks, and every run prefill chunks of 512 tokens (the least KV cache a request
#: needs is its window plus one chunk), which also frees blocks between a prompt's chunks.
MODEL_ENGINE_ARGS: dict[str, dict] = {"tiny-mistral-swa": {"max_num_batched_tokens": 512}}
MODEL_SMALL_KV_BLOCKS: dict[str, int] = {"tiny-mistral-swa": 40}


@pytest.fixture(scope="session")
def model_runs(tmp_path_factory):
    """`model_runs(model, name)`: `runs(name)` for another model of bench.models (the same KV shape
    as tiny-llama: the configurations' KV sizes are in its blocks), without the abort and reset
    checks of "tpc"."""
    from bench.models import get_model

    paths: dict[str, Path] = {}

    def get(model: str, name: str) -> H.RunResult:
        if (model, name) not in _CACHE:
            if model not in paths:
                paths[model] = get_model(model).materialize(tmp_path_factory.mktemp("models"))
            engine = dict(MODEL_ENGINE_ARGS.get(model, {}))
            if CONFIGS[name]["kv_blocks"] == SMALL_KV_BLOCKS and model in MODEL_SMALL_KV_BLOCKS:
                engine["kv_blocks"] = MODEL_SMALL_KV_BLOCKS[model]
            _CACHE[(model, name)] = _run(name, paths[model], extra_checks=False, **engine)
        return _CACHE[(model, name)]

    return get
