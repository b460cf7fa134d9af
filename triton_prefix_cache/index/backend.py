"""The table-backend interface of PrefixIndex, and the one function that decides which backend serves.

A backend owns the slot arrays of one open-addressing table (layout: `kernels/hash_table.py`) and
runs the table operations on them; PrefixIndex owns everything around them: argument checks,
capacity, tombstone accounting and rebuilds, the CUDA stream. The production backends:

    triton  the Triton kernels over device tensors: CUDA (the CPU under TRITON_INTERPRET=1, for tests)
    cpu     the table in host memory, probed by C loops (numpy where no C compiler works)

Both hash with `keys.hash_words` and share the layout, so a table written by one reads with the other.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

#: Values of `backend` (PrefixIndex) and `index_backend` (the config).
BACKENDS = ("auto", "triton", "cpu")
#: Deprecated names, still accepted with one warning per process: "torch" is the CPU table.
ALIASES = {"torch": "cpu"}
ALLOWED = "'auto', 'triton' or 'cpu' ('torch' is a deprecated alias of 'cpu')"


@dataclass(frozen=True)
class Inserted:
    """What one `TableBackend.insert` did."""

    new: torch.Tensor  # bool (n,): the key was absent (True at its first occurrence in the batch only)
    count: int  # how many keys were new
    tombstones_reused: int  # how many new keys took a tombstone's slot


class TableBackend(Protocol):
    """The operations PrefixIndex runs on its table.

    Inputs are already checked by PrefixIndex: keys int64 (n, 2), values int32 (n,) >= 0, offsets
    int64 (r+1,) non-decreasing from 0 to n, all contiguous and on the table's device. Keys are
    handed over as the caller gave them: each backend folds reserved first words as
    `keys.sanitize` does. Every probe ends at an EMPTY slot, which PrefixIndex guarantees by keeping
    live keys at most half and tombstones at most a quarter of the slots.
    """

    #: "triton" or "cpu" (or a test's name for its own backend)
    name: str
    #: int64 (S, 2): each slot's two key words; the first is EMPTY or TOMBSTONE for a free slot
    slot_keys: torch.Tensor
    #: int32 (S,): each slot's value
    slot_values: torch.Tensor

    def reset(self) -> None:
        """Make every slot EMPTY."""

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """int32 (n,): each key's value, or -1 where absent."""

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> Inserted:
        """Upsert; a key repeated in the batch takes the value of its last occurrence."""

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        """Tombstone each present key; bool (n,), True at the first occurrence of a removed key."""

    def count_leading(self, keys: torch.Tensor) -> int:
        """How many leading keys are present (n >= 1)."""

    def match_prefix(self, keys: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts int32 (r,), values int32 (n,)): each request's present prefix, and the lookup."""


#: Builds a backend's empty table of `num_slots` slots on `device` (PrefixIndex's `backend` may be one).
TableFactory = Callable[[int, torch.device], TableBackend]


def canonical_backend(backend: object) -> str:
    """One of BACKENDS; "torch" maps to "cpu" with a deprecation warning (logged once).

    Raises ValueError naming the allowed values.
    """
    if isinstance(backend, str) and backend in ALIASES:
        _warn_deprecated(backend)
        return ALIASES[backend]
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected {ALLOWED}, got {backend!r}")
    return backend


@functools.cache
def _warn_deprecated(alias: str) -> None:
    log.warning("index backend %r is a deprecated alias: use %r (the same CPU table)", alias, ALIASES[alias])


def resolve_device(device: str | torch.device) -> torch.device:
    """The CPU, or a CUDA device with its index filled in; anything else raises ValueError."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {dev}")
    return dev


def resolve_backend(backend: str, device: str | torch.device | None = None) -> tuple[str, torch.device]:
    """("triton" or "cpu", the device its table lives on): the one place that decides "auto".

    "auto" is the CPU table unless the table must live in CUDA memory, which only Triton serves: an
    engine's scheduler asks about one request at a time (hundreds of keys), and such small,
    latency-bound lookups are faster on the CPU than on a GPU that is busy with the forward and the
    KV copies. `device` None leaves the table's place to the backend: the CPU for "auto" and "cpu",
    the current CUDA device for "triton" (the CPU where torch sees none, for tests).
    """
    name = canonical_backend(backend)
    if device is None:
        device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if name == "auto":
        name = "triton" if dev.type == "cuda" else "cpu"
    if name == "cpu" and dev.type != "cpu":
        raise ValueError(f"backend: 'cpu' keeps its table in host memory, so device must be 'cpu', got {dev}")
    if name == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend: 'triton' on the CPU needs TRITON_INTERPRET=1 set before triton_prefix_cache is "
            "imported (Triton has no compiled CPU backend); use backend='cpu' for CPU engines"
        )
    return name, dev


def make_table(name: str, num_slots: int, device: torch.device) -> TableBackend:
    """An empty table of a resolved backend ("triton" or "cpu")."""
    if name == "cpu":
        from .cpu_table import CpuTable

        return CpuTable(num_slots, device)
    # Deferred: Triton reads TRITON_INTERPRET when a kernel is defined, so the kernels load with
    # the first Triton table rather than with the package.
    from .triton_table import TritonTable

    return TritonTable(num_slots, device)
