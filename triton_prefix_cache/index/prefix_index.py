"""PrefixIndex: the hash table that maps 128-bit block keys to host-tier slots, on one device.

Open addressing with linear probing over a power-of-two number of slots, at least twice the
capacity, so the live load stays <= 0.5; deletes leave tombstones, and the table is rebuilt on its
own device once tombstones pass a quarter of the slots, so at least a quarter of the slots are
always EMPTY and every probe ends without a probe bound. The table itself is a backend
(`backend.py`: Triton on CUDA, the CPU table in host memory); this class checks arguments, keeps
the capacity and tombstone accounting, and on CUDA runs every operation on the index's own stream.

A CUDA index takes its inputs from either side. Device tensors: the operation is ordered after the
caller's current stream and before its next use of the results. CPU tensors (the scheduler's
lookups): the inputs go in and the answers come out through mapped pinned memory (`mapped.py`),
with no copy-engine transfer and no wait for the caller's stream: the host waits for the index
stream alone, so a lookup never waits for the forward or the KV copies the engine has queued.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch

from ..keys import EMPTY, TOMBSTONE, check_keys
from .backend import TableFactory, make_table, resolve_backend, resolve_device
from .mapped import MappedStaging

Backend = Literal["auto", "triton", "cpu"]

_CPU = torch.device("cpu")

#: Rebuild once tombstones exceed this fraction of the slots (live keys are at most 1/2).
TOMBSTONE_REBUILD_FRACTION = 0.25


class IndexFullError(RuntimeError):
    """Inserting would take the index past its capacity; nothing was changed."""


class PrefixIndex:
    """A map from 128-bit keys (int64 (n, 2)) to int32 values >= 0, resident on one device.

    Reserved first words: EMPTY, TOMBSTONE and BUSY mark slot states and NEVER is the kernels'
    impossible compare value (`keys.py`). No real key is lost to them: every operation folds a
    first word that equals one of those four onto the next value, consistently, so such a key is
    still stored and found (it aliases only a key that differs from it in nothing but such a word).

    backend: "auto", "triton" or "cpu" ("torch": a deprecated alias of "cpu"), resolved by
    `backend.resolve_backend`; or a TableFactory that builds the table (tests pass their own
    backends this way). device: where the table lives; None leaves it to the backend.
    """

    def __init__(
        self,
        capacity: int,
        device: str | torch.device | None = "cpu",
        backend: Backend | TableFactory = "auto",
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity: expected a positive int, got {capacity!r}")
        if callable(backend):
            self.device = resolve_device("cpu" if device is None else device)
            make = backend
        else:
            name, self.device = resolve_backend(backend, device)
            make = functools.partial(make_table, name)
        self._capacity = capacity
        self.num_slots = 1 << max(4, (2 * capacity - 1).bit_length())
        if self.num_slots >= 2**31:
            raise ValueError(f"capacity: {capacity} keys need more than 2^31 slots")
        self._stream = None
        self._mapped: MappedStaging | None = None
        self._host_calls = 0  # depth of `_host_call`s in progress (their regions stay taken)
        if self.device.type == "cuda":
            self._stream = stream or torch.cuda.Stream(self.device, priority=-1)
            self._mapped = MappedStaging(self.device)
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self.table = make(self.num_slots, self.device)
        if hasattr(self.table, "read_small"):
            self.table.read_small = self._read_small
        #: the backend's name: "triton" or "cpu"
        self.backend: str = self.table.name
        self._live = 0
        self._tombstones = 0
        self.rebuilds = 0
        #: bumped by every call that may change the contents (insert, remove, clear): an answer
        #: read at one version holds until the next
        self.version = 0
        #: operations run (lookups, inserts, removes, matches): kernel launch groups on a device table
        self.operations = 0

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
        """int32 (n,): each key's value, or -1 where absent. A hit needs both words to match.
        Every operation answers on the device of its inputs: the index's, or the CPU (module doc)."""
        self.operations += 1
        if self._answers_host(keys):
            return self._host_call(self.table.lookup, self._check_keys(keys, host=True))
        keys = self._check_keys(keys)
        return self._run(lambda: self.table.lookup(keys), keys)

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Upsert; bool (n,): which keys were new.

        A key repeated in the batch gets the value of its last occurrence and is reported new at
        its first occurrence only (as inserting one by one into a dict would). Raises
        IndexFullError, changing nothing, if the new keys would exceed `capacity`.
        """
        self.operations += 1
        self.version += 1
        if self._answers_host(keys):
            keys = self._check_keys(keys, host=True)
            return self._host_call(self._insert, keys, self._check_values(values, keys.shape[0], host=True))
        keys = self._check_keys(keys)
        values = self._check_values(values, keys.shape[0])
        return self._run(lambda: self._insert(keys, values), keys, values)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        """bool (n,): which keys were removed (a key repeated in the batch: its first occurrence)."""
        self.operations += 1
        self.version += 1
        if self._answers_host(keys):
            return self._host_call(self._remove, self._check_keys(keys, host=True))
        keys = self._check_keys(keys)
        return self._run(lambda: self._remove(keys), keys)

    def match_prefix(self, keys: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Longest present prefix of each of r requests whose keys lie back to back in `keys`.

        `offsets` int64 (r+1,), non-decreasing from 0 to n. Returns (counts int32 (r,), values
        int32 (n,)): counts[i] leading keys of request i are present (stop at the first miss), and
        values is the per-key lookup, of which the caller reads the first counts[i] per request.
        A fixed number of launches whatever r is.
        """
        self.operations += 1
        if self._answers_host(keys):
            keys = self._check_keys(keys, host=True)
            offsets = self._check_offsets(offsets, keys.shape[0], host=True)
            return self._host_call(self.table.match_prefix, keys, offsets)
        keys = self._check_keys(keys)
        offsets = self._check_offsets(offsets, keys.shape[0])
        return self._run(lambda: self.table.match_prefix(keys, offsets), keys, offsets)

    def count_leading(self, keys: torch.Tensor) -> int:
        """How many leading keys are present: one request's prefix hit (`match_prefix` with r=1,
        answered on the host; the CPU table's C probe stops at the first miss)."""
        self.operations += 1
        if self._answers_host(keys):
            keys = self._check_keys(keys, host=True)
            if keys.shape[0] == 0:
                return 0
            into = getattr(self.table, "count_leading_into", None)
            if into is not None:  # one launch writing the count straight into mapped memory
                return self._host_count(into, keys)
            offsets = torch.tensor([0, keys.shape[0]], dtype=torch.int64)
            return int(self._host_call(lambda k, o: self.table.match_prefix(k, o)[0], keys, offsets)[0])
        keys = self._check_keys(keys)
        if keys.shape[0] == 0:
            return 0
        return self._run(lambda: self.table.count_leading(keys), keys)

    def clear(self) -> None:
        self.version += 1
        self._run(self.table.reset)
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
        done = self.table.insert(keys, values)
        self._live += done.count
        self._tombstones -= done.tombstones_reused
        return done.new

    def _remove(self, keys: torch.Tensor) -> torch.Tensor:
        removed = self.table.remove(keys)
        n = int(self._read_small(removed.sum(dtype=torch.int64))[0])
        self._live -= n
        self._tombstones += n
        if self._tombstones > TOMBSTONE_REBUILD_FRACTION * self.num_slots:
            self._rebuild()
        return removed

    def _items(self) -> tuple[torch.Tensor, torch.Tensor]:
        tkeys = self.table.slot_keys
        live = (tkeys[:, 0] != EMPTY) & (tkeys[:, 0] != TOMBSTONE)
        return tkeys[live].clone(), self.table.slot_values[live].clone()

    def _rebuild(self) -> None:
        """Re-insert the live entries into a clean table, on its own device (no host round trip)."""
        keys, vals = self._items()
        self.table.reset()
        self.table.insert(keys, vals)
        self._tombstones = 0
        self.rebuilds += 1

    def _check_keys(self, keys: torch.Tensor, host: bool = False) -> torch.Tensor:
        check_keys(keys, _CPU if host else self.device)
        return keys.contiguous()

    def _check_values(self, values: torch.Tensor, n: int, host: bool = False) -> torch.Tensor:
        device = _CPU if host else self.device
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values: expected a torch.Tensor of int32 (n,), got {type(values).__name__}")
        if values.dtype != torch.int32:
            raise TypeError(f"values: expected dtype torch.int32, got {values.dtype}")
        if values.shape != (n,):
            raise ValueError(f"values: expected shape ({n},) to match keys, got {tuple(values.shape)}")
        if values.device != device:
            raise ValueError(f"values: expected a tensor on {device}, got one on {values.device}")
        if n and int(values.min()) < 0:
            raise ValueError("values: must be >= 0 (-1 means 'absent' in lookups)")
        return values.contiguous()

    def _check_offsets(self, offsets: torch.Tensor, n: int, host: bool = False) -> torch.Tensor:
        device = _CPU if host else self.device
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"offsets: expected a torch.Tensor of int64 (r+1,), got {type(offsets).__name__}")
        if offsets.dtype != torch.int64:
            raise TypeError(f"offsets: expected dtype torch.int64, got {offsets.dtype}")
        if offsets.dim() != 1 or offsets.shape[0] < 1:
            raise ValueError(f"offsets: expected shape (r+1,) with r >= 0, got {tuple(offsets.shape)}")
        if offsets.device != device:
            raise ValueError(f"offsets: expected a tensor on {device}, got one on {offsets.device}")
        if offsets.device.type == "cpu":  # in numpy: a few microseconds where torch takes tens
            o = offsets.numpy()
            bad = o[0] != 0 or o[-1] != n or bool((o[1:] < o[:-1]).any())
        else:
            bad = bool((offsets[0] != 0) | (offsets[-1] != n) | (offsets[1:] < offsets[:-1]).any())
        if bad:  # on a device, one host sync for all three checks
            raise ValueError(
                f"offsets: must be non-decreasing from 0 to len(keys)={n}, got {offsets.tolist()}"
            )
        return offsets.contiguous()

    def _answers_host(self, t: object) -> bool:
        """Whether a call with this input answers the CPU through mapped memory (a CUDA index)."""
        return self._mapped is not None and isinstance(t, torch.Tensor) and t.device.type == "cpu"

    def _host_call(self, fn, *inputs: torch.Tensor):
        """`fn` over mapped copies of the CPU tensors `inputs`, on the index stream; its tensor
        answers come back as CPU tensors. Nothing of the caller's stream is waited for (the inputs
        were never on a stream), and the host waits for one event of the index stream."""
        assert self._mapped is not None and self._stream is not None
        from ..kernels.hash_table import copy_by_sms

        self._host_calls += 1
        try:
            with torch.cuda.stream(self._stream):
                out = fn(*(self._mapped.put(t) for t in inputs))
                answers = []
                for t in out if isinstance(out, tuple) else (out,):
                    host, dev = self._mapped.out(t)
                    copy_by_sms(t.contiguous(), dev)
                    answers.append(host)
                self._wait_stream()
            answers = [a.clone() for a in answers]  # the regions are reused by the next call
        except BaseException:
            self._stream.synchronize()  # the event was not reached: regions idle before reuse
            raise
        finally:
            self._host_calls -= 1
            if not self._host_calls:  # an outer host call still holds its regions
                self._mapped.reset()
        return tuple(answers) if isinstance(out, tuple) else answers[0]

    def _host_count(self, into, keys: torch.Tensor) -> int:
        """`count_leading` of CPU keys on a CUDA index: the keys in mapped memory, one kernel that
        writes the count into mapped memory, one event of the index stream waited for."""
        assert self._mapped is not None and self._stream is not None
        self._host_calls += 1
        try:
            with torch.cuda.stream(self._stream):
                host, dev = self._mapped.out(torch.empty(1, dtype=torch.int32))
                into(self._mapped.put(keys), dev)
                self._wait_stream()
            return int(host[0])
        except BaseException:
            self._stream.synchronize()  # the event was not reached: regions idle before reuse
            raise
        finally:
            self._host_calls -= 1
            if not self._host_calls:
                self._mapped.reset()

    def _read_small(self, t: torch.Tensor) -> list:
        """A few device numbers on the host (as a flat list), on a CUDA index through mapped memory
        after an event of the index stream; called on that stream."""
        if self._mapped is None:
            return t.reshape(-1).tolist()
        from ..kernels.hash_table import copy_by_sms

        host, dev = self._mapped.out(t.reshape(-1))
        copy_by_sms(t.reshape(-1), dev)
        self._wait_stream()
        out = host.tolist()
        if not self._host_calls:  # a device call's: every region it took is idle now
            self._mapped.reset()
        return out

    def _wait_stream(self) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        ev.synchronize()

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
