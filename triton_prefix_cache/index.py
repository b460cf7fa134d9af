"""PrefixIndex: the device-resident hash table that maps 128-bit block keys to host-tier slots.

Open addressing with linear probing over a power-of-two number of slots, at least twice the
capacity, so the live load stays <= 0.5; deletes leave tombstones, and the table is rebuilt on its
own device once tombstones pass a quarter of the slots, so at least a quarter of the slots are
always EMPTY and every probe ends without a probe bound. Backends: "triton" (CUDA, or the CPU under
TRITON_INTERPRET=1) and "torch" (vectorized, the CPU path and the test oracle). Both read and write
the same layout. On CUDA every operation runs on the index's own stream, ordered after the
caller's current stream and before its next use of the results.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from . import reference
from .keys import EMPTY, TOMBSTONE, check_keys, keys_from_block_hashes

__all__ = ["IndexFullError", "PrefixIndex", "keys_from_block_hashes"]

Backend = Literal["auto", "triton", "torch"]

#: Rebuild once tombstones exceed this fraction of the slots (live keys are at most 1/2).
TOMBSTONE_REBUILD_FRACTION = 0.25


class IndexFullError(RuntimeError):
    """Inserting would take the index past its capacity; nothing was changed."""


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {dev}")
    return dev


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend: 'triton' on the CPU needs TRITON_INTERPRET=1 set before triton_prefix_cache is "
            "imported (Triton has no compiled CPU backend); use backend='torch' for CPU engines"
        )
    return backend


class PrefixIndex:
    """A map from 128-bit keys (int64 (n, 2)) to int32 values >= 0, resident on one device.

    Reserved first words: EMPTY, TOMBSTONE and BUSY mark slot states and NEVER is the kernels'
    impossible compare value (`keys.py`). No real key is lost to them: every operation folds a
    first word that equals one of those four onto the next value, consistently, so such a key is
    still stored and found (it aliases only a key that differs from it in nothing but such a word).
    """

    def __init__(
        self,
        capacity: int,
        device: str | torch.device = "cpu",
        backend: Backend = "auto",
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity: expected a positive int, got {capacity!r}")
        self.device = _resolve_device(device)
        self.backend = _resolve_backend(backend, self.device)
        self._capacity = capacity
        self.num_slots = 1 << max(4, (2 * capacity - 1).bit_length())
        if self.num_slots >= 2**31:
            raise ValueError(f"capacity: {capacity} keys need more than 2^31 slots")
        self._stream = None
        if self.device.type == "cuda":
            self._stream = stream or torch.cuda.Stream(self.device, priority=-1)
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self._tkeys = torch.empty((self.num_slots, 2), dtype=torch.int64, device=self.device)
            self._tvals = torch.empty(self.num_slots, dtype=torch.int32, device=self.device)
            # Per-slot scratch for in-batch de-duplication; every operation leaves it as it found it.
            self._first = torch.full((self.num_slots,), 2**31 - 1, dtype=torch.int32, device=self.device)
            self._last = torch.full((self.num_slots,), -1, dtype=torch.int32, device=self.device)
            if self.backend == "triton":
                self._fresh = torch.zeros(self.num_slots, dtype=torch.int8, device=self.device)
            self._reset_table()
        self._live = 0
        self._tombstones = 0
        self.rebuilds = 0
        from .kernels import hash_table  # deferred: importing it decides Triton's interpreter mode

        self._kernels = hash_table

    # ---- properties ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def load_factor(self) -> float:
        """Live keys / slots (at most 0.5)."""
        return self._live / self.num_slots

    @property
    def tombstones(self) -> int:
        return self._tombstones

    def __len__(self) -> int:
        return self._live

    def __repr__(self) -> str:
        return (
            f"PrefixIndex(len={self._live}, capacity={self._capacity}, slots={self.num_slots}, "
            f"device={self.device}, backend={self.backend!r})"
        )

    # ---- operations ---------------------------------------------------------------------------
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """int32 (n,): each key's value, or -1 where absent. A hit needs both words to match."""
        keys = self._check_keys(keys)
        impl = self._kernels if self.backend == "triton" else reference
        return self._run(lambda: impl.lookup(self._tkeys, self._tvals, keys), keys)

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Upsert; bool (n,): which keys were new.

        A key repeated in the batch gets the value of its last occurrence and is reported new at
        its first occurrence only (as inserting one by one into a dict would). Raises
        IndexFullError, changing nothing, if the new keys would exceed `capacity`.
        """
        keys = self._check_keys(keys)
        values = self._check_values(values, keys.shape[0])
        return self._run(lambda: self._insert(keys, values), keys, values)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        """bool (n,): which keys were removed (a key repeated in the batch: its first occurrence)."""
        keys = self._check_keys(keys)
        return self._run(lambda: self._remove(keys), keys)

    def match_prefix(self, keys: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Longest present prefix of each of r requests whose keys lie back to back in `keys`.

        `offsets` int64 (r+1,), non-decreasing from 0 to n. Returns (counts int32 (r,), values
        int32 (n,)): counts[i] leading keys of request i are present (stop at the first miss), and
        values is the per-key lookup, of which the caller reads the first counts[i] per request.
        A fixed number of launches whatever r is.
        """
        keys = self._check_keys(keys)
        offsets = self._check_offsets(offsets, keys.shape[0])
        impl = self._kernels if self.backend == "triton" else reference
        return self._run(lambda: impl.match_prefix(self._tkeys, self._tvals, keys, offsets), keys, offsets)

    def count_leading(self, keys: torch.Tensor) -> int:
        """How many leading keys are present: one request's prefix hit (`match_prefix` with r=1,
        answered on the host; on the CPU the probe stops at the first miss)."""
        keys = self._check_keys(keys)
        if keys.shape[0] == 0:
            return 0
        if self.backend == "triton":
            counts, _ = self.match_prefix(keys, torch.tensor([0, keys.shape[0]], device=self.device))
            return int(counts[0])
        return self._run(lambda: reference.count_leading(self._tkeys, self._tvals, keys), keys)

    def clear(self) -> None:
        self._run(self._reset_table)
        self._live = 0
        self._tombstones = 0

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys int64 (m, 2), values int32 (m,)) of every live entry, in slot order."""
        return self._run(self._items)

    # ---- internals (run on the index stream) ---------------------------------------------------
    def _insert(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        n = keys.shape[0]
        if self._live + n > self._capacity:
            # Only near capacity: count exactly how many distinct keys are new.
            absent = keys[self.lookup(keys) < 0]
            n_new = int(torch.unique(absent, dim=0).shape[0]) if absent.numel() else 0
            if self._live + n_new > self._capacity:
                raise IndexFullError(
                    f"insert: {n_new} new keys would take the index to {self._live + n_new} keys, "
                    f"past its capacity of {self._capacity}; nothing was inserted"
                )
        if self.backend == "triton":
            new, reused = self._kernels.insert(
                self._tkeys, self._tvals, self._first, self._last, self._fresh, keys, values
            )
            n_new, n_reused = torch.stack([new.sum(dtype=torch.int64), reused]).tolist()
        else:
            new, n_reused = reference.insert(self._tkeys, self._tvals, self._first, self._last, keys, values)
            n_new = int(new.sum())
        self._live += n_new
        self._tombstones -= n_reused
        return new

    def _remove(self, keys: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            removed = self._kernels.remove(self._tkeys, self._first, keys)
        else:
            removed = reference.remove(self._tkeys, self._first, keys)
        n = int(removed.sum())
        self._live -= n
        self._tombstones += n
        if self._tombstones > TOMBSTONE_REBUILD_FRACTION * self.num_slots:
            self._rebuild()
        return removed

    def _items(self) -> tuple[torch.Tensor, torch.Tensor]:
        live = (self._tkeys[:, 0] != EMPTY) & (self._tkeys[:, 0] != TOMBSTONE)
        return self._tkeys[live].clone(), self._tvals[live].clone()

    def _reset_table(self) -> None:
        self._tkeys.fill_(EMPTY)
        self._tvals.fill_(-1)

    def _rebuild(self) -> None:
        """Re-insert the live entries into a clean table, on the device (no host round trip of data)."""
        keys, vals = self._items()
        self._reset_table()
        if self.backend == "triton":
            self._kernels.insert(self._tkeys, self._tvals, self._first, self._last, self._fresh, keys, vals)
        else:
            reference.insert(self._tkeys, self._tvals, self._first, self._last, keys, vals)
        self._tombstones = 0
        self.rebuilds += 1

    def _check_keys(self, keys: torch.Tensor) -> torch.Tensor:
        check_keys(keys, self.device)
        return keys.contiguous()

    def _check_values(self, values: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values: expected a torch.Tensor of int32 (n,), got {type(values).__name__}")
        if values.dtype != torch.int32:
            raise TypeError(f"values: expected dtype torch.int32, got {values.dtype}")
        if values.shape != (n,):
            raise ValueError(f"values: expected shape ({n},) to match keys, got {tuple(values.shape)}")
        if values.device != self.device:
            raise ValueError(f"values: expected a tensor on {self.device}, got one on {values.device}")
        if n and int(values.min()) < 0:
            raise ValueError("values: must be >= 0 (-1 means 'absent' in lookups)")
        return values.contiguous()

    def _check_offsets(self, offsets: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"offsets: expected a torch.Tensor of int64 (r+1,), got {type(offsets).__name__}")
        if offsets.dtype != torch.int64:
            raise TypeError(f"offsets: expected dtype torch.int64, got {offsets.dtype}")
        if offsets.dim() != 1 or offsets.shape[0] < 1:
            raise ValueError(f"offsets: expected shape (r+1,) with r >= 0, got {tuple(offsets.shape)}")
        if offsets.device != self.device:
            raise ValueError(f"offsets: expected a tensor on {self.device}, got one on {offsets.device}")
        bad = (offsets[0] != 0) | (offsets[-1] != n) | (offsets[1:] < offsets[:-1]).any()
        if bool(bad):  # one host sync for all three checks
            raise ValueError(
                f"offsets: must be non-decreasing from 0 to len(keys)={n}, got {offsets.tolist()}"
            )
        return offsets.contiguous()

    def _run(self, fn, *inputs: torch.Tensor):
        """Run `fn` on the index stream, ordered after the caller's stream and before its next use."""
        if self._stream is None:
            return fn()
        caller = torch.cuda.current_stream(self.device)
        if caller == self._stream:  # nested call
            return fn()
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            out = fn()
        caller.wait_stream(self._stream)
        for t in inputs:
            t.record_stream(self._stream)
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                t.record_stream(caller)
        return out
