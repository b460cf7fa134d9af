"""The Triton backend: the index's table in device tensors, run by the kernels of kernels/hash_table.py.

It compiles for CUDA; on the CPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests exercise them without a GPU. The caller (PrefixIndex) runs every operation
of one table on one stream, which the kernels rely on (no two launches overlap).
"""

from __future__ import annotations

import torch

from ..kernels import hash_table as ht
from ..keys import EMPTY
from .backend import Inserted

_I32_MAX = 2**31 - 1


class TritonTable:
    """A TableBackend on `device` (CUDA, or the CPU under the interpreter)."""

    name = "triton"

    def __init__(self, num_slots: int, device: str | torch.device) -> None:
        self.slot_keys = torch.empty((num_slots, 2), dtype=torch.int64, device=device)
        self.slot_values = torch.empty(num_slots, dtype=torch.int32, device=device)
        # Per-slot scratch of the insert and remove launchers (first and last batch position of a
        # key, whether its slot was claimed in this batch); every launch leaves it as it found it.
        self.first = torch.full((num_slots,), _I32_MAX, dtype=torch.int32, device=device)
        self.last = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
        self.fresh = torch.zeros(num_slots, dtype=torch.int8, device=device)
        #: how a few device numbers reach the host (PrefixIndex sets one that avoids copy engines)
        self.read_small = _tolist
        self.reset()

    def __repr__(self) -> str:
        return f"TritonTable(slots={self.slot_keys.shape[0]}, device={self.slot_keys.device})"

    def reset(self) -> None:
        self.slot_keys.fill_(EMPTY)
        self.slot_values.fill_(-1)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        return ht.lookup(self.slot_keys, self.slot_values, keys)

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> Inserted:
        new, reused = ht.insert(
            self.slot_keys, self.slot_values, self.first, self.last, self.fresh, keys, values
        )
        n_new, n_reused = self.read_small(torch.stack([new.sum(dtype=torch.int64), reused]))  # one sync
        return Inserted(new, n_new, n_reused)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        return ht.remove(self.slot_keys, self.first, keys)

    def count_leading(self, keys: torch.Tensor) -> int:
        counts = torch.empty(1, dtype=torch.int32, device=keys.device)
        ht.count_leading(self.slot_keys, keys, counts)
        return int(self.read_small(counts)[0])

    def count_leading_into(self, keys: torch.Tensor, out: torch.Tensor) -> None:
        """out[0] (one int32, e.g. mapped host memory) = how many leading keys are present, written
        by one launch, for the caller to read after its own wait."""
        ht.count_leading(self.slot_keys, keys, out)

    def match_prefix(self, keys: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ht.match_prefix(self.slot_keys, self.slot_values, keys, offsets)


def _tolist(t: torch.Tensor) -> list:
    return t.tolist()
