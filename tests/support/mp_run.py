"""Run the docqa workload through the connector in vLLM's default multi-process mode; print JSON.

Usage: python -m tests.support.mp_run MODEL_DIR [reset [DEBUG_JSON]]   (spawned by test_multiprocess.py; the
__main__ guard is required because vLLM spawns its engine and worker processes). With `reset`: play a few
prompts, then call reset_prefix_cache until it succeeds (stores still copying hold GPU blocks; the engine
core must keep stepping until they are reported) and print how long that took. DEBUG_JSON: the
connector's `debug` option (e.g. '{"store_delay_polls": 3}')."""
import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from tests.support import harness as H

    debug = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    llm = H.make_llm(sys.argv[1], kv_blocks=80, kv_transfer_config=H.tpc_config(debug=debug))
    if sys.argv[2:3] == ["reset"]:
        import time

        H.play(llm, H.docqa(num_docs=4, rounds=1))
        t0, ok = time.monotonic(), False
        while not ok and time.monotonic() - t0 < 20:
            ok = llm.reset_prefix_cache(reset_connector=True)
            if not ok:
                time.sleep(0.05)
        print("RESULT " + json.dumps({"reset_ok": ok, "seconds": time.monotonic() - t0}))
        llm.llm_engine.engine_core.shutdown()
        sys.exit(0)
    out = H.play(llm, H.docqa())
    m = H.metric_values(llm)
    print("RESULT " + json.dumps({
        "tokens": [[r.tokens for r in b] for b in out],
        "logprobs": [[r.logprobs for r in b] for b in out],
        "cached": [[r.num_cached_tokens for r in b] for b in out],
        "metrics": {k: v for k, v in m.items() if "prefix_cache" in k or k.startswith("vllm:tpc")},
    }))
    llm.llm_engine.engine_core.shutdown()
