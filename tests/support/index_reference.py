"""The index's test oracle: every table operation in plain torch, on any device, as a TableBackend.

The tests compare the Triton kernels and the CPU table against these functions, and run PrefixIndex
over `ReferenceTable` to check them against a Python dict; bench/kernels.py times them on CUDA as
the baseline. They work on the layout every backend shares (keys int64 [S, 2], values int32 [S],
open addressing with linear probing from `keys.home_slot`) and are vectorized over the batch: one
loop iteration per probe step, never one per key.
"""

from __future__ import annotations

import torch

from triton_prefix_cache.index import Inserted
from triton_prefix_cache.keys import EMPTY, TOMBSTONE, home_slot, sanitize

#: Slots examined per key and probe round: runs at load <= 0.5 are short, so most keys finish in
#: the first window.
WINDOW = 4
_I32_MAX = 2**31 - 1


def _first_true(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, index of the first True) along the last axis."""
    return m.any(1), m.to(torch.uint8).argmax(1)


def find_slots(tkeys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Slot of each (sanitized) key, or -1: walk each probe sequence to the key or to an EMPTY."""
    n, mask = keys.shape[0], tkeys.shape[0] - 1
    out = torch.full((n,), -1, dtype=torch.int64, device=keys.device)
    idx = torch.arange(n, device=keys.device)
    pos = home_slot(keys, tkeys.shape[0])
    w0, w1 = keys[:, :1], keys[:, 1:]
    steps = torch.arange(WINDOW, device=keys.device)
    while idx.numel():
        p = (pos[:, None] + steps) & mask
        s = tkeys[p]
        hit = (s[..., 0] == w0) & (s[..., 1] == w1)
        stopped, j = _first_true(hit | (s[..., 0] == EMPTY))
        rows = torch.arange(idx.numel(), device=keys.device)
        is_hit = hit[rows, j] & stopped
        out[idx[is_hit]] = p[rows, j][is_hit]
        go_on = ~stopped
        idx, pos, w0, w1 = idx[go_on], (pos[go_on] + WINDOW) & mask, w0[go_on], w1[go_on]
    return out


