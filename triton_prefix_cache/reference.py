"""Plain-torch versions of the hash-table kernels: the CPU backend and the kernels' test oracle.

They work on the same table layout as the Triton kernels (keys int64 [S, 2], values int32 [S],
open addressing with linear probing from `keys.home_slot`), so a table written by one backend can
be read by the other. Everything is vectorized over the batch: one loop iteration per probe step,
never one per key.
"""
from __future__ import annotations

import torch

from .keys import EMPTY, TOMBSTONE, home_slot, sanitize


def lookup(tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Value of each key, or -1."""
    keys = sanitize(keys)
    n, mask = keys.shape[0], tkeys.shape[0] - 1
    out = torch.full((n,), -1, dtype=torch.int32, device=keys.device)
    idx = torch.arange(n, device=keys.device)
    pos = home_slot(keys, tkeys.shape[0])
    w0, w1 = keys[:, 0], keys[:, 1]
    while idx.numel():
        s = tkeys[pos]
        hit = (s[:, 0] == w0) & (s[:, 1] == w1)
        out[idx[hit]] = tvals[pos[hit]]
        go_on = ~hit & (s[:, 0] != EMPTY)
        idx, pos, w0, w1 = idx[go_on], (pos[go_on] + 1) & mask, w0[go_on], w1[go_on]
    return out


def find_slots(tkeys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Slot of each (sanitized) key, or -1."""
    n, mask = keys.shape[0], tkeys.shape[0] - 1
    out = torch.full((n,), -1, dtype=torch.int64, device=keys.device)
    idx = torch.arange(n, device=keys.device)
    pos = home_slot(keys, tkeys.shape[0])
    w0, w1 = keys[:, 0], keys[:, 1]
    while idx.numel():
        s = tkeys[pos]
        hit = (s[:, 0] == w0) & (s[:, 1] == w1)
        out[idx[hit]] = pos[hit]
        go_on = ~hit & (s[:, 0] != EMPTY)
        idx, pos, w0, w1 = idx[go_on], (pos[go_on] + 1) & mask, w0[go_on], w1[go_on]
    return out


def _first_and_last(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row: the index of the first and of the last row holding the same key."""
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    n = keys.shape[0]
    pos = torch.arange(n, device=keys.device)
    first = torch.full((uniq.shape[0],), n, dtype=torch.int64, device=keys.device)
    last = torch.full((uniq.shape[0],), -1, dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(0, inverse, pos, reduce="amin")
    last.scatter_reduce_(0, inverse, pos, reduce="amax")
    return first, last, inverse


def insert(
    tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Upsert; returns (new flags, tombstones reused).

    A key repeated in the batch takes the value of its last occurrence and is reported new (if it
    was absent) at its first occurrence only, as a sequential dict would do.
    """
    keys = sanitize(keys)
    n = keys.shape[0]
    new = torch.zeros(n, dtype=torch.bool, device=keys.device)
    if n == 0:
        return new, 0
    first, last, _ = _first_and_last(keys)
    ukeys, uvals = keys[last], values[last]
    slots = find_slots(tkeys, ukeys)
    found = slots >= 0
    tvals[slots[found]] = uvals[found]
    absent = (~found).nonzero().squeeze(1)
    new[first[absent]] = True
    # Claim the first free slot (tombstone or empty) on each absent key's probe sequence; where
    # several keys pick one slot the lowest index wins and the others walk on.
    mask = tkeys.shape[0] - 1
    pending = absent
    pos = home_slot(ukeys[pending], tkeys.shape[0])
    reused = 0
    while pending.numel():
        s0 = tkeys[pos, 0]
        free = (s0 == EMPTY) | (s0 == TOMBSTONE)
        cand, cpos = pending[free], pos[free]
        uslots, inv = torch.unique(cpos, return_inverse=True)
        winner = torch.full((uslots.shape[0],), n, dtype=torch.int64, device=keys.device)
        winner.scatter_reduce_(0, inv, cand, reduce="amin")
        won = winner[inv] == cand
        wpos, wk = cpos[won], cand[won]
        reused += int((tkeys[wpos, 0] == TOMBSTONE).sum())
        tkeys[wpos] = ukeys[wk]
        tvals[wpos] = uvals[wk]
        placed = torch.zeros(n, dtype=torch.bool, device=keys.device)
        placed[wk] = True
        keep = ~placed[pending]
        # Losers retry the same slot only to find it taken: advance everyone not placed.
        pending, pos = pending[keep], (pos[keep] + 1) & mask
    return new, reused


def remove(tkeys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Tombstone each present key; for a key repeated in the batch only the first occurrence is True."""
    keys = sanitize(keys)
    n = keys.shape[0]
    removed = torch.zeros(n, dtype=torch.bool, device=keys.device)
    if n == 0:
        return removed
    first, _, _ = _first_and_last(keys)
    slots = find_slots(tkeys, keys[first])
    found = slots >= 0
    tkeys[slots[found], 0] = TOMBSTONE
    removed[first[found]] = True
    return removed


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
