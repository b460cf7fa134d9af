"""Multi-turn chat against an OpenAI-API server: many sessions, each turn extending the last.

Turn 1 of a session is `first_tokens` random token ids; every later turn is the whole history
(the previous prompt and its answer) plus `new_tokens` fresh ids, so a turn's prompt repeats the
previous turn's prompt and answer exactly. Sessions start in a random order and take turns
round-robin: `concurrency` workers each send the next turn of the session at the head of the
ready queue, which goes back to the tail when its answer is in. With more sessions than workers,
every session's history waits while the others take their turns, the case where a host tier
keeps histories that VRAM could not.

Prompts go as token ids and answers come back as token ids (`return_token_ids`, falling back to
the tokenizer on servers without it), so the histories are exact. TTFT is the time to the first
streamed token. The result has the keys of `vllm bench serve`'s JSON that `bench.serve` reads.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChatSpec:
    sessions: int
    turns: int
    first_tokens: int
    answer_tokens: int
    new_tokens: int

    def history_tokens(self) -> int:
        """Tokens of a session's last prompt and its answer: what its KV holds at the end."""
        later = (self.turns - 1) * (self.answer_tokens + self.new_tokens)
        return self.first_tokens + later + self.answer_tokens

    def working_set_tokens(self) -> int:
        return self.sessions * self.history_tokens()


@dataclass
class _Turn:
    session: int
    index: int
    start: float
    ttft: float | None = None
    e2el: float | None = None
    output_tokens: int = 0
    error: str | None = None


async def _send(session, url: str, model: str, prompt: list[int], max_tokens: int,
                turn: _Turn, decode) -> list[int]:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True,
    }
    ids: list[int] = []
    text: list[str] = []
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", ()):
                got = choice.get("token_ids") or []
                if (got or choice.get("text")) and turn.ttft is None:
                    turn.ttft = time.perf_counter() - turn.start
                ids.extend(got)
                text.append(choice.get("text") or "")
    turn.e2el = time.perf_counter() - turn.start
    if not ids:  # a server without return_token_ids: the tokenizer maps the text back exactly
        ids = decode("".join(text))
    turn.output_tokens = len(ids)
    return ids


async def run_chat(base_url: str, model: str, spec: ChatSpec, concurrency: int, vocab_size: int,
                   seed: int, tokenizer_path: str | None = None, timeout_s: float = 3600.0) -> dict:
    """Run every turn of every session; returns `vllm bench serve`-style metrics."""
    import aiohttp

    rng = np.random.default_rng(seed)
    # The last id is the tokenizer's "<unk>" (bench.models.write_tokenizer): never sent.
    def fresh(n: int) -> list[int]:
        return rng.integers(0, vocab_size - 1, size=n).tolist()

    histories = {s: fresh(spec.first_tokens) for s in range(spec.sessions)}
    next_turn = dict.fromkeys(histories, 0)
    order = list(histories)
    random.Random(seed).shuffle(order)
    ready = collections.deque(order)
    done: list[_Turn] = []
    tok = None

    def decode(text: str) -> list[int]:
        nonlocal tok
        if tok is None:
            from tokenizers import Tokenizer

            if tokenizer_path is None:
                raise RuntimeError("the server returned no token ids and no tokenizer was given")
            tok = Tokenizer.from_file(f"{tokenizer_path}/tokenizer.json")
        return tok.encode(text, add_special_tokens=False).ids

    wake = asyncio.Event()
    active = 0
    url = base_url.rstrip("/") + "/v1/completions"

    async def worker(session) -> None:
        nonlocal active
        while True:
            while not ready:
                if active == 0:
                    return
                wake.clear()
                await wake.wait()
            s = ready.popleft()
            active += 1
            turn = _Turn(s, next_turn[s], time.perf_counter())
            try:
                answer = await _send(session, url, model, histories[s], spec.answer_tokens, turn, decode)
                next_turn[s] += 1
                if next_turn[s] < spec.turns:
                    histories[s] = histories[s] + answer + fresh(spec.new_tokens)
                    ready.append(s)
            except Exception as e:  # a failed turn ends its session; counted, never hidden
                turn.error = repr(e)
            done.append(turn)
            active -= 1
            wake.set()

    t0 = time.perf_counter()
    limits = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=limits) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return summarize(done, time.perf_counter() - t0)


def summarize(turns: list[_Turn], duration: float) -> dict:
    ok = [t for t in turns if t.error is None and t.ttft is not None]
    ttft = np.array([t.ttft for t in ok]) * 1e3
    tpot = np.array([(t.e2el - t.ttft) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]) * 1e3
    e2el = np.array([t.e2el for t in ok]) * 1e3
    out = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(turns) - len(ok),
        "errors": [t.error for t in turns if t.error][:10],
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": sum(t.output_tokens for t in ok) / duration if duration > 0 else 0.0,
    }
    for name, arr in (("ttft", ttft), ("tpot", tpot), ("e2el", e2el)):
        if arr.size:
            out[f"mean_{name}_ms"] = float(arr.mean())
            out[f"median_{name}_ms"] = float(np.median(arr))
            for p in (90, 99):
                out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    # Turn 1 computes its prompt from scratch; later turns are the reuse a cache serves.
    by_turn = collections.defaultdict(list)
    for t in ok:
        by_turn[t.index].append(t.ttft * 1e3)
    out["median_ttft_ms_by_turn"] = {str(k): float(np.median(v)) for k, v in sorted(by_turn.items())}
    return out


def run(base_url: str, model: str, spec: ChatSpec, concurrency: int, vocab_size: int, seed: int,
        tokenizer_path: str | None = None, timeout_s: float = 3600.0) -> dict:
    return asyncio.run(run_chat(base_url, model, spec, concurrency, vocab_size, seed, tokenizer_path,
                                timeout_s))
