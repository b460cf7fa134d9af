"""The soak of test_soak.py, in a process of its own; writes what the test checks as JSON.

Usage: python -m tests.support.soak_run MODEL_DIR OUT_JSON [CONFIG|oracle]  (spawned by test_soak.py).
`oracle` plays the same stream, in the same calls, through built-in prefix caching with a KV cache
that never evicts: every request's reference output, with the prefix hits a cache that never
forgets would have.

A process of its own, so resident memory is this workload's alone (not whatever earlier tests left
in the heap), with oneDNN's primitive cache off (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0, set by the
test): the CPU backend caches one matmul kernel per token count it meets, and with the stream's
ever-new batch sizes that cache fills slowly for ~1,500 requests, with or without the connector
(measured: plain vLLM +3.8% RSS from the 1,000th to the 2,000th request, flat once full; with
the cache off, flat from the start). It is bounded and not ours; anything else that grows is.
"""
from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import random
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NUM_REQUESTS = 2000
PER_CALL = 4
MAX_TOKENS = 3
HOST_SLOTS = 400  # the stream touches several thousand distinct blocks
SOAK_KV_BLOCKS = 80  # as the engine tests' small cache: < 2 long chat histories
ORACLE_KV_BLOCKS = 6000  # more than the stream's 2,533 distinct blocks: built-in caching never evicts
CHECK_EVERY = 25  # calls between full tier consistency checks and gauge reads
BLOCK = 32
#: Connector settings the soak runs with: its defaults (load="auto", write-through demotion) with
#: async loads reported a step late; async loads reported a step late (requests wait in
#: WAITING_FOR_REMOTE_KVS) with write-through demotion and stores that report a poll late (a store
#: overlaps the next step, as slow copies on a GPU do); layer-wise loads with either demotion.
#: name -> (kv_connector_extra_config, debug.load_delay_polls, store report delay in polls)
CONFIGS: dict[str, tuple[dict, int, int]] = {
    "defaults": ({}, 1, 0),
    "async_write_through": ({"load": "async", "demote": "write_through"}, 1, 1),
    "layerwise_write_through": ({"load": "layerwise", "demote": "write_through"}, 0, 1),
    "layerwise_lazy": ({"load": "layerwise", "demote": "lazy"}, 0, 0),
    "async_lazy": ({"load": "async", "demote": "lazy"}, 1, 0),
}
#: The configurations test_soak.py runs (TPC_SOAK_CONFIGS=a,b overrides). layerwise_write_through is
#: the one that showed, on the CPU too, write-through storing a block another request was still
#: computing in the same step (scheduler.py, `_plan_write_through`).
TEST_CONFIGS = [c for c in os.environ.get(
    "TPC_SOAK_CONFIGS", "defaults,async_write_through,layerwise_write_through,layerwise_lazy").split(",")
    if c]
#: live Python objects may grow less than this from the 1,000th to the 2,000th request (test_soak.py)
OBJECT_GROWTH_LIMIT = 0.01
SETTLE_MAX = 8  # requests shorter than a block, played after the soak until no store is in flight


def soak_prompts(n: int = NUM_REQUESTS, seed: int = 2026) -> tuple[list[list[int]], list[str]]:
    """The seeded request stream and each request's kind."""
    rng = random.Random(seed)
    bs = BLOCK

    def toks(k: int) -> list[int]:
        return [rng.randrange(100, 30000) for _ in range(k)]

    docs = [toks(rng.randrange(1, 13) * bs) for _ in range(24)]  # whole blocks, 1-12 of them
    systems = [toks(rng.randrange(40, 200)) for _ in range(4)]  # shared prefixes off block boundaries
    sessions = [toks(rng.randrange(1, 5) * bs + rng.randrange(0, bs)) for _ in range(8)]
    prompts: list[list[int]] = []
    kinds: list[str] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            kind, p = "doc", rng.choice(docs) + toks(rng.randrange(1, 40))
        elif r < 0.45:
            kind, s = "chat", rng.randrange(len(sessions))
            if len(sessions[s]) > 1100:  # a new conversation in this seat
                sessions[s] = toks(rng.randrange(1, 5) * bs)
            sessions[s] = sessions[s] + toks(rng.randrange(8, 60))
            p = list(sessions[s])
        elif r < 0.62:
            kind, p = "shared", rng.choice(systems) + toks(rng.randrange(1, 100))
        elif r < 0.80:
            kind, p = "noreuse", toks(rng.randrange(1, 260))
        elif r < 0.92:
            kind, p = "short", toks(rng.randrange(1, bs))  # shorter than one block
        else:
            kind = "repeat"  # an exact earlier prompt (its last block is always recomputed)
            p = list(rng.choice(prompts[-300:])) if prompts else toks(bs + 1)
        prompts.append(p)
        kinds.append(kind)
    return prompts, kinds


