"""Scheduler-side bookkeeping of the host tier: which key lives in which slot, and in what state.

A slot is FREE, STORING (a copy into it is in flight; its key is not findable yet) or READY (its
key is in the PrefixIndex). READY slots may also be pinned by loads (a ref count); a pinned slot
is never evicted. Eviction takes READY, unpinned slots in the policy's order. After `clear()` (a
prefix-cache reset) nothing stored before it is ever served: in-flight stores are discarded on
completion and pinned slots are freed when their loads finish.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from triton_prefix_cache.index import PrefixIndex
from triton_prefix_cache.policy import make_policy

FREE, STORING, READY = 0, 1, 2


class HostTier:
    def __init__(self, num_slots: int, index_backend: str = "auto", eviction: str = "lru",
                 device: str | None = None) -> None:
        if device is None:
            device = "cuda" if (index_backend != "torch" and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(device)
        # On CUDA every index operation runs on this high-priority stream, never behind the forward
        # that the engine has queued on its own stream (async scheduling overlaps the two).
        self._stream: Any = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self.index = PrefixIndex(num_slots, device=self.device, backend=index_backend, stream=self._stream)
        self.num_slots = num_slots
        self.state = np.zeros(num_slots, dtype=np.int8)
        self.pins = np.zeros(num_slots, dtype=np.int32)
        self.discard = np.zeros(num_slots, dtype=bool)  # drop on completion (reset happened)
        self.slot_keys = torch.zeros((num_slots, 2), dtype=torch.int64)
        self.storing: dict[tuple[int, int], int] = {}
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives low slots first
        self.policy = make_policy(eviction)
        self.usable = num_slots
        self.evictions = 0
        if self._stream is not None:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the index kernels now, not inside the first request's lookup."""
        k = torch.tensor([[12345, 67890]], dtype=torch.int64)
        self._insert(k, np.zeros(1, dtype=np.int64))
        self._lookup(k)
        self._remove(k)
        torch.cuda.synchronize(self.device)

    def __len__(self) -> int:
        return len(self.index)

    # ---- index access on the index's own stream (never behind the engine's forward) ----------------
    def _lookup(self, keys: torch.Tensor) -> np.ndarray:
        if keys.shape[0] == 0:
            return np.zeros(0, dtype=np.int32)
        if self._stream is None:
            return self.index.lookup(keys).numpy()
        with torch.cuda.stream(self._stream):
            out = self.index.lookup(keys.to(self.device, non_blocking=True))
            return out.cpu().numpy()

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._stream is None else t.to(self.device, non_blocking=True)

    def _insert(self, keys: torch.Tensor, slots: np.ndarray) -> None:
        vals = torch.from_numpy(slots.astype(np.int32))
        if self._stream is None:
            self.index.insert(keys, vals)
            return
        with torch.cuda.stream(self._stream):
            self.index.insert(self._on_device(keys), self._on_device(vals))

    def _remove(self, keys: torch.Tensor) -> None:
        if keys.shape[0] == 0:
            return
        if self._stream is None:
            self.index.remove(keys)
            return
        with torch.cuda.stream(self._stream):
            self.index.remove(self._on_device(keys))

    # ---- queries ---------------------------------------------------------------------------------
    def match(self, keys: torch.Tensor) -> list[int]:
        """Slots of the leading run of `keys` that are READY (findable)."""
        vals = self._lookup(keys)
        miss = np.flatnonzero(vals < 0)
        n = int(miss[0]) if miss.size else vals.shape[0]
        return vals[:n].astype(np.int64).tolist()

    def present(self, keys: torch.Tensor) -> torch.Tensor:
        """Whether each key is READY or being stored (so storing it again is pointless)."""
        found = torch.from_numpy(self._lookup(keys) >= 0)
        if self.storing:
            k = keys.tolist()
            found |= torch.tensor([tuple(x) in self.storing for x in k], dtype=torch.bool)
        return found

    # ---- loads -----------------------------------------------------------------------------------
    def pin(self, slots: list[int]) -> None:
        s = np.asarray(slots, dtype=np.int64)
        assert (self.state[s] == READY).all(), "pinning a slot that is not READY"
        np.add.at(self.pins, s, 1)
        self.policy.touch(slots)

    def unpin(self, slots: list[int]) -> None:
        s = np.asarray(slots, dtype=np.int64)
        np.add.at(self.pins, s, -1)
        assert (self.pins[s] >= 0).all()
        for slot in s.tolist():
            if self.pins[slot] == 0 and self.discard[slot]:
                self._free_slot(slot)

    # ---- stores ----------------------------------------------------------------------------------
    def begin_store(self, keys: torch.Tensor) -> list[int]:
        """A slot per key (state STORING), evicting READY unpinned slots as needed; -1 where none is left."""
        n = keys.shape[0]
        out = [-1] * n
        klist = keys.tolist()
        need = n - len(self.free)
        if need > 0:
            victims = self.policy.victims(need, self._evictable)
            self._evict(victims)
        for i, k in enumerate(klist):
            t = (k[0], k[1])
            if t in self.storing or not self.free:
                continue
            slot = self.free.pop()
            out[i] = slot
            self.state[slot] = STORING
            self.slot_keys[slot] = keys[i]
            self.storing[t] = slot
        return out

    def end_store(self, slots: list[int], ok: bool) -> None:
        done = []
        for slot in slots:
            k = self.slot_keys[slot].tolist()
            self.storing.pop((k[0], k[1]), None)
            if not ok or self.discard[slot]:
                self._free_slot(slot)
            else:
                done.append(slot)
        if done:
            s = np.asarray(done, dtype=np.int64)
            self._insert(self.slot_keys[s], s)
            self.state[s] = READY
            self.policy.insert(done)

    # ---- eviction, reset ---------------------------------------------------------------------------
    def _evictable(self, slot: int) -> bool:
        return self.state[slot] == READY and self.pins[slot] == 0 and slot < self.usable

    def _evict(self, slots: list[int]) -> None:
        if not slots:
            return
        s = np.asarray(slots, dtype=np.int64)
        self._remove(self.slot_keys[s])
        self.policy.remove(slots)
        self.evictions += len(slots)
        for slot in slots:
            self.state[slot] = FREE
            self.free.append(slot)

    def _free_slot(self, slot: int) -> None:
        self.state[slot] = FREE
        self.discard[slot] = False
        if slot < self.usable:
            self.free.append(slot)

    def clear(self) -> bool:
        """Forget everything: nothing stored before this call is served after it."""
        ready = np.flatnonzero(self.state == READY)
        if ready.size:
            self._remove(self.slot_keys[torch.from_numpy(ready)])
            self.policy.remove(ready.tolist())
        for slot in ready.tolist():
            if self.pins[slot]:
                self.discard[slot] = True  # freed when its load finishes
                self.state[slot] = STORING  # neither findable nor evictable meanwhile
            else:
                self.state[slot] = FREE
                if slot < self.usable:
                    self.free.append(slot)
        for slot in self.storing.values():
            self.discard[slot] = True
        self.storing.clear()
        return True

    def limit(self, n: int) -> None:
        """Only slots below `n` exist (the worker's pool came out smaller than asked)."""
        n = max(0, min(n, self.num_slots))
        self.usable = n
        self.free = [s for s in self.free if s < n]
        gone = [s for s in range(n, self.num_slots) if self.state[s] == READY and self.pins[s] == 0]
        self._evict(gone)
        self.free = [s for s in self.free if s < n]

    def check(self) -> None:
        """Debug: the index holds exactly the READY slots' keys, each mapping to its slot."""
        ready = np.flatnonzero(self.state == READY)
        assert len(self.index) == ready.size, (len(self.index), ready.size)
        if ready.size:
            vals = self._lookup(self.slot_keys[torch.from_numpy(ready)])
            assert (vals == ready).all()
        assert len(set(self.free)) == len(self.free)
        assert all(self.state[s] == FREE for s in self.free)
