"""The CPU backend: the index's table in host memory, probed key by key in C, or in numpy.

Two probes over the same arrays: "c", sequential probe loops compiled on first use
(`cpu_table_c.py`), and "numpy", the same operations vectorized over the batch (one loop iteration
per probe round, never one per key), for machines where no C compiler works. The table is a pair
of torch CPU tensors with numpy views of the same memory: callers pass and get torch tensors, the
probes work on the views without a copy (numpy's per-call cost is a few microseconds where torch's
is tens, which decides small batches such as a scheduler's lookups).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..keys import EMPTY, FIRST_REAL, TOMBSTONE, home_slot, sanitize
from . import cpu_table_c
from .backend import Inserted

Probe = Literal["c", "numpy"]

#: Slots examined per key and probe round by the numpy probe. Linear-probing runs at load <= 0.5
#: are short, so most keys finish in the first window: few rounds of wide gathers beat many
#: rounds of narrow ones.
WINDOW = 4


class CpuTable:
    """A TableBackend in host memory. `probe`: "c", "numpy", or None for C where it builds, else
    numpy (an explicit "c" that cannot be built raises RuntimeError)."""

    name = "cpu"

    def __init__(
        self, num_slots: int, device: str | torch.device = "cpu", probe: Probe | None = None
    ) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"device: the CPU table lives in host memory, got {device}")
        if probe not in (None, "c", "numpy"):
            raise ValueError(f"probe: expected 'c', 'numpy' or None, got {probe!r}")
        if probe is None:
            probe = "c" if cpu_table_c.load() is not None else "numpy"
        elif probe == "c" and cpu_table_c.load() is None:
            raise RuntimeError("probe: the C probe could not be built here (see the log); use 'numpy'")
        self.probe: Probe = probe
        self.slot_keys = torch.empty((num_slots, 2), dtype=torch.int64)
        self.slot_values = torch.empty(num_slots, dtype=torch.int32)
        self._tk = self.slot_keys.numpy()
        self._tv = self.slot_values.numpy()
        self.reset()

    def __repr__(self) -> str:
        return f"CpuTable(slots={len(self._tk)}, probe={self.probe!r})"

    def reset(self) -> None:
        self._tk.fill(EMPTY)
        self._tv.fill(-1)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        k = keys.numpy()
        if self.probe == "c":
            return torch.from_numpy(cpu_table_c.lookup(self._tk, self._tv, k))
        return torch.from_numpy(_lookup_np(self._tk, self._tv, _sanitized(keys)))

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> Inserted:
        if keys.shape[0] == 0:
            return Inserted(torch.zeros(0, dtype=torch.bool), 0, 0)
        if self.probe == "c":
            new, reused = cpu_table_c.insert(self._tk, self._tv, keys.numpy(), values.numpy())
        else:
            new, reused = _insert_np(self._tk, self._tv, _sanitized(keys), values.numpy())
        return Inserted(torch.from_numpy(new), int(np.count_nonzero(new)), reused)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        if self.probe == "c":
            return torch.from_numpy(cpu_table_c.remove(self._tk, keys.numpy()))
        return torch.from_numpy(_remove_np(self._tk, _sanitized(keys)))

    def count_leading(self, keys: torch.Tensor) -> int:
        if self.probe == "c":  # stops at the first miss
            return cpu_table_c.leading(self._tk, keys.numpy())
        miss = np.flatnonzero(_lookup_np(self._tk, self._tv, _sanitized(keys)) < 0)
        return int(miss[0]) if miss.size else keys.shape[0]

    def match_prefix(self, keys: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.lookup(keys)
        return torch.from_numpy(_first_miss_np(values.numpy(), offsets.numpy())), values


def _sanitized(keys: torch.Tensor) -> np.ndarray:
    k = keys.numpy()
    return sanitize(keys).numpy() if (k[:, 0] < FIRST_REAL).any() else k


def _first_miss_np(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """counts[i] = number of leading values >= 0 in values[offsets[i]:offsets[i+1]]."""
    misses = np.append(np.flatnonzero(values < 0), len(values))  # a sentinel past the end
    first = misses[np.searchsorted(misses, offsets[:-1])]  # each request's first miss at or after its start
    return (np.minimum(first, offsets[1:]) - offsets[:-1]).astype(np.int32)


def _find_slots_np(tk: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Slot of each (sanitized) key, or -1: walk each probe sequence to the key or to an EMPTY."""
    n, mask = len(k), len(tk) - 1
    out = np.full(n, -1, dtype=np.int64)
    idx = np.arange(n)
    pos = home_slot(k, len(tk))
    w0, w1 = k[:, 0:1], k[:, 1:2]
    steps = np.arange(WINDOW)
    while idx.size:
        p = (pos[:, None] + steps) & mask
        s = tk[p]
        hit = (s[..., 0] == w0) & (s[..., 1] == w1)
        stop = hit | (s[..., 0] == EMPTY)
        stopped, j = stop.any(1), stop.argmax(1)
        rows = np.arange(idx.size)
        is_hit = stopped & hit[rows, j]
        out[idx[is_hit]] = p[rows, j][is_hit]
        go = ~stopped
        idx, pos, w0, w1 = idx[go], (pos[go] + WINDOW) & mask, w0[go], w1[go]
    return out


