"""The 128-bit key format shared by every index backend.

A key is one row of two int64 words. vLLM's block hashes (32-byte sha256 or 16-byte xxhash, each
already chained over the whole prefix) are uniformly distributed, so their first 16 bytes are a key
as they are. The table marks its slots with three reserved first-word values (EMPTY, TOMBSTONE,
BUSY) plus a fourth (NEVER) that the insert kernel uses as an impossible compare value. A real key
whose first word falls on one of these four is folded onto the next value (`FIRST_REAL`) by
`sanitize`, which every backend applies on the way in: the key space loses 4 of its 2^128 values,
and keys that differ only by such a first word alias (probability 2^-126 for hashed keys).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

INT64_MIN = -(2**63)
EMPTY = INT64_MIN
TOMBSTONE = INT64_MIN + 1
BUSY = INT64_MIN + 2
NEVER = INT64_MIN + 3
FIRST_REAL = INT64_MIN + 4

# The one hash of every backend: splitmix64's finalizer over both words,
#     x = w0 ^ (w1 * HASH_MUL_IN); x = (x ^ (x >>> S1)) * M1; x = (x ^ (x >>> S2)) * M2; x ^ (x >>> S3)
# with >>> a logical shift. `hash_words` below computes it for torch and numpy; the Triton kernels
# (kernels/hash_table.py) take these values as constexprs and the C probe (index/cpu_table_c.py) is
# generated from them; tests/unit/test_index.py checks that all of them give the same home slots.
# Written as signed int64: Triton rejects literals > INT64_MAX.
HASH_MUL_IN = -7046029254386353131  # 0x9E3779B97F4A7C15, the golden-ratio increment
HASH_SHIFT_1 = 30
HASH_MUL_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
HASH_SHIFT_2 = 27
HASH_MUL_2 = -7723592293110705685  # 0x94D049BB133111EB
HASH_SHIFT_3 = 31

Words = TypeVar("Words", torch.Tensor, np.ndarray)


def _lsr(x: Words, k: int) -> Words:
    """Logical right shift of int64 (torch's and numpy's >> are arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hash_words(w0: Words, w1: Words) -> Words:
    """Mix both words into one int64, on int64 torch tensors or numpy arrays (both wrap on overflow).

    The words are hashes already, but tests and other engines may hand in structured keys
    (counters, shared first words), so both words are mixed.
    """
    x = w0 ^ (w1 * HASH_MUL_IN)
    x = (x ^ _lsr(x, HASH_SHIFT_1)) * HASH_MUL_1
    x = (x ^ _lsr(x, HASH_SHIFT_2)) * HASH_MUL_2
    return x ^ _lsr(x, HASH_SHIFT_3)


def home_slot(keys: Words, num_slots: int) -> Words:
    """The first slot a key probes in a table of `num_slots` (a power of two); keys int64 (n, 2)."""
    return hash_words(keys[:, 0], keys[:, 1]) & (num_slots - 1)


def sanitize(keys: torch.Tensor) -> torch.Tensor:
    """Fold first words that collide with the table's markers onto FIRST_REAL (see module doc)."""
    w0 = keys[:, 0]
    if keys.numel() == 0:
        return keys
    bad = w0 < FIRST_REAL
    # Cheap test first: hashed keys almost never hit the four reserved values.
    if keys.device.type == "cpu" and not bool(bad.any()):
        return keys
    out = keys.clone()
    out[:, 0] = torch.where(bad, torch.full_like(w0, FIRST_REAL), w0)
    return out


def keys_from_block_hashes(hashes: list[bytes] | tuple[bytes, ...]) -> torch.Tensor:
    """vLLM block hashes -> int64 keys of shape (n, 2), on the CPU, without a loop per block.

    Accepts the 32-byte (sha256) and 16-byte (xxhash-128) forms; all hashes of one call must have the
    same length. The first 16 bytes, read little-endian, are the key's two words.
    """
    n = len(hashes)
    if n == 0:
        return torch.empty((0, 2), dtype=torch.int64)
    width = len(hashes[0])
    if width not in (16, 32):
        raise ValueError(f"hashes: expected 16- or 32-byte block hashes, got {width} bytes")
    buf = b"".join(hashes)
    if len(buf) != n * width:
        raise ValueError(f"hashes: all block hashes must have the same length ({width} bytes)")
    words = np.frombuffer(buf, dtype="<i8").reshape(n, width // 8)[:, :2]
    return torch.from_numpy(words.copy())


def check_keys(keys: torch.Tensor, device: torch.device, name: str = "keys") -> None:
    """Raise a clear error unless `keys` is an int64 (n, 2) tensor on `device`."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int64 (n, 2), got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype torch.int64, got {keys.dtype}")
    if keys.dim() != 2 or keys.shape[1] != 2:
        raise ValueError(f"{name}: expected shape (n, 2), got {tuple(keys.shape)}")
    if keys.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {keys.device}")
