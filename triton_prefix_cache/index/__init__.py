"""The prefix index: PrefixIndex over one table backend (Triton on CUDA, the CPU table in host memory).

    prefix_index.py   PrefixIndex: argument checks, capacity, tombstones and rebuilds, the CUDA stream
    batch.py          MatchBatcher: one launch answers the prefix lookups of every waiting request
    backend.py        the TableBackend interface and `resolve_backend`, the one place "auto" is decided
    triton_table.py   the Triton backend (kernels in ../kernels/hash_table.py)
    cpu_table.py      the CPU backend: C probe loops (cpu_table_c.py), numpy where no compiler works
"""

from ..keys import keys_from_block_hashes
from .backend import BACKENDS, Inserted, TableBackend, TableFactory, resolve_backend
from .batch import MatchBatcher
from .prefix_index import IndexFullError, PrefixIndex

__all__ = [
    "BACKENDS",
    "IndexFullError",
    "Inserted",
    "MatchBatcher",
    "PrefixIndex",
    "TableBackend",
    "TableFactory",
    "keys_from_block_hashes",
    "resolve_backend",
]
