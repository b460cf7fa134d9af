"""PrefixIndex against a Python dict (the independent oracle), over every table backend.

Every test runs for the Triton backend on `kernel_device` (interpreted on the CPU here and in CI,
compiled on the GPU host), for the CPU table with each of its probes (C, numpy), and for the plain
torch reference (index_reference.py, the oracle of the kernel comparisons) on `kernel_device`.
"""

from __future__ import annotations

import functools
import hashlib
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import index_reference
from triton_prefix_cache import IndexFullError, PrefixIndex, keys_from_block_hashes
from triton_prefix_cache import keys as K
from triton_prefix_cache.index import backend as B
from triton_prefix_cache.index import cpu_table_c
from triton_prefix_cache.index.cpu_table import CpuTable

INT64 = (-(2**63), 2**63 - 1)
TABLES = ["triton", "cpu/c", "cpu/numpy", "reference"]


def table_factory(kind: str, kernel_device: str):
    """(PrefixIndex's `backend` argument, the device) for one of TABLES."""
    if kind == "triton":
        return "triton", kernel_device
    if kind == "reference":
        return index_reference.ReferenceTable, kernel_device
    probe = kind.partition("/")[2]
    if probe == "c" and cpu_table_c.load() is None:
        pytest.skip("no working C compiler here: the CPU table probes with numpy")
    return functools.partial(CpuTable, probe=probe), "cpu"


@pytest.fixture(params=TABLES)
def make_index(request, kernel_device):
    backend, device = table_factory(request.param, kernel_device)

    def make(capacity: int) -> PrefixIndex:
        return PrefixIndex(capacity, device=device, backend=backend)

    make.device = torch.device(device)
    make.kind = request.param
    return make