def distinct_blocks(prompts: list[list[int]]) -> int:
    """Full blocks with distinct prefixes (what a cache would hold to miss nothing)."""
    seen = set()
    for p in prompts:
        h = 0
        for i in range(len(p) // BLOCK):
            h = hash((h, tuple(p[i * BLOCK : (i + 1) * BLOCK])))
            seen.add(h)
    return len(seen)


@dataclass
class SoakResult:
    seconds: float = 0.0
    ours: list[Any] = field(default_factory=list)  # (tokens, logprobs, num_cached_tokens) per request
    kinds: list[str] = field(default_factory=list)
    num_slots: int = 0
    pool_slots: int = 0
    max_used: int = 0  # most slots READY or being written, after any call
    max_used_gauge: float = 0.0
    rss: dict[str, int] = field(default_factory=dict)  # keyed by requests done
    objects: dict[str, int] = field(default_factory=dict)
    #: the object types whose live count grew most between the two checkpoints (diagnostics)
    objects_grown: list = field(default_factory=list)
    objects_new_sample: list = field(default_factory=list)
    #: of the objects new at the 2,000th request, those a Triton compilation made meanwhile (a
    #: bounded cache: one set per kernel variant, whoever's kernel), and the kernels compiled
    jit_objects: int = 0
    jit_kernels: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tier: dict[str, float] = field(default_factory=dict)
    slot_bytes: int = 0
    block_size: int = 0
    final_state: dict = field(default_factory=dict)
    debug_checked: int = 0
    debug_mismatches: list = field(default_factory=list)
    distinct_blocks: int = 0
    settle_requests: int = 0


#: the SoakResult fields the memory check reads (the oracle's run reports them too)
MEMORY_FIELDS = ("rss", "objects", "objects_grown", "objects_new_sample", "jit_objects", "jit_kernels")


def object_growth(objects: dict[str, int], jit_objects: int) -> float:
    """Live objects' growth from the 1,000th to the 2,000th request, without those Triton's
    compilations made meanwhile: what the memory test bounds by OBJECT_GROWTH_LIMIT."""
    return (objects[str(NUM_REQUESTS)] - jit_objects) / objects[str(NUM_REQUESTS // 2)] - 1


def _describe_new(new: list, new_ids: set) -> list[str]:
    """A few of the objects created since the first checkpoint (`new`), described (diagnostics: what
    grows). Tensors are told apart by device, dtype and shape, and they and new containers by what
    holds them (`_holder`). Call it last: to find holders that vLLM froze at its start-up
    (`gc.freeze()`, out of `gc`'s reach otherwise), it unfreezes them, so `gc` lists them from then on."""
    gc.unfreeze()
    out: collections.Counter = collections.Counter()
    for o in new:
        t = type(o)
        what = f"{t.__module__}.{t.__qualname__}"
        name = getattr(o, "__qualname__", None) or getattr(o, "__name__", None)
        mod = getattr(o, "__module__", None)
        if t.__name__ == "CompiledKernel":  # which Triton kernel compiled a variant meanwhile
            name, mod = getattr(o, "name", "?"), "kernel"
        if t.__name__ in ("Tensor", "Parameter") and hasattr(o, "shape"):
            dtype = str(o.dtype).removeprefix("torch.")
            what += f" {o.device} {dtype} {tuple(o.shape)} held by {_holder(o, new_ids, new)}"
        elif isinstance(name, str):
            what += f" {mod}.{name}"
        elif isinstance(o, (list, dict)) and o:
            first = next(iter(o))
            what += (f" of {type(first).__module__}.{type(first).__qualname__} (len {len(o)})"
                     f" held by {_holder(o, new_ids, new)}")
        out[what[:200]] += 1
    return [f"{n} x {w}" for w, n in out.most_common(25)]


def _tname(x: Any) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _holder(o: Any, new_ids: set, census: list) -> str:
    """What refers to `o`, in a few words: each referrer's type (`*`: created since the first
    checkpoint) and, for a dict, list or tuple, the types of what holds that in turn (an instance
    whose attribute dict it is, a cache's owner). Frames and the census's own lists are left out."""
    frame = type(sys._getframe())
    refs = gc.get_referrers(o)
    skip = {id(census), id(new_ids), id(refs)}
    names = []
    for r in refs:
        if id(r) in skip or isinstance(r, frame):
            continue
        n = _tname(r)
        if isinstance(r, (dict, list, tuple)):
            up = gc.get_referrers(r)
            owners = [_tname(x) for x in up
                      if id(x) not in skip and x is not up and not isinstance(x, frame)][:2]
            del up
            n += f"<{','.join(owners)}>" if owners else ""
        names.append(n + ("*" if id(r) in new_ids else ""))
        if len(names) == 3:
            break
    del refs
    return "/".join(sorted(names)) or "nothing tracked"


def _jit_artefacts(new: list, new_ids: set) -> tuple[int, dict]:
    """(how many of the objects created since the first checkpoint (`new`) a Triton compilation
    made, the kernels compiled meanwhile by name): the new objects of Triton's own types (compiled
    kernels, their launchers and metadata) and every new object reachable from them through new
    objects (the metadata's namedtuple class, its field getters, functions and cells), plus new weak
    references to any of those. Objects of this package are never counted (its module is not
    `triton.`)."""
    stack = [o for o in new if type(o).__module__.split(".")[0] == "triton"]
    kernels = collections.Counter(str(getattr(o, "name", "?")) for o in stack
                                  if type(o).__name__ == "CompiledKernel")
    seen: set = set()
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        stack.extend(r for r in gc.get_referents(o) if id(r) in new_ids and id(r) not in seen)
    refs = sum(1 for o in new if isinstance(o, weakref.ref) and id(o) not in seen and id(o()) in seen)
    return len(seen) + refs, dict(kernels)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS, so RSS counts live memory, not the allocator's slack."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Census:
    """Live memory at the memory test's two checkpoints, the 1,000th and the 2,000th request:
    resident memory and tracked objects, and at the second what is new since the first (by type,
    described, and what of it Triton's compilations made)."""

    def __init__(self) -> None:
        self.types_half: collections.Counter = collections.Counter()
        self.ids_half: set = set()

    def at(self, done: int, res: SoakResult) -> None:
        if done not in (NUM_REQUESTS // 2, NUM_REQUESTS):
            return
        from tests.support import harness as H

        # The type census leaves ~200 objects of its own behind (weakrefs, measured): take it
        # before the first count and after the second, so the counts include them both times.
        if done == NUM_REQUESTS // 2:
            self.types_half = H.live_object_types()
            self.ids_half = {id(o) for o in gc.get_objects()}
        res.objects[str(done)] = H.live_objects()
        if done == NUM_REQUESTS:
            types = H.live_object_types()
            types.subtract(self.types_half)
            res.objects_grown = [(t, n) for t, n in types.most_common(10) if n > 0]
            new = [o for o in gc.get_objects() if id(o) not in self.ids_half]
            new_ids = {id(o) for o in new}
            res.jit_objects, res.jit_kernels = _jit_artefacts(new, new_ids)
            if object_growth(res.objects, res.jit_objects) >= OBJECT_GROWTH_LIMIT:
                # last (it unfreezes), and only when needed: on the GPU it took ~55 s
                res.objects_new_sample = _describe_new(new, new_ids)
            del new
            self.ids_half = set()
        _trim_heap()
        res.rss[str(done)] = H.rss_bytes()


def run(model_path: str, config: str = "defaults") -> SoakResult:
    from vllm.inputs import TokensPrompt

    from tests.support import harness as H

    prompts, kinds = soak_prompts()
    res = SoakResult(kinds=kinds, distinct_blocks=distinct_blocks(prompts))
    host_gib = HOST_SLOTS * H.PAGE_BYTES_PER_BLOCK / 2**30
    extra, delay, store_polls = CONFIGS[config]
    debug = {"record_pages": True, "load_delay_polls": delay}
    import triton_prefix_cache_vllm.worker as worker_mod

    real_engine = worker_mod.CopyEngine
    if store_polls:  # stores outlive their step, as in the default multi-process engine
        worker_mod.CopyEngine = H.slow_store_copy_engine(real_engine, store_polls)
        debug["poll_stores"] = True
    tpc = H.tpc_config(host_cache_gib=host_gib, **extra, debug=debug)
    try:
        llm = H.make_llm(model_path, kv_blocks=SOAK_KV_BLOCKS, kv_transfer_config=tpc)
    finally:
        worker_mod.CopyEngine = real_engine
    try:
        side = H.scheduler_of(llm).connector._sched
        wk = H.worker_side()
        res.num_slots, res.pool_slots = side.tier.num_slots, wk.pool.num_slots
        res.slot_bytes, res.block_size = side.slot_bytes, side.block_size
        before = H.metric_values(llm)
        sp = _sampling()
        ours: list[tuple] = []
        census = _Census()
        t0 = time.perf_counter()
        for call, lo in enumerate(range(0, NUM_REQUESTS, PER_CALL)):
            batch = prompts[lo : lo + PER_CALL]
            out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
            ours.extend(_record(r) for r in out)
            del out
            snap = side.tier.manager.snapshot()
            res.max_used = max(res.max_used, snap.ready_slots + snap.storing_slots)
            if call % CHECK_EVERY == 0:
                side.tier.check()
                res.max_used_gauge = max(res.max_used_gauge,
                                         H.metric_values(llm).get("vllm:tpc_host_used_slots", 0))
            census.at(lo + len(batch), res)
        res.seconds = time.perf_counter() - t0
        res.ours = ours
        # Stores the last steps started may still be copying (an idle engine polls nothing: a known
        # bug, tested in test_faults.py); a few requests shorter than a block step the engine until
        # they report, so the final counters are complete.
        while side.inflight_stores and res.settle_requests < SETTLE_MAX:
            res.settle_requests += 1
            llm.generate([TokensPrompt(prompt_token_ids=[5])], sp, use_tqdm=False)
        side.tier.check()
        after = H.metric_values(llm)
        res.metrics = {k: v - before.get(k, 0) for k, v in after.items()}
        res.tier = side.tier.manager.snapshot().as_dict()
        res.final_state = {"pins": H.pinned_slots(side.tier), "held": len(side.held_by_store),
                           "inflight_loads": len(side.inflight_loads),
                           "inflight_stores": len(side.inflight_stores), "reqs": len(side.reqs)}
        res.debug_checked, res.debug_mismatches = wk.debug_checked, list(wk.debug_mismatches)
    finally:
        H.shutdown(llm)
    return res


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False,
                          logprobs=0)


def _record(r) -> tuple:
    """(tokens, logprobs, cached tokens) of one output, as plain tuples (the collector stops
    tracking them, so a stored record is not a live object of the memory check)."""
    c = r.outputs[0]
    lps = tuple(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs))
    return (tuple(c.token_ids), lps, r.num_cached_tokens or 0)


def run_oracle(model_path: str) -> dict:
    """The stream through built-in prefix caching that never evicts, in the soak's calls."""
    from vllm.inputs import TokensPrompt

    from tests.support import harness as H

    prompts, _ = soak_prompts()
    llm = H.make_llm(model_path, kv_blocks=ORACLE_KV_BLOCKS)
    t0 = time.perf_counter()
    try:
        sp = _sampling()
        records = []
        census, mem = _Census(), SoakResult()
        for lo in range(0, NUM_REQUESTS, PER_CALL):
            batch = prompts[lo : lo + PER_CALL]
            out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
            records.extend(_record(r) for r in out)
            del out
            census.at(lo + len(batch), mem)
    finally:
        H.shutdown(llm)
    # The engine alone, same stream and calls (a bigger KV cache): vLLM's own growth, for comparison.
    memory = {k: getattr(mem, k) for k in MEMORY_FIELDS}
    return {"records": records, "seconds": time.perf_counter() - t0, "memory": memory}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = sys.argv[3] if len(sys.argv) > 3 else "defaults"
    if cfg == "oracle":
        payload = run_oracle(sys.argv[1])
        seconds = payload["seconds"]
    else:
        result = run(sys.argv[1], cfg)
        payload, seconds = asdict(result), result.seconds
    Path(sys.argv[2]).write_text(json.dumps(payload))
    print(f"soak ({cfg}): {NUM_REQUESTS} requests in {seconds:.1f} s")
