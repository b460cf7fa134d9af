"""TierManager: bookkeeping of the host tier, which key lives in which slot and in what state.

Pure bookkeeping, no bytes are copied here: the scheduler side asks for slots, the worker side
(a CopyEngine, maybe in another process) copies, and the scheduler reports back completion or
abort. Slot states:

    FREE     on the free list, no key.
    STORING  a demotion is writing it. Its key is NOT findable; it is never evicted or reused.
    READY    its copy completed and its key is in the PrefixIndex, mapped to this slot.
    LOADING  (reported by `slot_state`, not stored) READY with readers: promotions reading it, or
             writes of it on to another tier (`pin`). Never evicted or reused while readers remain.

A key removed (`remove`, `clear`) while its slot is in flight is *retired*: unfindable at once,
the slot freed when its last reader or its writer finishes. Invariants, checked by
`check_consistency()`: the index holds exactly the READY, non-retired keys, each with its slot;
the free list is exactly the FREE slots, once each; readers only on READY slots; no key is in two
non-retired slots; the eviction policy tracks exactly the READY, non-retired slots; the keys in
flight (`_inflight`, found by hashing on every store planned) are exactly those of the STORING,
non-retired slots.
Not thread-safe: one scheduler drives it. Keys are int64 (n, 2) (tensor or array); every call
touching the index is one batched index operation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from .index import PrefixIndex
from .keys import FIRST_REAL
from .policy import EvictionPolicy, make_policy
from .stats import TierStats


class SlotState(enum.IntEnum):
    FREE = 0
    STORING = 1
    READY = 2
    LOADING = 3  # derived: READY with readers


class StoreStatus(enum.IntEnum):
    """Why a key of `begin_store` did or did not get a slot."""

    ASSIGNED = 0  # got a slot: copy the block there, then finish_store or abort_store
    PRESENT = 1  # already READY in the host tier (inclusive tier: nothing to copy)
    IN_FLIGHT = 2  # another store of this key is in progress
    DUPLICATE = 3  # an earlier occurrence in the same batch got it
    DROPPED = 4  # no slot could be freed (every slot in flight or being read)


# The states as plain ints for the numpy arrays: comparing an array with an enum member makes numpy
# probe the member's attributes on every operation, and a scheduling step makes dozens of them.
_FREE, _STORING, _READY = int(SlotState.FREE), int(SlotState.STORING), int(SlotState.READY)
_ASSIGNED, _PRESENT, _IN_FLIGHT, _DUPLICATE, _DROPPED = (int(s) for s in StoreStatus)


@dataclass
class StorePlan:
    """Result of `begin_store`: per key, the slot to copy into (-1 if none) and why."""

    slots: np.ndarray  # int64 (n,)
    status: np.ndarray  # int8 (n,), StoreStatus values
    evicted: int  # slots evicted to make room

    @property
    def assigned(self) -> np.ndarray:
        return self.status == _ASSIGNED

    @property
    def present(self) -> np.ndarray:
        """Keys already READY in the host tier (nothing to copy)."""
        return self.status == _PRESENT

    @property
    def dropped(self) -> np.ndarray:
        """Keys that got no slot: every slot was in flight or being read."""
        return self.status == _DROPPED


class TierManager:
    """See the module docstring. `num_slots` and `slot_bytes` describe the HostPool it manages."""

    def __init__(
        self,
        num_slots: int,
        slot_bytes: int = 0,
        *,
        index: PrefixIndex | None = None,
        policy: str | EvictionPolicy = "lru",
        index_device: str | torch.device = "cpu",
        index_backend: str = "auto",
    ) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots: expected an int >= 0, got {num_slots!r}")
        if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 0:
            raise ValueError(f"slot_bytes: expected an int >= 0, got {slot_bytes!r}")
        if index is None:
            index = PrefixIndex(max(1, num_slots), device=index_device, backend=index_backend)
        elif index.capacity < num_slots:
            raise ValueError(f"index: capacity {index.capacity} < num_slots {num_slots}")
        elif len(index):
            raise ValueError(f"index: must start empty, holds {len(index)} keys")
        self.index = index
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.policy = make_policy(policy)
        self.stats = TierStats()
        self._state = np.zeros(num_slots, dtype=np.int8)
        self._readers = np.zeros(num_slots, dtype=np.int32)
        self._retired = np.zeros(num_slots, dtype=bool)
        self._keys = np.zeros((num_slots, 2), dtype=np.int64)
        self._free = np.arange(num_slots - 1, -1, -1, dtype=np.int64)  # a stack; slot 0 pops first
        self._nfree = num_slots
        self._usable = num_slots  # slots at or past this were withdrawn by `limit`
        #: key (two ints) -> its slot, for the STORING slots not retired: a key in flight is found
        #: by hashing, never by a scan of every slot (stores are asked about every step)
        self._inflight: dict[tuple[int, int], int] = {}

    # ---- queries ----------------------------------------------------------------------------------
    def lookup(self, keys) -> np.ndarray:
        """int64 (n,): each key's READY slot, or -1. Pins nothing."""
        k = self._keys_np(keys)
        if len(k) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.index.lookup(self._dev(k)).cpu().numpy().astype(np.int64)

    def match_prefix(self, keys, offsets=None, record: bool = True) -> np.ndarray:
        """int64 (r,): per request, how many leading keys are READY in the host tier.

        keys: int64 (n, 2), the requests' keys back to back; offsets: (r+1,) boundaries (default:
        one request). record: count into stats (lookups, lookup_blocks, hit_blocks).
        """
        k = self._keys_np(keys)
        off = np.array([0, len(k)], dtype=np.int64) if offsets is None else _offsets(offsets, len(k))
        if len(k) == 0:
            return np.zeros(len(off) - 1, dtype=np.int64)
        counts = self.index.match_prefix(self._dev(k), self._dev(off))[0].cpu().numpy().astype(np.int64)
        if record:
            self.stats.lookups += len(counts)
            self.stats.lookup_blocks += len(k)
            self.stats.hit_blocks += int(counts.sum())
        return counts

    def slot_state(self, slot: int) -> SlotState:
        s = self._slot(slot)
        if self._state[s] == _READY and self._readers[s] > 0:
            return SlotState.LOADING
        return SlotState(int(self._state[s]))

    def key_states(self, keys) -> list[SlotState | None]:
        """Per key, the state of the slot holding it (FREE slots excluded), or None where no slot
        does. For diagnostics (why a lookup stopped where it did). A findable key's slot comes
        from the index; the others are looked for among the slots the index does not hold
        (STORING or retired ones), never among every slot."""
        k = self._keys_np(keys)
        if len(k) == 0:
            return []
        found = self.index.lookup(self._dev(k)).cpu().numpy()
        unindexed = np.flatnonzero((self._state != _FREE) & ((self._state != _READY) | self._retired))
        out: list[SlotState | None] = []
        for (k0, k1), slot in zip(k.tolist(), found.tolist()):
            if slot < 0 and len(unindexed):
                cand = self._keys[unindexed]
                hit = unindexed[(cand[:, 0] == k0) & (cand[:, 1] == k1)]
                slot = int(hit[0]) if len(hit) else -1
            out.append(self.slot_state(slot) if slot >= 0 else None)
        return out

    def holds(self, keys) -> np.ndarray:
        """bool (n,): keys READY or STORING (retired ones excluded): a copy exists or is on its way."""
        k = self._keys_np(keys)
        if len(k) == 0:
            return np.zeros(0, dtype=bool)
        held = self.index.lookup(self._dev(k)).cpu().numpy() >= 0
        if self._inflight:
            held |= self._in_flight(k)
        return held

    def readers_of(self, slots) -> np.ndarray:
        """int32 (n,): loads in progress reading each slot."""
        return self._readers[_as_slots(slots, self.num_slots, "readers_of")].copy()

    @property
    def num_free(self) -> int:
        return self._nfree

    def snapshot(self) -> TierStats:
        """The stats with their gauges brought up to date."""
        st = self._state
        self.stats.free_slots = self._nfree
        self.stats.storing_slots = int(np.count_nonzero(st == _STORING))
        self.stats.ready_slots = int(np.count_nonzero((st == _READY) & ~self._retired))
        self.stats.loading_slots = int(np.count_nonzero(self._readers))
        return self.stats

    # ---- stores (demotion) ------------------------------------------------------------------------
    def begin_store(self, keys) -> StorePlan:
        """Give each new key a slot in state STORING (evicting by the policy if needed).

        Keys already READY are touched and skipped, keys in flight or repeated are skipped; when no
        slot can be freed, the remaining keys (in batch order) are dropped and counted.
        """
        k = self._keys_np(keys)
        n = len(k)
        slots = np.full(n, -1, dtype=np.int64)
        status = np.full(n, _ASSIGNED, dtype=np.int8)
        if n == 0:
            return StorePlan(slots, status, 0)
        kv = _void(k)
        first = np.unique(kv, return_index=True)[1]
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        status[dup] = _DUPLICATE
        found = self.index.lookup(self._dev(k)).cpu().numpy()
        present = (found >= 0) & ~dup
        status[present] = _PRESENT
        if present.any():
            self.policy.touch(found[present])
        if self._inflight:
            status[self._in_flight(k) & (status == _ASSIGNED)] = _IN_FLIGHT
        want = np.flatnonzero(status == _ASSIGNED)
        need = len(want) - self._nfree
        # Never evict a block this very batch found present (it was just touched, but a small pool...).
        evicted = self._evict(need, protect=set(found[present].tolist())) if need > 0 else 0
        take = min(len(want), self._nfree)
        got = self._pop_free(take)
        slots[want[:take]] = got
        status[want[take:]] = _DROPPED
        self._state[got] = _STORING
        self._keys[got] = k[want[:take]]
        self._inflight.update(zip(map(tuple, k[want[:take]].tolist()), got.tolist()))
        self.stats.stores_started += take
        self.stats.store_skipped_present += int(present.sum())
        self.stats.store_skipped_in_flight += int(
            np.count_nonzero(status == _IN_FLIGHT) + dup.sum()
        )
        self.stats.drops_full += len(want) - take
        return StorePlan(slots, status, evicted)

    def finish_store(self, slots, pin: bool = False) -> None:
        """The copies into these STORING slots completed: publish their keys (READY, findable).

        pin: each slot also gets a reader (end it with `unpin`) in the same call, so that a reader
        that starts with the copy's end (a write of the slot on to another tier) never meets it
        evicted or reused. A retired slot then stays held, READY and unfindable, until that
        reader ends; without `pin` it is freed at once."""
        s = self._slots_np(slots, _STORING, "finish_store")
        if len(s) == 0:
            return
        retired = self._retired[s]
        pub = s[~retired]
        if len(pub):
            self.index.insert(self._dev(self._keys[pub]), self._dev(pub.astype(np.int32)))
            self._forget_inflight(pub)  # after the insert: one that raised leaves them in flight
            self._state[pub] = _READY
            self.policy.insert(pub, self._keys[pub])
        if pin:
            self._state[s[retired]] = _READY
            self._readers[s] += 1
        else:
            self._release(s[retired])
        self.stats.stores_completed += len(s)
        self.stats.blocks_to_host += len(s)
        self.stats.bytes_to_host += len(s) * self.slot_bytes

    def abort_store(self, slots) -> None:
        """The copies into these STORING slots will not complete: free them, publish nothing."""
        s = self._slots_np(slots, _STORING, "abort_store")
        self._forget_inflight(s[~self._retired[s]])
        self._release(s)
        self.stats.stores_aborted += len(s)

    # ---- loads (promotion) ------------------------------------------------------------------------
    def begin_load(self, keys, leading_only: bool = False) -> np.ndarray:
        """Pin the READY slots of these keys for reading; int64 (n,) slots, -1 where absent.

        leading_only: pin only the leading run of present keys (a prefix hit); later keys get -1.
        Each pinned slot must later get exactly one finish_load or abort_load.
        """
        found = self.lookup(keys)
        if leading_only and len(found):
            miss = np.flatnonzero(found < 0)
            if len(miss):
                found[miss[0] :] = -1
        s = found[found >= 0]
        np.add.at(self._readers, s, 1)
        self.policy.touch(s)
        self.stats.loads_started += len(s)
        return found

    def pin(self, slots) -> None:
        """Add a reader to each of these READY slots (not a load: no load is counted), so that they
        are neither evicted nor reused until `unpin`. A slot listed twice gets two readers."""
        s = _as_slots(slots, self.num_slots, "pin")
        wrong = s[self._state[s] != _READY]
        if len(wrong):
            raise ValueError(f"pin: slots {wrong[:8].tolist()} are not READY")
        np.add.at(self._readers, s, 1)

    def unpin(self, slots) -> None:
        """End readers that `pin` or `finish_store(pin=True)` added (a retired slot whose last
        reader ends is freed)."""
        self._unpin(slots, "unpin")

    def finish_load(self, slots) -> None:
        """The promotions reading these slots completed: unpin."""
        s = self._unpin(slots, "finish_load")
        self.stats.loads_completed += len(s)
        self.stats.blocks_from_host += len(s)
        self.stats.bytes_from_host += len(s) * self.slot_bytes

    def abort_load(self, slots) -> None:
        """The promotions reading these slots were cancelled: unpin (the host copy stays valid)."""
        s = self._unpin(slots, "abort_load")
        self.stats.loads_aborted += len(s)

    # ---- removal ------------------------------------------------------------------------------------
    def remove(self, keys) -> np.ndarray:
        """Make these keys unfindable at once; bool (n,) which were present or in flight.

        Idle slots are freed now, slots in flight when their reader or writer finishes.
        """
        k = self._keys_np(keys)
        if len(k) == 0:
            return np.zeros(0, dtype=bool)
        found = self.lookup(k)
        ready = np.unique(found[found >= 0])
        hit = found >= 0
        if self._inflight:
            batch = list(map(tuple, k.tolist()))
            w = np.array([self._inflight.get(key, -1) for key in batch], dtype=np.int64)
            hit |= w >= 0
            for key in batch:
                self._inflight.pop(key, None)
            self._retired[w[w >= 0]] = True
        if len(ready):
            self.index.remove(self._dev(self._keys[ready]))
            self._retire_ready(ready)
        return hit

    def clear(self) -> None:
        """Forget every key (e.g. the engine's reset_prefix_cache): in-flight slots are retired."""
        ready = np.flatnonzero((self._state == _READY) & ~self._retired)
        self.index.clear()
        self._retire_ready(ready)
        self._retired[self._state == _STORING] = True
        self._inflight.clear()

    def limit(self, num_slots: int) -> None:
        """Withdraw the slots from `num_slots` on (the pool came out smaller than planned, e.g.
        pinning failed part way). Idle ones go now; ones in flight when their copy ends."""
        if (
            isinstance(num_slots, bool)
            or not isinstance(num_slots, int)
            or not 0 <= num_slots <= self._usable
        ):
            raise ValueError(f"num_slots: expected an int in [0, {self._usable}], got {num_slots!r}")
        self._usable = num_slots
        free = self._free[: self._nfree]
        keep = free[free < num_slots]
        self._free[: len(keep)] = keep
        self._nfree = len(keep)
        gone = np.arange(num_slots, self.num_slots)
        ready = gone[(self._state[gone] == _READY) & ~self._retired[gone]]
        if len(ready):
            self.index.remove(self._dev(self._keys[ready]))
            self._retire_ready(ready)
        writing = gone[(self._state[gone] == _STORING) & ~self._retired[gone]]
        self._forget_inflight(writing)
        self._retired[writing] = True

    @property
    def usable_slots(self) -> int:
        return self._usable

    # ---- checks -------------------------------------------------------------------------------------
    def check_consistency(self) -> None:
        """Raise AssertionError unless the index, the slot table and the policy agree (tests, debug)."""
        st, rd, ret = self._state, self._readers, self._retired
        bad = []
        if np.any((st < _FREE) | (st > _READY)):
            bad.append("slot state out of range")
        free = self._free[: self._nfree]
        if len(np.unique(free)) != len(free):
            bad.append("a slot is twice on the free list")
        free_usable = np.flatnonzero(st == _FREE)
        if not np.array_equal(np.sort(free), free_usable[free_usable < self._usable]):
            bad.append("free list != FREE slots")
        withdrawn = np.arange(self._usable, self.num_slots)
        if np.any((st[withdrawn] != _FREE) & ~ret[withdrawn]):
            bad.append("a withdrawn slot is in use without being retired")
        if np.any(rd < 0) or np.any((rd > 0) & (st != _READY)):
            bad.append("readers on a slot that is not READY")
        if np.any(ret & (st == _FREE)):
            bad.append("a FREE slot is marked retired")
        live = np.flatnonzero((st == _READY) & ~ret)
        if len(self.index) != len(live):
            bad.append(f"index holds {len(self.index)} keys, {len(live)} slots are READY")
        if len(live) and not np.array_equal(self.lookup(self._keys[live]), live):
            bad.append("a READY key does not map to its slot in the index")
        gone = np.flatnonzero((st == _READY) & ret)
        if len(gone) and np.any(self.lookup(self._keys[gone]) == gone):
            bad.append("a retired key is still findable at its slot")
        storing = np.flatnonzero((st == _STORING) & ~ret)
        if len(storing) and np.any(self.lookup(self._keys[storing]) >= 0):
            bad.append("a key being stored is findable")
        if self._inflight != dict(zip(map(tuple, self._keys[storing].tolist()), storing.tolist())):
            bad.append("the keys in flight are not those of the STORING slots")
        held = np.concatenate([live, storing])
        if len(np.unique(_void(self._keys[held]))) != len(held):
            bad.append("a key is in two slots")
        if len(self.policy) != len(live) or not all(int(s) in self.policy for s in live):
            bad.append("eviction policy does not track exactly the READY slots")
        if bad:
            raise AssertionError("TierManager inconsistent: " + "; ".join(bad))

    # ---- internals ----------------------------------------------------------------------------------
    def _keys_np(self, keys) -> np.ndarray:
        t = keys if isinstance(keys, torch.Tensor) else torch.from_numpy(np.asarray(keys, dtype=np.int64))
        if t.numel() == 0 and t.dtype == torch.int64:
            return np.zeros((0, 2), dtype=np.int64)
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape[1] != 2:
            raise ValueError(f"keys: expected int64 (n, 2), got {t.dtype} {tuple(t.shape)}")
        k = np.ascontiguousarray(t.detach().cpu().numpy())
        bad = k[:, 0] < FIRST_REAL  # `keys.sanitize` in numpy: a few microseconds, not tens
        if bad.any():
            k = k.copy()
            k[bad, 0] = FIRST_REAL
        return k

    def _dev(self, a: np.ndarray) -> torch.Tensor:
        """The index's input: a CPU tensor, which a CUDA index reads through mapped memory and
        answers on the CPU (never a copy-engine transfer that would queue behind KV copies)."""
        return torch.from_numpy(np.ascontiguousarray(a))

    def _slot(self, slot: int) -> int:
        s = int(slot)
        if not 0 <= s < self.num_slots:
            raise ValueError(f"slot: {slot} outside [0, {self.num_slots})")
        return s

    def _slots_np(self, slots, want: int, what: str) -> np.ndarray:
        s = _as_slots(slots, self.num_slots, what)
        if len(np.unique(s)) != len(s):
            raise ValueError(f"{what}: a slot is listed twice")
        wrong = s[self._state[s] != want]
        if len(wrong):
            raise ValueError(f"{what}: slots {wrong[:8].tolist()} are not {SlotState(want).name}")
        return s

    def _unpin(self, slots, what: str) -> np.ndarray:
        s = _as_slots(slots, self.num_slots, what)
        u, c = np.unique(s, return_counts=True)
        short = u[self._readers[u] < c]
        if len(short):
            raise ValueError(f"{what}: slots {short[:8].tolist()} have no load in progress to end")
        np.add.at(self._readers, s, -1)
        done = u[(self._readers[u] == 0) & self._retired[u]]
        self._release(done)
        return s

    def _in_flight(self, k: np.ndarray) -> np.ndarray:
        """bool (n,): keys a store (not retired) is writing now."""
        inflight = self._inflight
        return np.fromiter((key in inflight for key in map(tuple, k.tolist())), dtype=bool, count=len(k))

    def _forget_inflight(self, s: np.ndarray) -> None:
        """These STORING slots (not retired) stop being in flight: their keys leave `_inflight`."""
        for key in map(tuple, self._keys[s].tolist()):
            del self._inflight[key]

    def _retire_ready(self, ready: np.ndarray) -> None:
        """READY slots whose keys just left the index: free the idle ones, retire the read ones."""
        if len(ready) == 0:
            return
        self.policy.remove(ready)
        busy = self._readers[ready] > 0
        self._retired[ready[busy]] = True
        self._release(ready[~busy])

    def _release(self, s: np.ndarray) -> None:
        if len(s) == 0:
            return
        self._state[s] = _FREE
        self._retired[s] = False
        s = s[s < self._usable]  # withdrawn slots never return to the free list
        self._free[self._nfree : self._nfree + len(s)] = s
        self._nfree += len(s)

    def _pop_free(self, n: int) -> np.ndarray:
        out = self._free[self._nfree - n : self._nfree][::-1].copy()
        self._nfree -= n
        return out

    def _evict(self, need: int, protect: set[int] | frozenset[int] = frozenset()) -> int:
        st, rd, ret = self._state, self._readers, self._retired

        def evictable(s: int) -> bool:
            return st[s] == _READY and rd[s] == 0 and not ret[s] and s not in protect

        victims = np.array(self.policy.victims(need, evictable), dtype=np.int64)
        if len(victims) == 0:
            return 0
        self.index.remove(self._dev(self._keys[victims]))
        self.policy.remove(victims)
        self._release(victims)
        self.stats.evictions += len(victims)
        return len(victims)


def _void(k: np.ndarray) -> np.ndarray:
    """One opaque 16-byte item per key, for np.unique / np.isin over 128-bit keys."""
    return np.ascontiguousarray(k, dtype=np.int64).view(np.dtype((np.void, 16))).ravel()


def _as_slots(slots, limit: int, what: str) -> np.ndarray:
    a = slots.detach().cpu().numpy() if isinstance(slots, torch.Tensor) else np.asarray(slots)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected a 1-D array of slot ids, got {a.dtype} {a.shape}")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= limit:
        raise ValueError(f"{what}: slot ids must lie in [0, {limit}), got {a.min()}..{a.max()}")
    return a


def _offsets(offsets, n: int) -> np.ndarray:
    a = offsets.detach().cpu().numpy() if isinstance(offsets, torch.Tensor) else np.asarray(offsets)
    a = a.astype(np.int64)
    if a.ndim != 1 or len(a) < 1 or a[0] != 0 or a[-1] != n or np.any(np.diff(a) < 0):
        raise ValueError(f"offsets: expected non-decreasing (r+1,) from 0 to {n}, got {a.tolist()}")
    return a
