"""MatchBatcher: one index launch answers the prefix lookups of every request waiting for room.

An engine's scheduler asks about one request at a time, and asks again, every step, about each
request still waiting for memory. On a device table each question is a kernel launch and a wait
for its answer; the batcher turns a scheduling pass's questions into one `match_prefix` over every
request it expects to be asked about (those asked before and not yet admitted) whose answer is
out of date, and answers the rest of the pass from that launch's results (on a Triton table; a
CPU table answers the request asked alone: see `MatchBatcher`). A request asked about
for the first time costs a launch of its own (the engine names its requests one at a time), but
the requests still waiting, asked again every step, are answered together.

An answer is reused only while the index is unchanged (its `version`) and only for the same key
range of the same request (its first block and length), so every answer equals what a lookup of
that request alone would give at that moment. The caller's contract: a request's keys for given
blocks never change (vLLM's block hashes chain over the tokens and are only appended to).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from .prefix_index import PrefixIndex


@dataclass
class _Expected:
    start: int  # the range's first block in its request
    keys: torch.Tensor  # int64 (n, 2), CPU: the range's keys
    answer: tuple[int, int, int] | None = None  # (version, n, count) of the last launch
    values: torch.Tensor | None = None  # int32: the values of the leading `count` keys (None: not read)


class MatchBatcher:
    """Prefix matches of many requests, one launch per index state. Keys are CPU tensors.

    batch: answer every expected request in each launch (default: on a Triton table, whose
    launches cost more than its probes), or only the request asked (the CPU table, whose probe of
    one request stops at its first miss and costs less than a batched match's fixed work: measured
    in `bench.sched_time`). Answers are reused at an unchanged index version either way."""

    def __init__(self, index: PrefixIndex, batch: bool | None = None) -> None:
        self.index = index
        self.batch = index.backend != "cpu" if batch is None else batch
        self._expected: dict[Hashable, _Expected] = {}
        self.launches = 0  # match_prefix calls made
        self.requests_probed = 0  # request ranges those calls answered

    def __len__(self) -> int:
        return len(self._expected)

    def match(self, rid: Hashable, start: int, keys: torch.Tensor) -> int:
        """How many leading keys of `keys` (request `rid`'s blocks from `start`) the index holds.
        `rid` is expected from now on: later launches probe its range too, until `forget(rid)`."""
        e = self._expected.get(rid)
        n = keys.shape[0]
        if e is None or e.start != start or e.keys.shape[0] != n:
            e = self._expected[rid] = _Expected(start, keys)
        if e.answer is None or e.answer[:2] != (self.index.version, n):
            self._launch(e)
        return e.answer[2]

    def values(self, rid: Hashable) -> torch.Tensor:
        """The values of the keys the last `match(rid, ...)` counted (int32, CPU)."""
        e = self._expected.get(rid)
        if e is None or e.answer is None:
            raise RuntimeError(f"values({rid!r}): no match of that request to read")
        if e.values is None:  # answered by a lone count: looked up on demand, at the same version
            if e.answer[0] != self.index.version:
                raise RuntimeError(f"values({rid!r}): the index changed since its match")
            e.values = self.index.lookup(e.keys[: e.answer[2]])
        return e.values

    def forget(self, rid: Hashable) -> None:
        """`rid` will not be asked about again (admitted or finished): later launches skip it."""
        self._expected.pop(rid, None)

    def clear(self) -> None:
        self._expected.clear()

    def _launch(self, asked: _Expected) -> None:
        """One match over every expected range not answered at the current version (with `batch`;
        else over the range asked alone)."""
        version = self.index.version
        stale = []
        for e in self._expected.values() if self.batch else (asked,):
            if e.answer is not None and e.answer[:2] == (version, e.keys.shape[0]):
                continue
            if e.keys.shape[0]:
                stale.append(e)
            else:
                e.answer, e.values = (version, 0, 0), e.keys.new_zeros(0, dtype=torch.int32)
        if not stale:
            return
        self.launches += 1
        self.requests_probed += len(stale)
        if len(stale) == 1:  # one request: the count alone (the CPU table's probe stops at the first miss)
            e = stale[0]
            e.answer, e.values = (version, e.keys.shape[0], self.index.count_leading(e.keys)), None
            return
        offsets = np.cumsum([0] + [e.keys.shape[0] for e in stale], dtype=np.int64)
        keys = torch.cat([e.keys for e in stale])
        counts, values = self.index.match_prefix(keys, torch.from_numpy(offsets))
        for e, lo, c in zip(stale, offsets.tolist(), counts.tolist()):
            e.answer = (version, e.keys.shape[0], c)
            e.values = values[lo : lo + c]