def rand_keys(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(*INT64, (n, 2), generator=g, dtype=torch.int64)


def as_dict(keys: torch.Tensor, values: torch.Tensor) -> dict[tuple[int, int], int]:
    d: dict[tuple[int, int], int] = {}
    for k, v in zip(keys.tolist(), values.tolist()):
        d[tuple(k)] = v
    return d


def expect_lookup(d: dict, keys: torch.Tensor) -> list[int]:
    return [d.get(tuple(k), -1) for k in keys.tolist()]


def assert_equal_lists(got: list, want: list, what: str) -> None:
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert len(got) == len(want) and not bad, (
        f"{what}: {len(bad)} mismatches, first at {bad[:8]}: got {[got[i] for i in bad[:8]]}, "
        f"want {[want[i] for i in bad[:8]]}"
    )


@pytest.mark.parametrize("n", [1, 17, 1000, 10_000, 100_000])
def test_insert_lookup_matches_dict(make_index, n):
    idx = make_index(n)  # load factor up to 0.5 by construction
    dev = make_index.device
    keys = rand_keys(n, seed=n)
    values = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    new = idx.insert(keys.to(dev), values.to(dev))
    assert bool(new.all()) and len(idx) == n and 0 < idx.load_factor <= 0.5
    absent = rand_keys(min(n, 5000), seed=n + 1)
    query = torch.cat([keys, absent])[torch.randperm(n + absent.shape[0])]
    got = idx.lookup(query.to(dev)).cpu().tolist()
    assert_equal_lists(got, expect_lookup(as_dict(keys, values), query), "lookup")


def test_backends_share_one_layout(kernel_device):
    """A table written by any backend is read correctly by every other one and by the reference."""
    keys, vals = rand_keys(3000, 7), torch.arange(3000, dtype=torch.int32)
    # tombstones on the way: removed keys sit between the home slots and the keys read back
    gone = rand_keys(500, 8)
    for writer_kind in TABLES:
        backend, device = table_factory(writer_kind, kernel_device)
        writer = PrefixIndex(4000, device=device, backend=backend)
        writer.insert(gone.to(device), torch.zeros(500, dtype=torch.int32, device=device))
        writer.insert(keys.to(device), vals.to(device))
        writer.remove(gone.to(device))
        for reader_kind in TABLES:
            backend, device = table_factory(reader_kind, kernel_device)
            reader = PrefixIndex(4000, device=device, backend=backend)
            reader.table.slot_keys.copy_(writer.table.slot_keys)
            reader.table.slot_values.copy_(writer.table.slot_values)
            q = torch.cat([keys, gone])
            want = vals.tolist() + [-1] * 500
            got = reader.lookup(q.to(device)).cpu().tolist()
            assert_equal_lists(got, want, f"{writer_kind} read by {reader_kind}")

def test_one_hash_everywhere(kernel_device):
    """keys.hash_words is the one hash: torch, numpy, the Triton kernels and the C probe agree."""
    from triton_prefix_cache.kernels import hash_table

    structured = torch.stack([torch.arange(500), torch.full((500,), 7)], dim=1)  # counters
    keys = K.sanitize(torch.cat([rand_keys(5000, 8), structured, structured.flip(1)]))
    for num_slots in (16, 1 << 12, 1 << 30):
        want = K.home_slot(keys, num_slots)
        assert_equal_lists(K.home_slot(keys.numpy(), num_slots).tolist(), want.tolist(), "numpy home")
        got = hash_table.home_slot(keys.to(kernel_device), num_slots).cpu()
        assert_equal_lists(got.tolist(), want.tolist(), "Triton home")
        if cpu_table_c.load() is not None:
            got = cpu_table_c.home_slot(keys.numpy(), num_slots)
            assert_equal_lists(got.tolist(), want.tolist(), "C home")


def test_keys_sharing_first_word(make_index):
    dev = make_index.device
    n = 4000
    keys = rand_keys(n, 3)
    keys[:, 0] = 0x1234  # every key has the same first word
    keys[n // 2 :, 0] = -5  # two groups
    vals = torch.arange(n, dtype=torch.int32)
    idx = make_index(n)
    idx.insert(keys.to(dev), vals.to(dev))
    probe = keys.clone()
    probe[:, 1] += 1  # same first word, second word off by one: must miss (unless it hits another key)
    d = as_dict(keys, vals)
    q = torch.cat([keys, probe])
    assert_equal_lists(idx.lookup(q.to(dev)).cpu().tolist(), expect_lookup(d, q), "lookup")


def keys_in_few_buckets(n: int, num_slots: int, buckets: int, seed: int) -> torch.Tensor:
    """Distinct random keys whose home slot (the shared hash) is one of `buckets` slots."""
    out, g = [], torch.Generator().manual_seed(seed)
    while sum(x.shape[0] for x in out) < n:
        cand = torch.randint(*INT64, (200_000, 2), generator=g, dtype=torch.int64)
        out.append(cand[K.home_slot(cand, num_slots) < buckets])
    return torch.unique(torch.cat(out), dim=0)[:n]


def test_keys_forced_into_few_buckets(make_index):
    dev = make_index.device
    idx = make_index(600)
    keys = keys_in_few_buckets(600, idx.num_slots, buckets=3, seed=5)
    vals = torch.arange(600, dtype=torch.int32)
    assert bool(idx.insert(keys.to(dev), vals.to(dev)).all())
    d = as_dict(keys, vals)
    q = torch.cat([keys, keys_in_few_buckets(300, idx.num_slots, buckets=3, seed=6)])
    assert_equal_lists(idx.lookup(q.to(dev)).cpu().tolist(), expect_lookup(d, q), "lookup")
    # Remove every other key from the long chain: the keys behind the tombstones stay findable.
    gone = idx.remove(keys[::2].to(dev))
    assert bool(gone.all())
    for k in keys[::2].tolist():
        del d[tuple(k)]
    assert_equal_lists(idx.lookup(q.to(dev)).cpu().tolist(), expect_lookup(d, q), "lookup after remove")
    # New keys of the same buckets, each three times in one batch, land on the tombstones: every
    # key must take exactly one slot, reported new once.
    fresh = keys_in_few_buckets(250, idx.num_slots, buckets=3, seed=7)
    batch = torch.cat([fresh, fresh.flip(0), fresh])
    bvals = torch.arange(750, dtype=torch.int32)
    want_new = [tuple(k) not in d for k in fresh.tolist()] + [False] * 500
    d.update(as_dict(batch, bvals))
    assert_equal_lists(idx.insert(batch.to(dev), bvals.to(dev)).cpu().tolist(), want_new, "new flags")
    stored, _ = idx.items()
    assert stored.shape[0] == len(idx) == len(d), "a key was stored twice"
    assert_equal_lists(idx.lookup(q.to(dev)).cpu().tolist(), expect_lookup(d, q), "lookup after reuse")


def test_duplicates_in_one_batch(make_index):
    """Last occurrence's value wins; newness is reported once, at the first occurrence."""
    dev = make_index.device
    g = torch.Generator().manual_seed(9)
    base = rand_keys(300, 11)
    idx = make_index(400)
    idx.insert(base[:100].to(dev), torch.zeros(100, dtype=torch.int32, device=dev))
    pick = torch.randint(0, 300, (2000,), generator=g)
    keys, vals = base[pick], torch.randint(0, 2**31 - 1, (2000,), generator=g, dtype=torch.int32)
    want_new, d = [], {tuple(k): 0 for k in base[:100].tolist()}
    for k, v in zip(keys.tolist(), vals.tolist()):
        want_new.append(tuple(k) not in d)
        d[tuple(k)] = v
    new = idx.insert(keys.to(dev), vals.to(dev))
    assert_equal_lists(new.cpu().tolist(), want_new, "new flags")
    assert len(idx) == len(d)
    assert_equal_lists(idx.lookup(base.to(dev)).cpu().tolist(), expect_lookup(d, base), "values")
    # remove with duplicates: the first occurrence of a present key reports True
    pick = torch.randint(0, 300, (500,), generator=g)
    rm = base[pick]
    want_rm = []
    for k in rm.tolist():
        want_rm.append(d.pop(tuple(k), None) is not None)
    assert_equal_lists(idx.remove(rm.to(dev)).cpu().tolist(), want_rm, "removed flags")
    assert len(idx) == len(d)


def test_remove_reinsert_cycles_past_rebuild(make_index):
    dev = make_index.device
    cap = 512
    idx = make_index(cap)
    universe = rand_keys(3 * cap, 21)
    g = torch.Generator().manual_seed(22)
    d: dict[tuple[int, int], int] = {}
    for cycle in range(12):
        # Fill up to capacity with fresh keys, then remove about 70% of what is there.
        missing = [i for i, k in enumerate(universe.tolist()) if tuple(k) not in d]
        take = torch.tensor(missing)[torch.randperm(len(missing), generator=g)][: cap - len(d)]
        keys = universe[take]
        vals = torch.randint(0, 1000, (keys.shape[0],), generator=g, dtype=torch.int32)
        assert bool(idx.insert(keys.to(dev), vals.to(dev)).all())
        d.update(as_dict(keys, vals))
        assert len(idx) == len(d) == cap
        present = torch.tensor([list(k) for k in d], dtype=torch.int64)
        rm = present[torch.randperm(len(d), generator=g)[: int(0.7 * len(d))]]
        assert bool(idx.remove(rm.to(dev)).all())
        for k in rm.tolist():
            del d[tuple(k)]
        assert_equal_lists(
            idx.lookup(universe.to(dev)).cpu().tolist(), expect_lookup(d, universe), f"cycle {cycle}"
        )
        assert idx.tombstones <= K_REBUILD * idx.num_slots
    assert idx.rebuilds > 0


K_REBUILD = 0.25


def test_capacity_is_enforced_and_nothing_changes(make_index):
    dev = make_index.device
    idx = make_index(100)
    keys = rand_keys(130, 31).to(dev)
    vals = torch.arange(130, dtype=torch.int32, device=dev)
    idx.insert(keys[:90], vals[:90])
    before = idx.lookup(keys).cpu()
    with pytest.raises(IndexFullError, match="capacity of 100"):
        idx.insert(keys[80:120], vals[80:120] + 1000)  # 30 new keys: 120 > 100
    assert len(idx) == 90 and torch.equal(idx.lookup(keys).cpu(), before)
    # Exactly to capacity, with duplicates and updates that must not count as new keys.
    batch = torch.cat([keys[80:100], keys[90:100], keys[:5]])
    idx.insert(batch, torch.arange(35, dtype=torch.int32, device=dev))
    assert len(idx) == 100


def test_reserved_first_words_are_still_keys(make_index):
    dev = make_index.device
    specials = [K.EMPTY, K.TOMBSTONE, K.BUSY, K.NEVER]
    keys = torch.tensor([[w, 7] for w in specials] + [[K.FIRST_REAL, 8], [0, 0], [-1, -1]], dtype=torch.int64)
    idx = make_index(16)
    vals = torch.arange(keys.shape[0], dtype=torch.int32)
    idx.insert(keys.to(dev), vals.to(dev))
    got = idx.lookup(keys.to(dev)).cpu().tolist()
    # The four reserved first words fold onto FIRST_REAL: with the same second word they are one key.
    assert got[:4] == [3, 3, 3, 3] and got[4:] == [4, 5, 6]
    assert len(idx) == 4


def test_one_key_lookup_from_block_hashes_answers_as_a_dict_of_keys(make_index):
    """count_leading of one key (the scheduler's first-block test) is `key in the index` for keys
    from block hashes; the reserved first words fold as everywhere else (sha256-sized and 16-byte
    hashes)."""
    dev = make_index.device
    hashes = [hashlib.sha256(str(i).encode()).digest() for i in range(40)]
    hashes += [hashlib.md5(str(i).encode()).digest() for i in range(40)]
    # a hash whose first word is a reserved marker, and one that folds onto the same key as it
    hashes.append(K.TOMBSTONE.to_bytes(8, "little", signed=True) + (9).to_bytes(8, "little") + b"x" * 16)
    folded = K.EMPTY.to_bytes(8, "little", signed=True) + (9).to_bytes(8, "little") + b"y" * 16
    keys = keys_from_block_hashes(hashes[:40]), keys_from_block_hashes(hashes[40:80])
    idx = make_index(256)
    present = set(range(0, 80, 3)) | {80}
    for group, base in ((keys[0], 0), (keys[1], 40)):
        rows = [i - base for i in sorted(present) if base <= i < base + 40]
        idx.insert(group[rows].to(dev), torch.arange(len(rows), dtype=torch.int32).to(dev))
    idx.insert(keys_from_block_hashes(hashes[80:]).to(dev), torch.zeros(1, dtype=torch.int32).to(dev))
    def contains(h: bytes) -> bool:
        return idx.count_leading(keys_from_block_hashes([h]).to(dev)) == 1

    for i, h in enumerate(hashes):
        assert contains(h) == (i in present), i
    assert contains(folded)  # same key as hashes[80] once folded
    assert not contains(hashlib.sha256(b"absent").digest())


def match_prefix_oracle(d: dict, keys: torch.Tensor, offsets: list[int]) -> tuple[list[int], list[int]]:
    values = expect_lookup(d, keys)
    counts = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        c = 0
        while a + c < b and values[a + c] >= 0:
            c += 1
        counts.append(c)
    return counts, values


def test_match_prefix(make_index):
    dev = make_index.device
    g = torch.Generator().manual_seed(41)
    stored = rand_keys(2000, 42)
    idx = make_index(2000)
    vals = torch.arange(2000, dtype=torch.int32)
    idx.insert(stored.to(dev), vals.to(dev))
    d = as_dict(stored, vals)
    foreign = rand_keys(2000, 43)
    reqs = []
    for i in range(64):
        n = int(torch.randint(0, 40, (1,), generator=g))
        kind = i % 4
        if kind == 0:  # full hit
            r = stored[torch.randint(0, 2000, (n,), generator=g)]
        elif kind == 1:  # hit, then a miss, then present keys again (must not count)
            r = stored[torch.randint(0, 2000, (n,), generator=g)]
            if n:
                r[int(torch.randint(0, n, (1,), generator=g))] = foreign[i]
        elif kind == 2:  # all missing
            r = foreign[torch.randint(0, 2000, (n,), generator=g)]
        else:  # empty request
            r = stored[:0]
        reqs.append(r)
    keys = torch.cat(reqs)
    offsets = [0]
    for r in reqs:
        offsets.append(offsets[-1] + r.shape[0])
    counts, values = idx.match_prefix(keys.to(dev), torch.tensor(offsets, device=dev))
    want_counts, want_values = match_prefix_oracle(d, keys, offsets)
    assert_equal_lists(counts.cpu().tolist(), want_counts, "counts")
    assert_equal_lists(values.cpu().tolist(), want_values, "values")
    # No requests at all, and one long request.
    c, v = idx.match_prefix(stored[:0].to(dev), torch.zeros(1, dtype=torch.int64, device=dev))
    assert c.shape == (0,) and v.shape == (0,)
    long = torch.cat([stored, foreign[:1], stored[:10]])
    c, _ = idx.match_prefix(long.to(dev), torch.tensor([0, long.shape[0]], device=dev))
    assert c.tolist() == [2000]
    # count_leading: one request, the same answer as match_prefix's oracle.
    for r in [*reqs, long]:
        assert idx.count_leading(r.to(dev)) == match_prefix_oracle(d, r, [0, r.shape[0]])[0][0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["insert", "remove", "lookup"]),
            st.lists(st.integers(0, 47), min_size=0, max_size=24),
            st.integers(0, 1000),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_random_operation_sequences_match_dict(make_index, ops):
    """Any sequence of batched operations over a small key universe behaves like a dict."""
    dev = make_index.device
    universe = rand_keys(48, 51)
    universe[:16, 0] = 99  # a third of the keys share their first word
    idx = make_index(48)
    d: dict[tuple[int, int], int] = {}
    for op, picks, salt in ops:
        keys = universe[picks] if picks else universe[:0]
        if op == "insert":
            vals = torch.tensor([(salt + 7 * i) % 1000 for i in range(len(picks))], dtype=torch.int32)
            want = []
            for k, v in zip(keys.tolist(), vals.tolist()):
                want.append(tuple(k) not in d)
                d[tuple(k)] = v
            got = idx.insert(keys.to(dev), vals.to(dev)).cpu().tolist()
        elif op == "remove":
            want = [d.pop(tuple(k), None) is not None for k in keys.tolist()]
            got = idx.remove(keys.to(dev)).cpu().tolist()
        else:
            want, got = expect_lookup(d, keys), idx.lookup(keys.to(dev)).cpu().tolist()
        assert got == want, (op, picks)
        assert len(idx) == len(d)
    assert_equal_lists(idx.lookup(universe.to(dev)).cpu().tolist(), expect_lookup(d, universe), "final")


def test_clear_and_items(make_index):
    dev = make_index.device
    idx = make_index(64)
    keys = rand_keys(50, 61)
    idx.insert(keys.to(dev), torch.arange(50, dtype=torch.int32, device=dev))
    k, v = idx.items()
    assert as_dict(k.cpu(), v.cpu()) == as_dict(keys, torch.arange(50, dtype=torch.int32))
    idx.clear()
    assert len(idx) == 0 and bool((idx.lookup(keys.to(dev)) == -1).all())
    idx.insert(keys.to(dev), torch.arange(50, dtype=torch.int32, device=dev))
    assert len(idx) == 50


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (lambda: torch.zeros((4, 2), dtype=torch.int32), TypeError, "keys: expected dtype torch.int64"),
        (lambda: torch.zeros((4, 3), dtype=torch.int64), ValueError, r"keys: expected shape \(n, 2\)"),
        (lambda: torch.zeros(8, dtype=torch.int64), ValueError, r"keys: expected shape \(n, 2\)"),
        (
            lambda: torch.zeros((4, 2), dtype=torch.int64, device="meta"),
            ValueError,
            "keys: expected a tensor on",
        ),
        (lambda: [[1, 2]], TypeError, "keys: expected a torch.Tensor"),
    ],
)
def test_bad_keys_name_the_argument(make_index, bad, exc, match):
    idx = make_index(8)
    with pytest.raises(exc, match=match):
        idx.lookup(bad())
    with pytest.raises(exc, match=match):
        idx.remove(bad())


