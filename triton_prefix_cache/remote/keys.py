"""Keys and values in the shared store: the same KV gets the same key in every engine, and every
value proves which key it was written for and that its bytes are whole.

A key is `tpc1/<namespace digest, 32 hex>/<block key, 32 hex>`. The namespace is everything that
makes two engines' KV for the same tokens differ: model identity, KV dtype, block size, page
geometry and layout, TP rank and size, the scheme that derived the block keys, and the URL's
`namespace`. A value is a 64-byte header followed by the block's host slot (all layers):

    offset  bytes  field
    0       4      magic b"TPCv"
    4       2      format version (1)
    6       2      flags (0)
    8       8      payload bytes (the slot size)
    16      16     namespace digest
    32      16     block key (two little-endian int64 words)
    48      8      xxh3-64 of the payload
    56      8      xxh3-64 of bytes 0..55

A value whose header or payload does not match what the reader asked for is a miss, never KV.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

import numpy as np
import xxhash

FORMAT_VERSION = 1
KEY_PREFIX = f"tpc{FORMAT_VERSION}"
MAGIC = b"TPCv"
HEADER_BYTES = 64
HEADER_DTYPE = np.dtype([
    ("magic", "S4"),
    ("version", "<u2"),
    ("flags", "<u2"),
    ("payload_bytes", "<u8"),
    ("namespace", "u1", (16,)),
    ("key", "<i8", (2,)),
    ("checksum", "<u8"),
    ("header_checksum", "<u8"),
])
assert HEADER_DTYPE.itemsize == HEADER_BYTES


def checksum(buf) -> int:
    """xxh3-64 of a buffer (releases the GIL on large inputs)."""
    return xxhash.xxh3_64_intdigest(buf)


@dataclass(frozen=True)
class RemoteNamespace:
    """What two engines must share for their blocks with equal keys to hold equal KV.

    model: the model's identity (name or path, revision, quantization: whatever changes weights).
    dtype: the KV cache dtype ("bfloat16", "fp8_e4m3", ...).
    block_size: tokens per block.
    num_layers, page_bytes: the host slot's geometry (one page per layer).
    hash_scheme: how block keys are derived, including any seed (e.g. "vllm:sha256:<seed digest>");
        engines whose block keys are not reproducible across processes must not share a store.
    layout: the engine's page layout (e.g. "NHD"), so two layouts of equal size never match.
    tp_rank, tp_size: this rank's shard of the KV.
    tenant: the `remote.namespace` word (deployments sharing one store keep apart).
    """

    model: str
    dtype: str
    block_size: int
    num_layers: int
    page_bytes: int
    hash_scheme: str
    layout: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    tenant: str = ""
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "hash_scheme"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name}: expected a non-empty string, got {v!r}")
        for name in ("layout", "tenant"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        for name in ("block_size", "num_layers", "page_bytes", "tp_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if isinstance(self.tp_rank, bool) or not isinstance(self.tp_rank, int) or not (
                0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank: expected an int in [0, {self.tp_size}), got {self.tp_rank!r}")
        object.__setattr__(self, "digest", hashlib.sha256(self.canonical().encode()).digest()[:16])

    def canonical(self) -> str:
        """The exact text the digest is taken over (field order fixed, format version included)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["format"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.page_bytes

    @property
    def prefix(self) -> str:
        return f"{KEY_PREFIX}/{self.digest.hex()}/"

    def object_keys(self, keys: np.ndarray) -> list[str]:
        """Store keys of int64 block keys (n, 2)."""
        words = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64).reshape(-1, 2)
        p = self.prefix
        return [f"{p}{a:016x}{b:016x}" for a, b in words.tolist()]


def pack_headers(out: np.ndarray, ns: RemoteNamespace, keys: np.ndarray, checksums: np.ndarray) -> None:
    """Write the headers of len(keys) values into `out` (uint8 (n, HEADER_BYTES), e.g. a registered
    arena's rows); `checksums` are the payloads' xxh3-64."""
    h = out.view(HEADER_DTYPE).reshape(-1)
    h["magic"] = MAGIC
    h["version"] = FORMAT_VERSION
    h["flags"] = 0
    h["payload_bytes"] = ns.slot_bytes
    h["namespace"] = np.frombuffer(ns.digest, dtype=np.uint8)
    h["key"] = keys
    h["checksum"] = checksums
    for i in range(len(h)):
        h["header_checksum"][i] = checksum(out[i, :56])


def check_headers(hdr: np.ndarray, ns: RemoteNamespace, keys: np.ndarray) -> np.ndarray:
    """Which headers (uint8 (n, HEADER_BYTES)) are whole and written for these keys in this
    namespace; their payload checksums are then checked with `payload_checksums`."""
    h = hdr.view(HEADER_DTYPE).reshape(-1)
    ok = (h["magic"] == MAGIC) & (h["version"] == FORMAT_VERSION) & (h["flags"] == 0)
    ok &= h["payload_bytes"] == ns.slot_bytes
    ok &= (h["namespace"] == np.frombuffer(ns.digest, dtype=np.uint8)).all(axis=1)
    ok &= (h["key"] == keys).all(axis=1)
    for i in np.flatnonzero(ok):
        ok[i] = checksum(hdr[i, :56]) == int(h["header_checksum"][i])
    return ok


def header_checksums(hdr: np.ndarray) -> np.ndarray:
    """The payload checksums recorded in headers (uint8 (n, HEADER_BYTES))."""
    return hdr.view(HEADER_DTYPE).reshape(-1)["checksum"]
