"""Run the docqa workload through the connector in vLLM's default multi-process mode; print JSON.

Usage: python tests/vllm/mp_run.py MODEL_DIR   (spawned by test_multiprocess.py; the __main__ guard is
required because vLLM spawns its engine and worker processes)."""
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    sys.path.insert(0, str(Path(__file__).parent))
    import harness as H

    llm = H.make_llm(sys.argv[1], kv_blocks=80, kv_transfer_config=H.tpc_config())
    out = H.play(llm, H.docqa())
    m = H.metric_values(llm)
    print("RESULT " + json.dumps({
        "tokens": [[r.tokens for r in b] for b in out],
        "logprobs": [[r.logprobs for r in b] for b in out],
        "cached": [[r.num_cached_tokens for r in b] for b in out],
        "metrics": {k: v for k, v in m.items() if "prefix_cache" in k or k.startswith("vllm:tpc")},
    }))
    llm.llm_engine.engine_core.shutdown()
