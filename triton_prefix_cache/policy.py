"""Eviction policies of the host tier: which resident slot goes when a store needs room.

A policy tracks the set of *resident* slots (those whose key is findable) and an order over them.
It never decides whether a slot may go: the TierManager passes an `evictable(slot)` predicate (a
slot being read or written is not evictable) and removes the victims itself. The interface takes
the keys at insert time so that policies with ghost lists (ARC, S3-FIFO) can remember evicted keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np


class EvictionPolicy(ABC):
    """Order over resident host slots. Invariant: the resident set is exactly what was inserted
    and not yet removed; `victims` never returns a slot outside it or one `evictable` rejects."""

    name: str = "base"

    @abstractmethod
    def insert(self, slots: Iterable[int], keys: np.ndarray | None = None) -> None:
        """New resident slots (a completed store), most recently used last. `keys` int64 (n, 2)."""

    @abstractmethod
    def touch(self, slots: Iterable[int]) -> None:
        """Resident slots were used (a hit, a load, a repeated store)."""

    @abstractmethod
    def remove(self, slots: Iterable[int]) -> None:
        """Slots stop being resident (evicted, removed, cleared). Unknown slots are ignored."""

    @abstractmethod
    def victims(self, n: int, evictable: Callable[[int], bool]) -> list[int]:
        """Up to n resident slots to evict, first victim first, each passing `evictable`.

        Does not remove them: the caller evicts and then calls `remove`.
        """

    @abstractmethod
    def __contains__(self, slot: int) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def clear(self) -> None: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first. O(1) insert/touch/remove per slot; `victims` walks from the
    cold end and skips slots that are not evictable (normally few: pinned slots were just used)."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def insert(self, slots: Iterable[int], keys: np.ndarray | None = None) -> None:
        for s in _ints(slots):
            self._order[s] = None
            self._order.move_to_end(s)

    def touch(self, slots: Iterable[int]) -> None:
        order = self._order
        for s in _ints(slots):
            if s in order:
                order.move_to_end(s)

    def remove(self, slots: Iterable[int]) -> None:
        for s in _ints(slots):
            self._order.pop(s, None)

    def victims(self, n: int, evictable: Callable[[int], bool]) -> list[int]:
        out: list[int] = []
        if n <= 0:
            return out
        for s in self._order:  # cold end first
            if evictable(s):
                out.append(s)
                if len(out) == n:
                    break
        return out

    def __contains__(self, slot: int) -> bool:
        return int(slot) in self._order

    def __len__(self) -> int:
        return len(self._order)

    def clear(self) -> None:
        self._order.clear()


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(policy: str | EvictionPolicy) -> EvictionPolicy:
    """A policy object from its name (one of POLICIES) or the object itself."""
    if isinstance(policy, EvictionPolicy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise ValueError(f"policy: expected one of {sorted(POLICIES)} or an EvictionPolicy, got {policy!r}")


def _ints(slots: Iterable[int]) -> list[int]:
    if isinstance(slots, np.ndarray):
        return slots.astype(np.int64, copy=False).ravel().tolist()
    return [int(s) for s in slots]
