"""The scheduler's view of the host tier: the core TierManager, driven on the index's own stream.

TierManager (triton_prefix_cache.tiers) keeps the bookkeeping: which key lives in which slot, in
what state (FREE / STORING / READY, readers pinning READY slots), eviction, and a PrefixIndex in
step with it (a key is findable only once its store completed). This wrapper adds what the vLLM
scheduler needs around it:
- on CUDA, every call runs on the index's high-priority stream with its keys and answers in mapped
  pinned memory, so index work is never ordered behind the forward the engine has queued on its
  own stream (async scheduling overlaps the scheduler with the forward; waiting for it would put
  the whole forward in the lookup) nor behind the KV copies on the copy engines;
- the index kernels are compiled at startup for the batch sizes Triton specializes on, not in the
  first request's lookup;
- the few calls the adapter makes, with the slot lists it keeps.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from triton_prefix_cache.index import MatchBatcher, PrefixIndex, resolve_backend
from triton_prefix_cache.tiers import TierManager


class HostTier:
    """The scheduler's host tier: `manager` (the core TierManager) keeps the bookkeeping; the
    methods below make their calls into it on the index's stream (on CUDA)."""

    def __init__(self, num_slots: int, slot_bytes: int = 0, index_backend: str = "auto",
                 eviction: str = "lru", device: str | None = None) -> None:
        # With no device given, the backend places the table: "auto" keeps it on the CPU (the
        # scheduler's lookups are a few hundred keys per request, and a device operation's launches
        # and wait cost more than the C probe: measured, docs/design.md "The index"); "triton"
        # puts it on the GPU.
        self.backend, self.device = resolve_backend(index_backend, device)
        cuda = self.device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        with self._on_stream():
            index = PrefixIndex(max(1, num_slots), device=self.device, backend=self.backend,
                                stream=self._stream)
            self.manager = TierManager(num_slots, slot_bytes, index=index, policy=eviction)
            #: the scheduler's per-request prefix lookups, one index launch per pass (`match_request`)
            self.batcher = MatchBatcher(index)
            if self._stream is not None:
                self._warm_up()

    def _on_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _warm_up(self) -> None:
        """The kernels the scheduler's calls launch, compiled now (inputs on the CPU, as theirs).
        Triton specializes on sizes (1, multiples of 16, others): one batch of each."""
        idx = self.manager.index
        for n in (1, 16, 17):
            k = torch.arange(2 * n, dtype=torch.int64).view(n, 2) + 12345
            idx.insert(k, torch.zeros(n, dtype=torch.int32))
            idx.lookup(k)
            idx.match_prefix(k, torch.tensor([0, n]))
            idx.count_leading(k)
            idx.remove(k)
        torch.cuda.synchronize(self.device)

    @property
    def num_slots(self) -> int:
        return self.manager.usable_slots

    @property
    def evictions(self) -> int:
        return self.manager.stats.evictions

    def __len__(self) -> int:
        return len(self.manager.index)

    # ---- lookups and loads -------------------------------------------------------------------------
    def match(self, keys: torch.Tensor) -> int:
        """How many leading keys are READY (findable). Pins nothing."""
        # Straight on the index (TierManager keeps it equal to the READY keys): on the CPU one C
        # loop that stops at the first miss, the fewest operations for the one request asked about.
        if keys.shape[0] == 0:
            return 0
        return self.manager.index.count_leading(keys)  # CPU keys: answered through mapped memory

    def match_request(self, req_id: str, start: int, keys: torch.Tensor) -> int:
        """`match` of request `req_id`'s blocks from `start`. On a device table answered with every
        other request asked about before and not yet `admitted`: one index launch serves them all
        while the index is unchanged (a scheduling pass asks about each waiting request in turn)."""
        return self.batcher.match(req_id, start, keys)

    def matched_slots(self, req_id: str) -> torch.Tensor:
        """The slots of the keys the last `match_request(req_id, ...)` counted (int32)."""
        return self.batcher.values(req_id)

    def admitted(self, req_id: str) -> None:
        """`req_id` is scheduled or gone: later passes do not look it up unasked."""
        self.batcher.forget(req_id)

    def ready(self, keys: torch.Tensor) -> np.ndarray:
        """bool (n,): keys READY (findable), in any order. Pins nothing."""
        with self._on_stream():
            return self.manager.lookup(keys) >= 0

    def holds(self, keys: torch.Tensor) -> np.ndarray:
        """bool (n,): keys with a host copy, complete or being written."""
        with self._on_stream():
            return self.manager.holds(keys)

    def pin(self, keys: torch.Tensor) -> list[int]:
        """Pin the slots of keys that `match` found (same scheduling pass: they are still READY)."""
        with self._on_stream():
            slots = self.manager.begin_load(keys, leading_only=True)
        if (slots < 0).any():  # cannot happen between match and pin; never load a missing block
            ok = slots[slots >= 0]
            with self._on_stream():
                self.manager.abort_load(ok)
            raise RuntimeError("host tier: a matched block vanished before its load was planned")
        return slots.tolist()

    def unpin(self, slots: list[int], ok: bool = True) -> None:
        with self._on_stream():
            done = self.manager.finish_load if ok else self.manager.abort_load
            done(np.asarray(slots, dtype=np.int64))

    def pin_slots(self, slots: list[int]) -> None:
        """Keep READY slots from eviction and reuse until `unpin_slots` (no load is counted)."""
        if len(slots):
            self.manager.pin(np.asarray(slots, dtype=np.int64))

    def unpin_slots(self, slots: list[int]) -> None:
        if len(slots):
            self.manager.unpin(np.asarray(slots, dtype=np.int64))

    # ---- stores ------------------------------------------------------------------------------------
    def begin_store(self, keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
        """(slot per key, -1 where nothing is to be copied; which keys the tier already holds;
        how many were dropped for lack of room)."""
        with self._on_stream():
            plan = self.manager.begin_store(keys)
        return np.where(plan.assigned, plan.slots, -1), plan.present, int(np.count_nonzero(plan.dropped))

    def end_store(self, slots: list[int], ok: bool, pin: bool = False) -> None:
        """The copies into these slots ended: publish them (ok) or free them. pin: publish them
        with a reader each (`unpin_slots` ends it), for a write of them on to the remote tier."""
        with self._on_stream():
            if ok:
                self.manager.finish_store(np.asarray(slots, dtype=np.int64), pin=pin)
            else:
                self.manager.abort_store(np.asarray(slots, dtype=np.int64))

    # ---- reset, shrink, checks ---------------------------------------------------------------------
    def clear(self) -> bool:
        """Forget every key: nothing stored before this call is served after it."""
        with self._on_stream():
            self.manager.clear()
        return True

    def limit(self, n: int) -> None:
        with self._on_stream():
            self.manager.limit(max(0, min(n, self.manager.usable_slots)))

    def check(self) -> None:
        with self._on_stream():
            self.manager.check_consistency()
