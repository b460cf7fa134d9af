"""Plain-torch versions of the hash-table kernels: the CPU backend and the kernels' test oracle.

On CPU tensors the same algorithms run in numpy (zero-copy views): its per-call cost is a few
microseconds where torch's is tens, which decides small batches such as a scheduler's lookups.

They work on the same table layout as the Triton kernels (keys int64 [S, 2], values int32 [S],
open addressing with linear probing from `keys.home_slot`), so a table written by one backend can
be read by the other. Everything is vectorized over the batch: one loop iteration per probe step,
never one per key.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import cprobe
from .keys import EMPTY, FIRST_REAL, TOMBSTONE, home_slot, sanitize

#: Slots examined per key and probe round. Linear-probing runs at load <= 0.5 are short, so most
#: keys finish in the first window: few rounds of wide gathers beat many rounds of narrow ones.
WINDOW = 4
#: How CPU tensors are served: "c" (sequential probe loops in C, compiled on first use: cprobe.py),
#: "numpy" (the vectorized twins below) or "torch" (the code that serves CUDA tensors; tests set it
#: to run that code on the CPU too). "auto", the default, is "c" where a C compiler works, else
#: "numpy". (numba would do the loops too, but loading LLVM into a vLLM 0.32 process breaks vLLM's
#: kernel-override scan, vllm/triton_utils/dispatcher.py, for every engine started after it.)
CPU_IMPL = os.environ.get("TPC_CPU_INDEX", "auto")
if CPU_IMPL not in ("auto", "c", "numpy", "torch"):
    raise ValueError(f"TPC_CPU_INDEX: expected 'auto', 'c', 'numpy' or 'torch', got {CPU_IMPL!r}")


def _cpu_impl() -> str:
    """Resolve "auto" (and an unbuildable "c") once, on first use."""
    global CPU_IMPL
    if CPU_IMPL in ("auto", "c"):
        CPU_IMPL = "c" if cprobe.load() is not None else "numpy"
    return CPU_IMPL


_I32_MAX = 2**31 - 1


def _first_true(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, index of the first True) along the last axis."""
    return m.any(1), m.to(torch.uint8).argmax(1)


def _find_slots_np(tk: np.ndarray, k: np.ndarray) -> np.ndarray:
    """find_slots on CPU arrays. numpy's per-call cost is a few microseconds where torch's is tens:
    this is what keeps a scheduler's per-request lookup of a few hundred keys cheap."""
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


def _claim_np(tk: np.ndarray, k: np.ndarray, lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """_claim on CPU arrays (same rule: first free slot on the probe sequence, lowest lane wins)."""
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
        mine = (s[..., 0] == w0) & (s[..., 1] == w1)
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
        keep = ~done
        nxt = np.where(stopped, target, (pos + WINDOW) & mask)
        at, pos, w0, w1 = at[keep], nxt[keep], w0[keep], w1[keep]
    return slots, claimed, reused


def _insert_np(tk: np.ndarray, tv: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, int]:
    """insert on CPU arrays; groups lanes by slot with one stable sort instead of scratch arrays."""
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
    impl = _cpu_impl() if keys.device.type == "cpu" else "torch"
    if impl == "c":
        return torch.from_numpy(cprobe.lookup(tkeys.numpy(), tvals.numpy(), keys.numpy()))
    if impl == "numpy":  # the whole lookup in numpy (see _find_slots_np)
        k = keys.numpy()
        if (k[:, 0] < FIRST_REAL).any():
            k = sanitize(keys).numpy()
        slots = _find_slots_np(tkeys.numpy(), k)
        out = np.full(len(k), -1, dtype=np.int32)
        hit = slots >= 0
        out[hit] = tvals.numpy()[slots[hit]]
        return torch.from_numpy(out)
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
    impl = _cpu_impl() if dev.type == "cpu" else "torch"
    if impl == "c":
        new, reused = cprobe.insert(tkeys.numpy(), tvals.numpy(), keys.numpy(), values.numpy())
        return torch.from_numpy(new), reused
    if impl == "numpy":
        new, reused = _insert_np(tkeys.numpy(), tvals.numpy(), keys.numpy(), values.numpy())
        return torch.from_numpy(new), reused
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
    impl = _cpu_impl() if keys.device.type == "cpu" else "torch"
    if impl == "c":
        return torch.from_numpy(cprobe.remove(tkeys.numpy(), keys.numpy()))
    if impl == "numpy":
        return torch.from_numpy(_remove_np(tkeys.numpy(), keys.numpy()))
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
    """How many leading keys are present (the C probe stops at the first miss)."""
    if keys.device.type == "cpu" and _cpu_impl() == "c":
        return cprobe.leading(tkeys.numpy(), keys.numpy())
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
