"""Triton kernels of the device-resident hash table, each with its launcher.

Layout (shared by every index backend): `tkeys` int64 [S, 2] holds the two words of each slot's
key, `tvals` int32 [S] its value; S is a power of two; linear probing from `keys.home_slot`. The
first word doubles as the slot state: EMPTY, TOMBSTONE, BUSY (being claimed) or a real key.

Insert publishes each entry whole. Kernel 1 finds each key's slot or claims one: a lane claims a
free slot by CAS-ing its first word to BUSY, writes the second word, then publishes the first word
with a release exchange; a lane that meets BUSY waits on that slot, and every first-word read is an
acquire, so no lane can see a published first word with a stale second word. Lanes holding the same
key therefore converge on one slot (no duplicates), and each lane records its slot and, with
atomic min/max in two scratch arrays, the first and last batch positions of its key. Kernel 2 lets
the last occurrence write the value (last one wins) and the first report whether the key was new,
and resets the scratch entries it used. Removal is the same two-step with a tombstone.

No kernel here overlaps another: all of one table's operations run on one stream (PrefixIndex does
that), so lookups never meet a BUSY slot.

Only features that Triton 3.6 compiles are used (no masked atomic_cas: idle lanes compare against
NEVER, a value no slot ever holds; `&` instead of `%`; signed int64 literals).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import keys as K

_EMPTY = tl.constexpr(K.EMPTY)
_TOMB = tl.constexpr(K.TOMBSTONE)
_BUSY = tl.constexpr(K.BUSY)
_NEVER = tl.constexpr(K.NEVER)
_FIRST_REAL = tl.constexpr(K.FIRST_REAL)
_I32_MAX = tl.constexpr(2**31 - 1)
# The hash, defined once in keys.py (keys.hash_words). A logical right shift by k is the
# arithmetic shift masked to its low 64 - k bits.
_MUL_IN = tl.constexpr(K.HASH_MUL_IN)
_SHIFT_1 = tl.constexpr(K.HASH_SHIFT_1)
_LOW_1 = tl.constexpr((1 << (64 - K.HASH_SHIFT_1)) - 1)
_MUL_1 = tl.constexpr(K.HASH_MUL_1)
_SHIFT_2 = tl.constexpr(K.HASH_SHIFT_2)
_LOW_2 = tl.constexpr((1 << (64 - K.HASH_SHIFT_2)) - 1)
_MUL_2 = tl.constexpr(K.HASH_MUL_2)
_SHIFT_3 = tl.constexpr(K.HASH_SHIFT_3)
_LOW_3 = tl.constexpr((1 << (64 - K.HASH_SHIFT_3)) - 1)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(n: int) -> int:
    # The interpreter's cost grows with programs x ops: give it few, wide programs.
    if INTERPRETED:
        return max(16, min(8192, triton.next_power_of_2(max(n, 1))))
    return 256


@triton.jit
def _home(w0, w1, mask_bits):
    """keys.hash_words(w0, w1) & mask_bits."""
    x = w0 ^ (w1 * _MUL_IN)
    x = (x ^ ((x >> _SHIFT_1) & _LOW_1)) * _MUL_1
    x = (x ^ ((x >> _SHIFT_2) & _LOW_2)) * _MUL_2
    x = x ^ ((x >> _SHIFT_3) & _LOW_3)
    return x & mask_bits


@triton.jit
def _load_query(q_ptr, offs, m):
    w0 = tl.load(q_ptr + 2 * offs, mask=m, other=0)
    w1 = tl.load(q_ptr + 2 * offs + 1, mask=m, other=0)
    w0 = tl.where(w0 < _FIRST_REAL, _FIRST_REAL, w0)  # keys.sanitize
    return w0, w1


@triton.jit
def _home_kernel(q_ptr, n, out_ptr, mask_bits, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w0, w1 = _load_query(q_ptr, offs, m)
    tl.store(out_ptr + offs, _home(w0, w1, mask_bits), mask=m)


@triton.jit
def _find(tkeys_ptr, w0, w1, active, mask_bits):
    """Slot of each active lane's key, or -1. Stops at EMPTY; no probe bound (load <= 0.75)."""
    pos = _home(w0, w1, mask_bits)
    slot = tl.full(pos.shape, -1, tl.int64)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        s0 = tl.load(tkeys_ptr + 2 * pos, mask=active, other=_EMPTY)
        s1 = tl.load(tkeys_ptr + 2 * pos + 1, mask=active, other=0)
        hit = active & (s0 == w0) & (s1 == w1)
        slot = tl.where(hit, pos, slot)
        active = active & (hit == 0) & (s0 != _EMPTY)
        pos = (pos + 1) & mask_bits
    return slot


