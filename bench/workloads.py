"""Seeded workloads for the engine comparison, sized from the engine's KV capacity.

A workload is a list of batches; each batch is submitted to the engine as one `generate` call and
each of its requests carries a label (the round, the turn) for the per-round statistics. Token ids
are random in [100, vocab) so that no two prompts share a block unless the workload means them to.
Sizes derive from `kv_tokens` (what the engine's KV cache holds), so the intent of each workload
holds on any machine: document QA and multi-turn chat outgrow the KV cache, the system prompt and
the fits workload stay inside it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    label: str  # e.g. "round 2", "turn 3"


@dataclass
class Workload:
    name: str
    description: str
    batches: list[list[Req]]
    #: Labels whose TTFT the targets are about (e.g. rounds 2-3 of document QA).
    focus: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for b in self.batches for r in b)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def docqa(
    kv_tokens: int,
    doc_tokens: int,
    vocab: int,
    ratio: float = 3.0,
    rounds: int = 3,
    question_tokens: int = 32,
    seed: int = 0,
    name: str = "docqa",
) -> Workload:
    """Documents whose total is `ratio` x the KV cache, asked about one at a time, in the same
    order every round (LRU's worst case), with a new question each round and 1 output token, so
    latency is TTFT."""
    rng = random.Random(seed)
    num_docs = max(2, round(ratio * kv_tokens / doc_tokens))
    docs = [_tokens(rng, doc_tokens, vocab) for _ in range(num_docs)]
    batches = [
        [Req(doc + _tokens(rng, question_tokens, vocab), 1, f"round {r + 1}")]
        for r in range(rounds)
        for doc in docs
    ]
    return Workload(
        name,
        f"{num_docs} documents x {doc_tokens} tokens + {question_tokens}-token question, "
        f"{rounds} rounds in tile order, working set {num_docs * doc_tokens / kv_tokens:.1f}x the KV cache",
        batches,
        focus=[f"round {r + 1}" for r in range(1, rounds)],
        params={
            "num_docs": num_docs,
            "doc_tokens": doc_tokens,
            "question_tokens": question_tokens,
            "rounds": rounds,
            "kv_tokens": kv_tokens,
            "ratio": ratio,
        },
    )


def chat(
    kv_tokens: int,
    vocab: int,
    turns: int = 4,
    system_tokens: int = 256,
    user_tokens: int = 128,
    reply_tokens: int = 64,
    ratio: float = 2.0,
    concurrency: int = 8,
    seed: int = 0,
) -> Workload:
    """Multi-turn sessions, more of them live than the KV cache holds.

    Turn t of a session re-sends the whole history (system prompt, earlier user turns and fixed
    assistant replies) plus a new user message. Turns go session after session, so a session's
    history has been pushed out of the KV cache by the others when its next turn comes. The
    replies in the history are fixed tokens, not the model's output, so every config sees the same
    prompts.
    """
    rng = random.Random(seed)
    final_len = system_tokens + turns * (user_tokens + reply_tokens)
    sessions = max(2, math.ceil(ratio * kv_tokens / final_len))
    history = [_tokens(rng, system_tokens, vocab) for _ in range(sessions)]
    batches: list[list[Req]] = []
    for t in range(turns):
        reqs = []
        for s in range(sessions):
            history[s] = history[s] + _tokens(rng, user_tokens, vocab)
            reqs.append(Req(list(history[s]), reply_tokens, f"turn {t + 1}"))
            history[s] = history[s] + _tokens(rng, reply_tokens, vocab)
        batches += [reqs[i : i + concurrency] for i in range(0, len(reqs), concurrency)]
    return Workload(
        "chat",
        f"{sessions} sessions x {turns} turns ({user_tokens} user + {reply_tokens} reply tokens a turn, "
        f"{system_tokens}-token system prompt), {concurrency} at a time; live histories "
        f"{sessions * final_len / kv_tokens:.1f}x the KV cache at the last turn",
        batches,
        focus=[f"turn {t + 1}" for t in range(1, turns)],
        params={"sessions": sessions, "turns": turns, "concurrency": concurrency, "kv_tokens": kv_tokens},
    )


def sysprompt(
    kv_tokens: int,
    vocab: int,
    requests: int = 64,
    suffix_tokens: int = 128,
    output_tokens: int = 32,
    seed: int = 0,
) -> Workload:
    """One long system prompt (a quarter of the KV cache, at most 4,096 tokens) shared by every
    request, everything submitted at once: a throughput workload that fits in the KV cache."""
    rng = random.Random(seed)
    system = _tokens(rng, min(4096, kv_tokens // 4), vocab)
    reqs = [Req(system + _tokens(rng, suffix_tokens, vocab), output_tokens, "all") for _ in range(requests)]
    return Workload(
        "sysprompt",
        f"{requests} requests sharing a {len(system)}-token system prompt "
        f"+ {suffix_tokens} own tokens, {output_tokens} output tokens, all at once",
        [reqs],
        focus=["all"],
        params={"system_tokens": len(system), "requests": requests},
    )


def noreuse(
    kv_tokens: int,
    vocab: int,
    requests: int = 64,
    prompt_tokens: int = 1024,
    output_tokens: int = 32,
    seed: int = 0,
) -> Workload:
    """Unrelated prompts, all at once: the host tier cannot help; it must not hurt."""
    rng = random.Random(seed)
    prompt_tokens = min(prompt_tokens, kv_tokens // 8)
    reqs = [Req(_tokens(rng, prompt_tokens, vocab), output_tokens, "all") for _ in range(requests)]
    return Workload(
        "noreuse",
        f"{requests} unrelated prompts x {prompt_tokens} tokens, {output_tokens} output tokens, all at once",
        [reqs],
        focus=["all"],
        params={"prompt_tokens": prompt_tokens, "requests": requests},
    )


def fits(kv_tokens: int, doc_tokens: int, vocab: int, seed: int = 0) -> Workload:
    """Document QA whose documents all fit in the KV cache (half of it)."""
    w = docqa(kv_tokens, doc_tokens, vocab, ratio=0.5, seed=seed, name="fits")
    w.description = w.description.replace("working set", "everything fits; working set")
    return w


def burst(
    kv_tokens: int,
    doc_tokens: int,
    vocab: int,
    requests: int = 32,
    suffix_tokens: int = 64,
    output_tokens: int = 32,
    seed: int = 0,
) -> Workload:
    """A burst of concurrent requests sharing one long prefix that lives only in the host tier,
    then the same burst again with the prefix in VRAM: a host tier that copies the prefix once per
    request instead of once loses much of the burst's throughput.

    One request computes the prefix (a `doc_tokens` document); unrelated filler documents (1.5x
    the KV cache) push it out of VRAM; then `requests` prompts = prefix + own suffix arrive at
    once ("burst from host"), then `requests` more ("burst in VRAM": the first burst left the
    prefix in the KV cache). Compare the two bursts' throughput within one config; with a host
    tier the prefix should cross PCIe once, not once per request.
    """
    rng = random.Random(seed)
    prefix = _tokens(rng, doc_tokens, vocab)
    fillers = max(2, math.ceil(1.5 * kv_tokens / doc_tokens))
    batches = [[Req(prefix + _tokens(rng, suffix_tokens, vocab), 1, "warm")]]
    batches += [[Req(_tokens(rng, doc_tokens, vocab), 1, "filler")] for _ in range(fillers)]
    for label in ("burst from host", "burst in VRAM"):
        batches.append(
            [Req(prefix + _tokens(rng, suffix_tokens, vocab), output_tokens, label) for _ in range(requests)]
        )
    return Workload(
        "burst",
        f"{requests} concurrent requests sharing a {doc_tokens}-token prefix (+{suffix_tokens} own tokens, "
        f"{output_tokens} output tokens): once with the prefix pushed out of VRAM by {fillers} filler "
        "documents, once with it in VRAM",
        batches,
        focus=["burst from host"],
        params={"prefix_tokens": doc_tokens, "requests": requests, "suffix_tokens": suffix_tokens,
                "output_tokens": output_tokens, "fillers": fillers, "kv_tokens": kv_tokens},
    )


def make(name: str, kv_tokens: int, doc_tokens: int, vocab: int, seed: int = 0) -> Workload:
    if name == "docqa":
        return docqa(kv_tokens, doc_tokens, vocab, seed=seed)
    if name == "chat":
        return chat(kv_tokens, vocab, seed=seed)
    if name == "sysprompt":
        return sysprompt(kv_tokens, vocab, seed=seed)
    if name == "noreuse":
        return noreuse(kv_tokens, vocab, seed=seed)
    if name == "fits":
        return fits(kv_tokens, doc_tokens, vocab, seed=seed)
    if name == "burst":
        return burst(kv_tokens, doc_tokens, vocab, seed=seed)
    raise ValueError(f"workload: expected one of {WORKLOADS}, got {name!r}")


WORKLOADS = ["docqa", "chat", "sysprompt", "noreuse", "fits", "burst"]
