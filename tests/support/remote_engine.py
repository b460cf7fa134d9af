"""One vLLM engine with the remote tier on, in its own process, driven by tests/integration/test_remote.py
as two engines sharing a store would be: one JSON request per line on stdin, one JSON answer per
line on stdout (vLLM and the Mooncake client log to stderr).

Requests ({"op": ...}):
  start    model, url (the `remote` value), kv_blocks, extra (more connector keys): build the engine
  play     workload ("docqa" or "chat", harness.py's defaults), first, count: play batches
           first .. first+count-1; answers each request's tokens, logprobs and cached tokens
  flush    step with one-token prompts until every store and put this engine started is reported
  corrupt  prompt (token ids), block: flip one payload byte of that block's value in the store
  metrics  the metrics (vLLM's prefix-cache ones and the adapter's)
  state    the metrics, the warnings of the store clients, the connector's state (pins, fetches
           and puts in flight, the host tier's check); in-process engines only
  quit

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless the environment says
otherwise) so the connector's state can be read directly; every engine of a test is a separate
process, as separate deployments are. With VLLM_ENABLE_V1_MULTIPROCESSING=1 the engine core runs
in a process of its own, as in `vllm serve`: `play` and `metrics` work, `state` and `flush` do not.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Engine:
    def __init__(self) -> None:
        self.llm = None
        self.warnings = Warnings()
        logging.getLogger("triton_prefix_cache.remote").addHandler(self.warnings)

    def start(self, model: str, url: str, kv_blocks: int = 80, extra: dict | None = None) -> dict:
        from tests.support import harness as H

        t = time.monotonic()
        cfg = H.tpc_config(remote=url, **(extra or {}))
        self.llm = H.make_llm(model, kv_blocks=kv_blocks, kv_transfer_config=cfg)
        return {"seconds": time.monotonic() - t}

    def play(self, workload: str, first: int, count: int) -> dict:
        from tests.support import harness as H

        wl = {"docqa": H.docqa, "chat": H.chat}[workload]()
        part = H.Workload(wl.name, wl.batches[first : first + count], wl.max_tokens)
        t = time.monotonic()
        out = H.play(self.llm, part)
        return {"records": [[[r.tokens, r.logprobs, r.num_cached_tokens] for r in b] for b in out],
                "seconds": time.monotonic() - t}

    def _sides(self):
        from tests.support import harness as H

        return H.scheduler_of(self.llm).connector._sched, H.worker_side()

    def flush(self, timeout: float = 60) -> dict:
        """The last blocks of a request are stored in the step after it finishes, and a put follows
        its store: an in-process engine steps only for requests, so feed it one-token prompts (no
        full block: nothing new to store) until nothing it started is outstanding."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sched, _ = self._sides()
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
        t, steps = time.monotonic(), 0
        while sched.pending_stores or sched.inflight_stores or sched.puts:
            if time.monotonic() - t > timeout:
                raise TimeoutError(f"stores or puts still outstanding after {timeout} s: "
                                   f"{len(sched.inflight_stores)} stores, {len(sched.puts)} puts")
            self.llm.generate([TokensPrompt(prompt_token_ids=[7, 8, 9])], sp, use_tqdm=False)
            steps += 1
            time.sleep(0.02)
        return {"steps": steps, "seconds": time.monotonic() - t}

    def corrupt(self, prompt: list[int], block: int) -> dict:
        """Rewrite one stored value with one payload byte flipped, through this engine's raw store
        client (as a bit flip in the store's memory would leave it)."""
        import numpy as np
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import hash_block_tokens

        from tests.support import harness as H
        from triton_prefix_cache.keys import keys_from_block_hashes
        from triton_prefix_cache.remote.keys import HEADER_BYTES

        sched, _ = self._sides()
        hash_fn = get_hash_fn_by_name(self.llm.llm_engine.vllm_config.cache_config.prefix_caching_hash_algo)
        parent, hashes = None, []
        for i in range(block + 1):
            parent = hash_block_tokens(hash_fn, parent, prompt[i * H.BLOCK : (i + 1) * H.BLOCK])
            hashes.append(parent)
        ns, client = sched.remote.namespace, sched.remote.client
        (name,) = ns.object_keys(keys_from_block_hashes(hashes[block:]))
        size = HEADER_BYTES + ns.slot_bytes
        buf = np.zeros(size, dtype=np.uint8)
        assert client.register_buffer(buf.ctypes.data, size) == 0
        try:
            got = client.get_into(name, buf.ctypes.data, size)
            if got != size:
                return {"error": f"get_into {name}: {got}"}
            buf[HEADER_BYTES + size // 2] ^= 0xFF
            client.remove(name, True)
            return {"put": client.put_from(name, buf.ctypes.data, size), "key": name}
        finally:
            client.unregister_buffer(buf.ctypes.data)

    def metrics(self) -> dict:
        from tests.support import harness as H

        m = H.metric_values(self.llm)
        return {"metrics": {k: v for k, v in m.items() if "prefix_cache" in k or k.startswith("vllm:tpc")}}

    def state(self) -> dict:
        from tests.support import harness as H

        sched, worker = self._sides()
        sched.tier.check()
        return {
            **self.metrics(),
            "warnings": list(self.warnings.messages),
            "pins": H.pinned_slots(sched.tier),
            "fetches": len(sched.fetches), "puts": len(sched.puts),
            "inflight_stores": len(sched.inflight_stores), "inflight_loads": len(sched.inflight_loads),
            "remote_ready": sched.remote_ready,
            "namespace": sched.remote.namespace.digest.hex() if sched.remote is not None else None,
            "worker_jobs": len(worker.remote_jobs) if worker.remote is not None else None,
            "debug_checked": worker.debug_checked, "debug_mismatches": len(worker.debug_mismatches),
            "degraded": [sched.remote.degraded, worker.remote.degraded if worker.remote else None],
        }

    def quit(self) -> dict:
        t = time.monotonic()
        if self.llm is not None:
            from tests.support import harness as H

            H.shutdown(self.llm)
            self.llm = None
        return {"seconds": time.monotonic() - t, "warnings": list(self.warnings.messages)}


def main() -> None:
    # Answers go to the original stdout; everything else that writes to file descriptor 1 (vLLM's
    # logs, and the engine core process it spawns, which inherits it) goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine = Engine()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            answer = getattr(engine, op)(**req)
        except Exception as e:  # the test shows it
            import traceback

            answer = {"exception": repr(e), "traceback": traceback.format_exc()[-3000:]}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        if op == "quit":
            out.flush()
            os._exit(0)


if __name__ == "__main__":
    main()