def lookup(tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Value of each key, or -1."""
    slots = find_slots(tkeys, sanitize(keys))
    out = torch.full((keys.shape[0],), -1, dtype=torch.int32, device=keys.device)
    hit = slots >= 0
    out[hit] = tvals[slots[hit]]
    return out


def _claim(
    tkeys: torch.Tensor, keys: torch.Tensor, lanes: torch.Tensor, first: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Give each absent key of `lanes` a slot: the first free (EMPTY or tombstone) one on its probe
    sequence. Lanes holding the same key end on one slot; where different keys want one slot the
    lowest lane wins (resolved in the `first` scratch, which is left as found). Returns
    (slot per lane, which lanes claimed, tombstones reused)."""
    mask = tkeys.shape[0] - 1
    dev = keys.device
    slots = torch.full((lanes.numel(),), -1, dtype=torch.int64, device=dev)
    claimed = torch.zeros(lanes.numel(), dtype=torch.bool, device=dev)
    at = torch.arange(lanes.numel(), device=dev)  # positions into `slots`
    pos = home_slot(keys[lanes], tkeys.shape[0])
    w0, w1 = keys[lanes, :1], keys[lanes, 1:]
    steps = torch.arange(WINDOW, device=dev)
    reused = 0
    while at.numel():
        p = (pos[:, None] + steps) & mask
        s = tkeys[p]
        mine = (s[..., 0] == w0) & (s[..., 1] == w1)  # claimed by a lane with the same key
        free = (s[..., 0] == EMPTY) | (s[..., 0] == TOMBSTONE)
        stopped, j = _first_true(mine | free)
        rows = torch.arange(at.numel(), device=dev)
        target = p[rows, j]
        is_mine = stopped & mine[rows, j]
        cand = stopped & ~is_mine
        lane_ids = lanes[at].to(torch.int32)
        cpos, cl = target[cand], lane_ids[cand]
        first.scatter_reduce_(0, cpos, cl, reduce="amin")
        won = torch.zeros_like(cand)
        won[cand] = first[cpos] == cl
        first[cpos] = _I32_MAX
        wpos = target[won]
        reused += int((tkeys[wpos, 0] == TOMBSTONE).sum())
        tkeys[wpos, 0] = w0[won, 0]
        tkeys[wpos, 1] = w1[won, 0]
        done = is_mine | won
        slots[at[done]] = target[done]
        claimed[at[won]] = True
        # Losers re-read their target next round (it may now hold their key); a window with no
        # stop moves on by a whole window.
        keep = ~done
        nxt = torch.where(stopped, target, (pos + WINDOW) & mask)
        at, pos, w0, w1 = at[keep], nxt[keep], w0[keep], w1[keep]
    return slots, claimed, reused


def insert(
    tkeys: torch.Tensor,
    tvals: torch.Tensor,
    first: torch.Tensor,
    last: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Upsert; returns (new flags, tombstones reused).

    A key repeated in the batch takes the value of its last occurrence and is reported new (if it
    was absent) at its first occurrence only, as a sequential dict would do. `first` (int32, filled
    with INT32_MAX) and `last` (int32, filled with -1) are per-slot scratch, left as found.
    """
    keys = sanitize(keys)
    n = keys.shape[0]
    dev = keys.device
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev), 0
    slots = find_slots(tkeys, keys)
    absent = (slots < 0).nonzero().squeeze(1)
    fresh = torch.zeros(n, dtype=torch.bool, device=dev)
    reused = 0
    if absent.numel():
        got, claimed, reused = _claim(tkeys, keys, absent, first)
        slots[absent] = got
        fresh[absent[claimed]] = True
    lane = torch.arange(n, dtype=torch.int32, device=dev)
    first.scatter_reduce_(0, slots, lane, reduce="amin")
    last.scatter_reduce_(0, slots, lane, reduce="amax")
    is_first = first[slots] == lane
    is_last = last[slots] == lane
    tvals[slots[is_last]] = values[is_last]
    # The slot was claimed in this call by some lane; report it at the key's first occurrence.
    slot_fresh = torch.zeros(n, dtype=torch.bool, device=dev)
    slot_fresh[first[slots[fresh]].long()] = True
    new = is_first & slot_fresh
    first[slots] = _I32_MAX
    last[slots] = -1
    return new, reused


def remove(tkeys: torch.Tensor, first: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Tombstone each present key; for a key repeated in the batch only the first occurrence is True."""
    keys = sanitize(keys)
    n = keys.shape[0]
    removed = torch.zeros(n, dtype=torch.bool, device=keys.device)
    if n == 0:
        return removed
    slots = find_slots(tkeys, keys)
    found = (slots >= 0).nonzero().squeeze(1)
    fs, lane = slots[found], found.to(torch.int32)
    first.scatter_reduce_(0, fs, lane, reduce="amin")
    win = first[fs] == lane
    first[fs] = _I32_MAX
    tkeys[fs[win], 0] = TOMBSTONE
    removed[found[win]] = True
    return removed


def count_leading(tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor) -> int:
    """How many leading keys are present."""
    miss = torch.nonzero(lookup(tkeys, tvals, keys) < 0)
    return int(miss[0, 0]) if miss.numel() else keys.shape[0]


def segment_first_miss(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """counts[i] = number of leading values >= 0 in values[offsets[i]:offsets[i+1]]."""
    r = offsets.shape[0] - 1
    n = values.shape[0]
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(r, device=values.device), lengths, output_size=n)
    pos = torch.arange(n, device=values.device)
    first_miss = offsets[1:].clone()
    miss = values < 0
    first_miss.scatter_reduce_(0, seg[miss], pos[miss], reduce="amin")
    return (first_miss - offsets[:-1]).to(torch.int32)


def match_prefix(
    tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    values = lookup(tkeys, tvals, keys)
    return segment_first_miss(values, offsets), values


class ReferenceTable:
    """These functions as a TableBackend, on any device: PrefixIndex(..., backend=ReferenceTable)."""

    name = "reference"

    def __init__(self, num_slots: int, device: str | torch.device) -> None:
        self.slot_keys = torch.full((num_slots, 2), EMPTY, dtype=torch.int64, device=device)
        self.slot_values = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
        # Per-slot scratch for in-batch de-duplication; every operation leaves it as it found it.
        self.first = torch.full((num_slots,), _I32_MAX, dtype=torch.int32, device=device)
        self.last = torch.full((num_slots,), -1, dtype=torch.int32, device=device)

    def reset(self) -> None:
        self.slot_keys.fill_(EMPTY)
        self.slot_values.fill_(-1)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        return lookup(self.slot_keys, self.slot_values, keys)

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> Inserted:
        new, reused = insert(self.slot_keys, self.slot_values, self.first, self.last, keys, values)
        return Inserted(new, int(new.sum()), reused)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        return remove(self.slot_keys, self.first, keys)

    def count_leading(self, keys: torch.Tensor) -> int:
        return count_leading(self.slot_keys, self.slot_values, keys)

    def match_prefix(self, keys: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return match_prefix(self.slot_keys, self.slot_values, keys, offsets)