def _lookup_np(tk: np.ndarray, tv: np.ndarray, k: np.ndarray) -> np.ndarray:
    slots = _find_slots_np(tk, k)
    out = np.full(len(k), -1, dtype=np.int32)
    hit = slots >= 0
    out[hit] = tv[slots[hit]]
    return out


def _claim_np(tk: np.ndarray, k: np.ndarray, lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Give each absent key of `lanes` a slot: the first free (EMPTY or tombstone) one on its probe
    sequence. Lanes holding the same key end on one slot; where different keys want one slot the
    lowest lane wins. Returns (slot per lane, which lanes claimed, tombstones reused)."""
    mask = len(tk) - 1
    slots = np.full(lanes.size, -1, dtype=np.int64)
    claimed = np.zeros(lanes.size, dtype=bool)
    at = np.arange(lanes.size)  # ascending, so np.unique's first index is the lowest lane
    pos = home_slot(k[lanes], len(tk))
    w0, w1 = k[lanes, 0:1], k[lanes, 1:2]
    steps = np.arange(WINDOW)
    reused = 0
    while at.size:
        p = (pos[:, None] + steps) & mask
        s = tk[p]
        mine = (s[..., 0] == w0) & (s[..., 1] == w1)  # claimed by a lane with the same key
        free = (s[..., 0] == EMPTY) | (s[..., 0] == TOMBSTONE)
        stop = mine | free
        stopped, j = stop.any(1), stop.argmax(1)
        rows = np.arange(at.size)
        target = p[rows, j]
        is_mine = stopped & mine[rows, j]
        cand = np.flatnonzero(stopped & ~is_mine)
        won = np.zeros(at.size, dtype=bool)
        if cand.size:
            won[cand[np.unique(target[cand], return_index=True)[1]]] = True
        wpos = target[won]
        reused += int(np.count_nonzero(tk[wpos, 0] == TOMBSTONE))
        tk[wpos, 0] = w0[won, 0]
        tk[wpos, 1] = w1[won, 0]
        done = is_mine | won
        slots[at[done]] = target[done]
        claimed[at[won]] = True
        # Losers re-read their target next round (it may now hold their key); a window with no
        # stop moves on by a whole window.
        keep = ~done
        nxt = np.where(stopped, target, (pos + WINDOW) & mask)
        at, pos, w0, w1 = at[keep], nxt[keep], w0[keep], w1[keep]
    return slots, claimed, reused


def _insert_np(tk: np.ndarray, tv: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, int]:
    """Upsert a non-empty batch; returns (new flags, tombstones reused). Lanes are grouped by slot
    with one stable sort: the last occurrence's value wins, the first reports newness."""
    n = len(k)
    slots = _find_slots_np(tk, k)
    absent = np.flatnonzero(slots < 0)
    fresh = np.zeros(n, dtype=bool)
    reused = 0
    if absent.size:
        got, claimed, reused = _claim_np(tk, k, absent)
        slots[absent] = got
        fresh[absent[claimed]] = True
    order = np.argsort(slots, kind="stable")
    ss = slots[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], n] - 1
    tv[ss[starts]] = v[order[ends]]  # the last occurrence's value
    new = np.zeros(n, dtype=bool)
    new[order[starts][np.logical_or.reduceat(fresh[order], starts)]] = True  # at the first occurrence
    return new, reused


def _remove_np(tk: np.ndarray, k: np.ndarray) -> np.ndarray:
    slots = _find_slots_np(tk, k)
    found = np.flatnonzero(slots >= 0)
    removed = np.zeros(len(k), dtype=bool)
    if found.size:
        win = found[np.unique(slots[found], return_index=True)[1]]  # first occurrence per slot
        tk[slots[win], 0] = TOMBSTONE
        removed[win] = True
    return removed