@triton.jit
def _lookup_kernel(q_ptr, n, tkeys_ptr, tvals_ptr, out_ptr, mask_bits, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w0, w1 = _load_query(q_ptr, offs, m)
    slot = _find(tkeys_ptr, w0, w1, m, mask_bits)
    hit = slot >= 0
    v = tl.load(tvals_ptr + slot, mask=hit, other=-1)
    tl.store(out_ptr + offs, v, mask=m)


@triton.jit
def _claim_kernel(
    q_ptr,
    n,
    tkeys_ptr,
    first_ptr,
    last_ptr,
    fresh_ptr,
    slot_out_ptr,
    reused_out_ptr,
    mask_bits,
    BLOCK: tl.constexpr,
):
    """Insert step 1: find or claim every key's slot (see module doc)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w0, w1 = _load_query(q_ptr, offs, m)
    pos = _home(w0, w1, mask_bits)
    slot = tl.full([BLOCK], -1, tl.int64)
    first_tomb = tl.full([BLOCK], -1, tl.int64)
    claiming = tl.zeros([BLOCK], tl.int1)
    reused = tl.zeros([BLOCK], tl.int1)
    zero = tl.zeros([BLOCK], tl.int64)
    busy = tl.full([BLOCK], _BUSY, tl.int64)
    active = m
    while tl.max(active.to(tl.int32), axis=0) > 0:
        kp = tkeys_ptr + 2 * pos
        s0 = tl.atomic_add(kp, zero, mask=active, sem="acquire")  # an acquire read of the first word
        s1 = tl.load(kp + 1, mask=active, other=0)
        is_busy = s0 == _BUSY
        is_empty = s0 == _EMPTY
        is_tomb = s0 == _TOMB
        found = active & (s0 == w0) & (s1 == w1)
        settled = active & (is_busy == 0) & (found == 0)
        # Find phase: walk to the first EMPTY, remembering the first tombstone on the way.
        finding = settled & (claiming == 0)
        first_tomb = tl.where(finding & is_tomb & (first_tomb < 0), pos, first_tomb)
        start_claim = finding & is_empty
        # Claim phase: CAS a free slot to BUSY, then write word 1 and publish word 0 (release).
        try_cas = settled & claiming & (is_empty | is_tomb)
        old = tl.atomic_cas(kp, tl.where(try_cas, s0, _NEVER), busy, sem="acq_rel")
        won = try_cas & (old == s0)
        tl.store(kp + 1, w1, mask=won)
        tl.atomic_xchg(kp, w0, mask=won, sem="release")
        tl.store(fresh_ptr + pos, tl.full([BLOCK], 1, tl.int8), mask=won)
        reused = reused | (won & is_tomb)
        done = found | won
        slot = tl.where(done, pos, slot)
        # Movement: BUSY or a lost CAS re-reads the same slot; a claim starts at the first
        # tombstone seen (or here); everything else that is not done walks on.
        occupied = (is_empty == 0) & (is_tomb == 0)
        advance = (finding & (is_empty == 0)) | (settled & claiming & occupied)
        nxt = tl.where(advance, (pos + 1) & mask_bits, pos)
        nxt = tl.where(start_claim & (first_tomb >= 0), first_tomb, nxt)
        pos = nxt
        claiming = claiming | start_claim
        active = active & (done == 0)
    lane = offs.to(tl.int32)
    tl.atomic_min(first_ptr + slot, lane, mask=m)
    tl.atomic_max(last_ptr + slot, lane, mask=m)
    tl.store(slot_out_ptr + offs, slot, mask=m)
    tl.store(reused_out_ptr + offs, reused.to(tl.int8), mask=m)


@triton.jit
def _commit_kernel(
    slot_ptr, vals_in_ptr, n, tvals_ptr, first_ptr, last_ptr, fresh_ptr, new_out_ptr, BLOCK: tl.constexpr
):
    """Insert step 2: the last occurrence writes the value, the first reports newness."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    lane = offs.to(tl.int32)
    slot = tl.load(slot_ptr + offs, mask=m, other=0)
    is_first = m & (tl.load(first_ptr + slot, mask=m, other=-1) == lane)
    is_last = m & (tl.load(last_ptr + slot, mask=m, other=-1) == lane)
    fresh = tl.load(fresh_ptr + slot, mask=is_first, other=0)
    tl.store(new_out_ptr + offs, (is_first & (fresh != 0)).to(tl.int8), mask=m)
    # Only the first occurrence reads `fresh` and `first`, only the last writes the value: each
    # resets what it alone still needs, so no lane can read a reset entry that concerns it.
    tl.store(first_ptr + slot, tl.full([BLOCK], _I32_MAX, tl.int32), mask=is_first)
    tl.store(fresh_ptr + slot, tl.zeros([BLOCK], tl.int8), mask=is_first)
    v = tl.load(vals_in_ptr + offs, mask=is_last, other=0)
    tl.store(tvals_ptr + slot, v, mask=is_last)
    tl.store(last_ptr + slot, tl.full([BLOCK], -1, tl.int32), mask=is_last)


@triton.jit
def _find_for_remove_kernel(q_ptr, n, tkeys_ptr, first_ptr, slot_out_ptr, mask_bits, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w0, w1 = _load_query(q_ptr, offs, m)
    slot = _find(tkeys_ptr, w0, w1, m, mask_bits)
    hit = slot >= 0
    tl.atomic_min(first_ptr + slot, offs.to(tl.int32), mask=hit)
    tl.store(slot_out_ptr + offs, slot, mask=m)


@triton.jit
def _tombstone_kernel(slot_ptr, n, tkeys_ptr, first_ptr, removed_out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    slot = tl.load(slot_ptr + offs, mask=m, other=-1)
    hit = m & (slot >= 0)
    win = hit & (tl.load(first_ptr + slot, mask=hit, other=-1) == offs.to(tl.int32))
    tl.store(tkeys_ptr + 2 * slot, tl.full([BLOCK], _TOMB, tl.int64), mask=win)
    tl.store(first_ptr + slot, tl.full([BLOCK], _I32_MAX, tl.int32), mask=win)
    tl.store(removed_out_ptr + offs, win.to(tl.int8), mask=m)


@triton.jit
def _first_miss_kernel(vals_ptr, offsets_ptr, counts_ptr, BLOCK: tl.constexpr):
    """One program per request: how many leading values are hits (>= 0)."""
    r = tl.program_id(0)
    start = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    first = end
    i = start
    while (i < end) & (first == end):
        offs = i + tl.arange(0, BLOCK)
        inside = offs < end
        v = tl.load(vals_ptr + offs, mask=inside, other=0)
        first = tl.minimum(first, tl.min(tl.where(inside & (v < 0), offs, end), axis=0))
        i += BLOCK
    tl.store(counts_ptr + r, (first - start).to(tl.int32))


@triton.jit(do_not_specialize=["n"])
def _count_leading_kernel(q_ptr, n, tkeys_ptr, out_ptr, mask_bits, BLOCK: tl.constexpr):
    """One program: how many leading keys are present, probing BLOCK keys at a time and stopping
    after the first block that holds a miss. One launch and one int32 written (`out_ptr` may be
    mapped host memory): a single request's lookup at the least launch cost."""
    total = n.to(tl.int64)
    first = total
    i = total * 0
    while (i < total) & (first == total):
        offs = i + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < total
        w0, w1 = _load_query(q_ptr, offs, m)
        slot = _find(tkeys_ptr, w0, w1, m, mask_bits)
        first = tl.minimum(first, tl.min(tl.where(m & (slot < 0), offs, total), axis=0))
        i += BLOCK
    tl.store(out_ptr, first.to(tl.int32))


# ---------------------------------------------------------------------------------------------
# Launchers. They trust their caller (PrefixIndex) for dtypes, shapes, contiguity and device.


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m), mask=m)


def copy_by_sms(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src (same dtype and numel, contiguous) by a kernel, never a copy engine: for `dst` in
    mapped host memory, where a memcpy would queue behind the engine's bulk transfers."""
    if src.dtype != dst.dtype or src.numel() != dst.numel():
        raise ValueError(f"copy_by_sms: {src.dtype} x{src.numel()} into {dst.dtype} x{dst.numel()}")
    n = src.numel()
    if n:
        flat_src, flat_dst = src.reshape(-1), dst.view(-1)
        if src.dtype == torch.bool:
            flat_src, flat_dst = flat_src.view(torch.int8), flat_dst.view(torch.int8)
        b = _block(n)
        _copy_kernel[_grid(n, b)](flat_src, flat_dst, n, BLOCK=b)


def _grid(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def home_slot(keys: torch.Tensor, num_slots: int) -> torch.Tensor:
    n = keys.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=keys.device)
    if n:
        b = _block(n)
        _home_kernel[_grid(n, b)](keys, n, out, num_slots - 1, BLOCK=b)
    return out


def lookup(tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    n = keys.shape[0]
    out = torch.empty(n, dtype=torch.int32, device=keys.device)
    if n:
        b = _block(n)
        _lookup_kernel[_grid(n, b)](keys, n, tkeys, tvals, out, tkeys.shape[0] - 1, BLOCK=b)
    return out


def insert(
    tkeys: torch.Tensor,
    tvals: torch.Tensor,
    first: torch.Tensor,
    last: torch.Tensor,
    fresh: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsert a batch; returns (new flags bool (n,), tombstones reused: a 0-d device tensor)."""
    n = keys.shape[0]
    dev = keys.device
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev), torch.zeros((), dtype=torch.int64, device=dev)
    slots = torch.empty(n, dtype=torch.int64, device=dev)
    reused = torch.empty(n, dtype=torch.int8, device=dev)
    new = torch.empty(n, dtype=torch.int8, device=dev)
    b = _block(n)
    _claim_kernel[_grid(n, b)](keys, n, tkeys, first, last, fresh, slots, reused, tkeys.shape[0] - 1, BLOCK=b)
    _commit_kernel[_grid(n, b)](slots, values, n, tvals, first, last, fresh, new, BLOCK=b)
    return new.view(torch.bool), reused.sum(dtype=torch.int64)


def remove(tkeys: torch.Tensor, first: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    n = keys.shape[0]
    dev = keys.device
    removed = torch.zeros(n, dtype=torch.int8, device=dev)
    if n == 0:
        return removed.view(torch.bool)
    slots = torch.empty(n, dtype=torch.int64, device=dev)
    b = _block(n)
    _find_for_remove_kernel[_grid(n, b)](keys, n, tkeys, first, slots, tkeys.shape[0] - 1, BLOCK=b)
    _tombstone_kernel[_grid(n, b)](slots, n, tkeys, first, removed, BLOCK=b)
    return removed.view(torch.bool)


def count_leading(tkeys: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> None:
    """out[0] (int32, on the device or mapped) = how many leading keys are present; one launch."""
    n = keys.shape[0]
    _count_leading_kernel[(1,)](keys, n, tkeys, out, tkeys.shape[0] - 1,
                                BLOCK=max(16, min(1024 if INTERPRETED else 512, triton.next_power_of_2(n))))


def match_prefix(
    tkeys: torch.Tensor, tvals: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two launches whatever the number of requests: a parallel probe, then a per-request scan."""
    r = offsets.shape[0] - 1
    values = lookup(tkeys, tvals, keys)
    counts = torch.empty(r, dtype=torch.int32, device=keys.device)
    if r:
        _first_miss_kernel[(r,)](values, offsets, counts, BLOCK=1024 if INTERPRETED else 256)
    return counts, values
