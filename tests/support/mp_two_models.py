"""Two engines of different models side by side in one Python process, in vLLM's default multi-process
mode (each engine core in its own spawned process); docqa interleaved between them; prints JSON.

Usage: python -m tests.support.mp_two_models MODEL_DIR_A MODEL_DIR_B  (spawned by test_faults.py; the
__main__ guard is required because vLLM spawns its engine and worker processes)."""
import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from tests.support import harness as H

    engines = [H.make_llm(path, kv_blocks=80, kv_transfer_config=H.tpc_config()) for path in sys.argv[1:3]]
    outs: list[list] = [[], []]
    for batch in H.docqa().batches:
        for i, llm in enumerate(engines):
            outs[i] += [r for b in H.play(llm, H.Workload("one", [batch])) for r in b]
    hits = [H.metric_values(llm).get("vllm:tpc_host_hit_tokens", 0) for llm in engines]
    print("RESULT " + json.dumps({
        "tokens": [[r.tokens for r in o] for o in outs],
        "logprobs": [[r.logprobs for r in o] for o in outs],
        "cached": [[r.num_cached_tokens for r in o] for o in outs],
        "host_hits": hits,
    }))
    for llm in engines:
        llm.llm_engine.engine_core.shutdown()