def test_bad_values_and_offsets(make_index):
    dev = make_index.device
    idx = make_index(8)
    keys = rand_keys(4, 71).to(dev)
    with pytest.raises(TypeError, match=r"values: expected dtype torch\.int32"):
        idx.insert(keys, torch.zeros(4, dtype=torch.int64, device=dev))
    with pytest.raises(ValueError, match=r"values: expected shape \(4,\)"):
        idx.insert(keys, torch.zeros(3, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match=r"values: must be >= 0"):
        idx.insert(keys, torch.tensor([0, 1, -1, 2], dtype=torch.int32, device=dev))
    assert len(idx) == 0
    with pytest.raises(TypeError, match=r"offsets: expected dtype torch\.int64"):
        idx.match_prefix(keys, torch.tensor([0, 4], dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match="offsets: must be non-decreasing from 0 to len"):
        idx.match_prefix(keys, torch.tensor([0, 3], device=dev))
    with pytest.raises(ValueError, match="offsets: must be non-decreasing"):
        idx.match_prefix(keys, torch.tensor([0, 3, 2, 4], device=dev))


def test_bad_constructor_arguments(monkeypatch):
    with pytest.raises(ValueError, match=r"capacity: expected a positive int"):
        PrefixIndex(0)
    with pytest.raises(ValueError, match=r"capacity: expected a positive int"):
        PrefixIndex(2.5)
    with pytest.raises(ValueError, match="backend: expected 'auto', 'triton' or 'cpu'"):
        PrefixIndex(8, backend="cuda")
    with pytest.raises(ValueError, match="device: expected 'cpu' or a CUDA device"):
        PrefixIndex(8, device="meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        PrefixIndex(8, device="cpu", backend="triton")
    idx = PrefixIndex(100)
    assert idx.num_slots >= 200 and idx.num_slots & (idx.num_slots - 1) == 0
    assert idx.backend == ("triton" if idx.device.type == "cuda" else "cpu")


def test_auto_is_resolved_in_one_place():
    """"auto": the CPU table unless the table must live in CUDA memory; the device follows the backend
    where the caller leaves it open (an engine's scheduler does)."""
    cpu = torch.device("cpu")
    assert B.resolve_backend("auto") == ("cpu", cpu)
    assert B.resolve_backend("auto", "cpu") == ("cpu", cpu)
    assert B.resolve_backend("cpu") == ("cpu", cpu)
    assert B.resolve_backend("triton", "cpu") == ("triton", cpu)  # the interpreter (conftest.py)
    if torch.cuda.is_available():
        cuda = torch.device("cuda", torch.cuda.current_device())
        assert B.resolve_backend("auto", "cuda") == ("triton", cuda)
        assert B.resolve_backend("triton") == ("triton", cuda)
        with pytest.raises(ValueError, match="'cpu' keeps its table in host memory"):
            B.resolve_backend("cpu", "cuda")
    else:
        assert B.resolve_backend("triton") == ("triton", cpu)
    assert PrefixIndex(8, device=None).backend == "cpu"
    with pytest.raises(ValueError, match=r"backend: expected 'auto', 'triton' or 'cpu' \('torch' is"):
        B.resolve_backend("gpu")


def test_torch_is_a_deprecated_alias_of_cpu(caplog):
    B._warn_deprecated.cache_clear()  # the warning is logged once per process
    with caplog.at_level(logging.WARNING, logger=B.__name__):
        assert PrefixIndex(8, backend="torch").backend == "cpu"
        assert B.resolve_backend("torch") == ("cpu", torch.device("cpu"))
    warnings = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "'torch'" in warnings[0].getMessage(), caplog.text


def test_cpu_table_probes():
    """The CPU table probes in C where a compiler works, else in numpy; an impossible ask raises."""
    assert CpuTable(16).probe == ("c" if cpu_table_c.load() is not None else "numpy")
    assert CpuTable(16, probe="numpy").probe == "numpy"
    with pytest.raises(ValueError, match="probe: expected 'c', 'numpy' or None"):
        CpuTable(16, probe="torch")
    with pytest.raises(ValueError, match="host memory"):
        CpuTable(16, device="meta")


# ---- keys from vLLM block hashes ---------------------------------------------------------------


@pytest.mark.parametrize("width", [32, 16])
def test_keys_from_block_hashes(width):
    hashes = [hashlib.sha256(str(i).encode()).digest()[:width] for i in range(1000)]
    keys = keys_from_block_hashes(hashes)
    want = [
        [int.from_bytes(h[0:8], "little", signed=True), int.from_bytes(h[8:16], "little", signed=True)]
        for h in hashes
    ]
    assert keys.dtype == torch.int64 and keys.shape == (1000, 2) and keys.tolist() == want
    assert keys_from_block_hashes([]).shape == (0, 2)


def test_keys_from_block_hashes_rejects_bad_input():
    with pytest.raises(ValueError, match="16- or 32-byte"):
        keys_from_block_hashes([b"\x00" * 8])
    with pytest.raises(ValueError, match="same length"):
        keys_from_block_hashes([b"\x00" * 32, b"\x00" * 16])


# ---- GPU only: concurrency that the (serializing) interpreter cannot exercise ------------------


@pytest.mark.gpu
def test_concurrent_inserts_into_few_buckets_gpu():
    """1e6 insert lanes hammering 1024 keys whose homes are 8 slots: one slot per key, last wins."""
    dev = "cuda"
    idx = PrefixIndex(4096, device=dev, backend="triton")
    distinct = keys_in_few_buckets(1024, idx.num_slots, buckets=8, seed=81)
    g = torch.Generator().manual_seed(82)
    pick = torch.randint(0, 1024, (1_000_000,), generator=g)
    keys = distinct[pick]
    vals = torch.randint(0, 2**31 - 1, (1_000_000,), generator=g, dtype=torch.int32)
    new = idx.insert(keys.to(dev), vals.to(dev)).cpu()
    last = torch.full((1024,), -1, dtype=torch.int64)
    last.scatter_reduce_(0, pick, torch.arange(1_000_000), reduce="amax")
    first = torch.full((1024,), 1_000_000, dtype=torch.int64)
    first.scatter_reduce_(0, pick, torch.arange(1_000_000), reduce="amin")
    assert len(idx) == 1024, "a key was claimed twice (or lost)"
    want_new = torch.zeros(1_000_000, dtype=torch.bool)
    want_new[first] = True
    assert torch.equal(new, want_new)
    assert torch.equal(idx.lookup(distinct.to(dev)).cpu(), vals[last])
    k, _ = idx.items()
    assert torch.unique(k.cpu(), dim=0).shape[0] == 1024


@pytest.mark.gpu
def test_concurrent_distinct_inserts_sharing_first_word_gpu():
    dev = "cuda"
    n = 1_000_000
    keys = rand_keys(n, 91)
    keys[:, 0] = 42
    keys = torch.unique(keys, dim=0)
    n = keys.shape[0]
    idx = PrefixIndex(n, device=dev, backend="triton")
    vals = torch.arange(n, dtype=torch.int32)
    assert bool(idx.insert(keys.to(dev), vals.to(dev)).all())
    assert len(idx) == n
    assert torch.equal(idx.lookup(keys.to(dev)).cpu(), vals)
    ref = PrefixIndex(n, device=dev, backend=index_reference.ReferenceTable)
    ref.insert(keys.to(dev), vals.to(dev))
    q = torch.cat([keys[::3], rand_keys(10_000, 92)]).to(dev)
    assert torch.equal(idx.lookup(q), ref.lookup(q))



@pytest.mark.gpu
def test_gpu_cpu_inputs_are_answered_on_the_cpu_as_device_inputs_are():
    """A CUDA index called with CPU tensors (the scheduler's calls, staged through mapped memory)
    answers on the CPU exactly what it answers device tensors, and what a dict answers. 5,000 keys
    outgrow the first staging buffer."""
    dev = "cuda"
    keys = torch.unique(rand_keys(5000, 101), dim=0)
    n = keys.shape[0]
    vals = torch.arange(n, dtype=torch.int32)
    host = PrefixIndex(8192, device=dev, backend="triton")
    devi = PrefixIndex(8192, device=dev, backend="triton")
    new_h = host.insert(keys[:3000], vals[:3000])
    new_d = devi.insert(keys[:3000].to(dev), vals[:3000].to(dev))
    assert new_h.device.type == "cpu" and torch.equal(new_h, new_d.cpu()) and bool(new_h.all())
    rem_h = host.remove(keys[:500])
    assert rem_h.device.type == "cpu" and torch.equal(rem_h, devi.remove(keys[:500].to(dev)).cpu())
    assert len(host) == len(devi) == 2500
    oracle = as_dict(keys[500:3000], vals[500:3000])
    q = torch.cat([keys, rand_keys(1000, 102)])
    got = host.lookup(q)
    assert got.device.type == "cpu" and torch.equal(got, devi.lookup(q.to(dev)).cpu())
    assert got.tolist() == [oracle.get(tuple(k), -1) for k in q.tolist()]
    offsets = torch.tensor([0, 100, 100, 2500, 3000, q.shape[0]])
    counts_h, values_h = host.match_prefix(q, offsets)
    counts_d, values_d = devi.match_prefix(q.to(dev), offsets.to(dev))
    assert torch.equal(counts_h, counts_d.cpu()) and torch.equal(values_h, values_d.cpu())
    bounds = offsets.tolist()
    assert counts_h.tolist() == [leading(oracle, q[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    assert counts_h.tolist() == [0, 0, 0, 500, 0]  # keys[2500:3000] present, the others start removed
    assert host.count_leading(keys[500:3000]) == 2500 == devi.count_leading(keys[500:3000].to(dev))
    assert host.count_leading(keys[0:10]) == 0


@pytest.mark.gpu
def test_gpu_cpu_input_calls_wait_for_neither_the_callers_stream_nor_bulk_copies():
    """The scheduler's index calls never wait for the forward queued on the engine's stream nor for
    KV copies on the copy engines (checked by event states: those are still running when the
    calls have returned their answers)."""
    dev = torch.device("cuda")
    idx = PrefixIndex(1024, device=dev, backend="triton")
    keys = torch.unique(rand_keys(256, 103), dim=0)
    vals = torch.arange(keys.shape[0], dtype=torch.int32)
    offsets = torch.tensor([0, keys.shape[0]])

    def calls():
        idx.insert(keys, vals)
        return idx.lookup(keys), idx.count_leading(keys), idx.match_prefix(keys, offsets)[0], idx.remove(keys)

    calls()  # compiles every kernel first
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream(dev)
    torch.cuda._sleep(4_000_000_000)  # about two seconds of the caller's stream
    busy = torch.cuda.current_stream().record_event()
    with torch.cuda.stream(side):
        for _ in range(32):  # 32 GiB device to host: about half a second of a copy engine
            pinned.copy_(big, non_blocking=True)
        copying = side.record_event()
    got, leading, counts, removed = calls()
    assert not busy.query() and not copying.query(), "an index call waited for the engine's work"
    assert torch.equal(got, vals) and leading == keys.shape[0] and counts.tolist() == [keys.shape[0]]
    assert bool(removed.all()) and len(idx) == 0
    torch.cuda.synchronize()


# ---- MatchBatcher: a pass's lookups in one launch ------------------------------------------------


def leading(d: dict, keys: torch.Tensor) -> int:
    n = 0
    for k in keys.tolist():
        if tuple(k) not in d:
            break
        n += 1
    return n


@pytest.mark.parametrize("batch", [True, False])
def test_batched_matches_equal_lone_lookups_as_the_index_changes(make_index, batch):
    """Requests sharing prefixes, asked in random passes while keys come and go: every answer
    (count and values), batched or not, is what a dict says of that request alone at that moment."""
    import random

    from triton_prefix_cache.index import MatchBatcher

    rng = random.Random(11)
    idx = make_index(1024)
    dev = make_index.device
    docs = [rand_keys(40, 300 + i) for i in range(3)]
    reqs = {f"r{i}": torch.cat([docs[i % 3][: rng.randrange(5, 41)], rand_keys(8, 400 + i)])
            for i in range(10)}
    universe = torch.unique(torch.cat(list(reqs.values())), dim=0)
    d: dict[tuple[int, int], int] = {}
    b = MatchBatcher(idx, batch=batch)
    for step in range(8):
        # the index changes between passes: some keys in, some out
        order = [torch.randperm(universe.shape[0], generator=torch.Generator().manual_seed(s + step))
                 for s in (0, 90)]
        add = universe[order[0][:60]]
        vals = torch.randint(0, 1000, (add.shape[0],), dtype=torch.int32,
                             generator=torch.Generator().manual_seed(50 + step))
        idx.insert(add.to(dev), vals.to(dev))
        d.update(as_dict(add, vals))
        gone = universe[order[1][:25]]
        idx.remove(gone.to(dev))
        for k in gone.tolist():
            d.pop(tuple(k), None)
        for rid in rng.sample(sorted(reqs), 6):
            keys = reqs[rid]
            start = rng.choice([0, 0, 3])
            got = b.match(rid, start, keys[start:])
            assert got == leading(d, keys[start:]), (step, rid, start)
            assert b.values(rid).tolist() == [d[tuple(k)] for k in keys[start : start + got].tolist()]
        if step % 3 == 2:
            b.forget(rng.choice(sorted(reqs)))


def test_batcher_launches_once_per_index_state_for_the_requests_it_expects():
    from triton_prefix_cache.index import MatchBatcher

    idx = PrefixIndex(256, device="cpu", backend="cpu")
    keys = {r: rand_keys(6, 500 + i) for i, r in enumerate("ABC")}
    idx.insert(torch.cat(list(keys.values())), torch.arange(18, dtype=torch.int32))
    assert not MatchBatcher(idx).batch  # a CPU table answers the request asked alone by default
    b = MatchBatcher(idx, batch=True)
    for r in "ABC":  # each asked for the first time: a launch of its own
        assert b.match(r, 0, keys[r]) == 6
    assert (b.launches, b.requests_probed) == (3, 3)
    for r in "ABC":  # the same pass again, nothing changed: no launch
        assert b.match(r, 0, keys[r]) == 6
    assert b.launches == 3
    idx.remove(keys["C"][2:3])  # the index changed: the next question re-asks every expected range
    assert b.match("B", 0, keys["B"]) == 6
    assert (b.launches, b.requests_probed) == (4, 6)
    assert b.match("A", 0, keys["A"]) == 6 and b.match("C", 0, keys["C"]) == 2 and b.launches == 4
    assert b.match("B", 1, keys["B"][1:]) == 5  # another range of B: B alone
    assert (b.launches, b.requests_probed) == (5, 7)
    b.forget("A")
    idx.insert(keys["C"][2:3], torch.tensor([99], dtype=torch.int32))
    assert b.match("C", 0, keys["C"]) == 6 and b.values("C").tolist()[2] == 99
    assert (b.launches, b.requests_probed) == (6, 9)  # B and C, not A
    assert b.match("D", 0, keys["A"][:0]) == 0 and b.launches == 6  # an empty range needs no launch
    lone = MatchBatcher(idx, batch=False)  # unbatched: each question probes its own range only
    for r in "BC":
        assert lone.match(r, 0, keys[r]) == 6
    idx.remove(keys["A"][:1])
    assert lone.match("B", 0, keys["B"]) == 6 and (lone.launches, lone.requests_probed) == (3, 3)
