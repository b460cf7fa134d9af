"""Demote/promote between per-layer KV pages and host slots, against the obvious reference
`dst[dst_idx] = src[src_idx]` applied per layer (numpy), over random permutations, dtypes, page
sizes, layer counts and layouts (one tensor per layer, or all layers interleaved in one buffer).

Backends: "torch" and "triton" (interpreted) here; on the GPU host also "dma", everything compiled
and reading/writing pinned memory.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest
import torch

from triton_prefix_cache.copiers import DmaCopier, StagedCopier, dma_descriptors, merge_runs
from triton_prefix_cache.copy_engine import CopyEngine, byte_views, choose_backend
from triton_prefix_cache.host_pool import HostPool, HostPoolConfig
from triton_prefix_cache.kernels.copy import layout_of

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "triton"] + (["dma", "staged"] if HAS_CUDA else [])


def make_kv(
    nb: int,
    layers: int,
    block_shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    device: str,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-layer KV tensors [nb, *block_shape] filled with random bytes."""
    g = torch.Generator().manual_seed(seed)
    if layout == "separate":
        kv = [torch.empty((nb, *block_shape), dtype=dtype, device=device) for _ in range(layers)]
    else:  # one buffer, blocks outermost, layers next (vLLM 0.32's shared-buffer shape)
        buf = torch.empty((nb, layers, *block_shape), dtype=dtype, device=device)
        kv = [buf[:, i] for i in range(layers)]
    for t in kv:
        v = byte_views([t])[0]
        v.copy_(torch.randint(0, 256, tuple(v.shape), dtype=torch.uint8, generator=g).to(device))
    return kv


def make_pool(num_slots: int, layers: int, page: int, device: str) -> HostPool:
    return HostPool(
        HostPoolConfig(
            size_bytes=num_slots * layers * page,
            num_layers=layers,
            page_bytes=page,
            device=device,
            chunk_bytes=1 << 20,
        )
    )


def np_layers(views: list[torch.Tensor]) -> list[np.ndarray]:
    return [v.cpu().numpy().copy() for v in views]


def assert_bytes_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        bad = np.argwhere((got != want).reshape(got.shape[0], -1).any(axis=1)).ravel()
        raise AssertionError(f"{what}: {len(bad)} rows differ, first {bad[:8].tolist()}")


def reference_copy(views, pool, blocks, slots, to_host: bool, begin: int, count: int):
    """(layers, pool) as numpy arrays after `dst[idx] = src[idx]` for layers [begin, begin + count)."""
    dev, host = np_layers(views), pool.slots.numpy().copy()
    for layer in range(begin, begin + count):
        if to_host:
            host[slots, layer] = dev[layer][blocks]
        else:
            dev[layer][blocks] = host[slots, layer]
    return dev, host


def assert_matches_reference(views, pool, dev, host, what: str) -> None:
    assert_bytes_equal(pool.slots.numpy(), host, what)
    for layer, view in enumerate(views):
        assert_bytes_equal(view.numpy(), dev[layer], f"{what}, layer {layer}")


def run_round_trip(
    kernel_device: str,
    backend: str,
    layers: int,
    block_shape,
    dtype,
    layout: str,
    nb: int,
    nslots: int,
    n: int,
    seed: int = 0,
    **engine_kw,
) -> None:
    kv = make_kv(nb, layers, block_shape, dtype, layout, kernel_device, seed)
    views = byte_views(kv)
    page = views[0].shape[1]
    pool = make_pool(nslots, layers, page, kernel_device)
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    eng = CopyEngine(views, pool, backend=backend, **engine_kw)
    try:
        assert eng.backend == {"demote": backend, "promote": backend}
        rng = np.random.default_rng(seed)
        blocks = rng.permutation(nb)[:n]
        slots = rng.permutation(nslots)[:n]

        # demote: host[slot_i, l] = layer_l[block_i]
        want = pool.slots.numpy().copy()
        src = np_layers(views)
        for layer in range(layers):
            want[slots, layer] = src[layer][blocks]
        eng.demote(blocks, slots).wait()
        assert_bytes_equal(pool.slots.numpy(), want, f"demote ({backend})")

        # promote, whole and layer-wise: layer_l[block_i] = host[slot_i, l]
        for layerwise in (False, True):
            blocks2 = rng.permutation(nb)[:n]
            slots2 = rng.permutation(nslots)[:n]
            want_l = np_layers(views)
            host = pool.slots.numpy().copy()
            for layer in range(layers):
                want_l[layer][blocks2] = host[slots2, layer]
            h = eng.promote(torch.from_numpy(slots2), torch.from_numpy(blocks2), layerwise=layerwise)
            assert h.layerwise == layerwise
            h.wait()
            assert h.done()
            for layer in range(layers):
                assert_bytes_equal(
                    views[layer].cpu().numpy(), want_l[layer], f"promote layer {layer} ({backend})"
                )
        assert eng.stats.backend_fallbacks == 0, eng.unavailable
        assert eng.stats.blocks_to_host == n and eng.stats.blocks_from_host == 2 * n
    finally:
        eng.close()
        pool.close()


# 64 B pages with 16-byte alignment, 15-element pages (odd bytes: 1-byte words, masked tail), and a
# bigger page (several 16 KiB chunks per page when compiled).
GEOMETRIES = [(2, 4, 2), (3, 5), (4, 16, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("block_shape", GEOMETRIES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("layout", ["separate", "interleaved"])
def test_round_trip_matches_reference(kernel_device, backend, dtype, block_shape, layers, layout):
    run_round_trip(
        kernel_device,
        backend,
        layers,
        block_shape,
        dtype,
        layout,
        nb=11,
        nslots=9,
        n=6,
        seed=layers * 7 + len(block_shape),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_up_leaves_the_block_as_it_was(kernel_device, backend):
    """warm_up runs each copy path on one block and slot; only that slot changes, stats do not."""
    kv = make_kv(6, 3, (4, 16), torch.float16, "separate", kernel_device, seed=3)
    views = byte_views(kv)
    pool = make_pool(4, 3, views[0].shape[1], kernel_device)
    eng = CopyEngine(views, pool, backend=backend)
    try:
        before = np_layers(views)
        pool.slots.numpy()[:] = 7
        assert eng.warm_up(block=2, slot=1) >= 0
        for layer in range(3):
            assert_bytes_equal(views[layer].cpu().numpy(), before[layer], f"layer {layer} ({backend})")
            assert_bytes_equal(pool.slots.numpy()[1, layer], before[layer][2], f"slot ({backend})")
        assert (pool.slots.numpy()[[0, 2, 3]] == 7).all()
        assert eng.stats.demotes == eng.stats.promotes == 0
        with pytest.raises(ValueError, match="block"):
            eng.warm_up(block=6)
    finally:
        eng.close()
        pool.close()


def test_grid_stride_loop_with_few_programs(kernel_device):
    """Fewer programs than pages: each program walks several (the persistent-kernel path)."""
    run_round_trip(
        kernel_device,
        "triton",
        3,
        (4, 16, 64),
        torch.float16,
        "separate",
        nb=10,
        nslots=8,
        n=7,
        triton_max_programs=2,
        triton_chunk_bytes=1024,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["separate", "interleaved"])
def test_gpu_llama_8b_geometry(kernel_device, backend, layout):
    """32 layers of 64 KiB pages (Llama-3.1-8B, 16-token blocks): 2 MiB per block."""
    run_round_trip(
        kernel_device, backend, 32, (16, 8, 256), torch.bfloat16, layout, nb=160, nslots=140, n=128
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float32])
@pytest.mark.parametrize("block_shape", [(16, 2, 128), (32, 4, 64), (7, 3, 5)], ids=str)
def test_gpu_dtypes_and_page_sizes(kernel_device, backend, dtype, block_shape):
    run_round_trip(kernel_device, backend, 5, block_shape, dtype, "separate", nb=300, nslots=257, n=200)


def simulate_dma(dst: np.ndarray, src: np.ndarray, size: np.ndarray) -> None:
    for d, s, z in zip(dst.tolist(), src.tolist(), size.tolist()):
        ctypes.memmove(d, s, z)


@pytest.mark.parametrize("layout", ["separate", "interleaved"])
@pytest.mark.parametrize("to_host", [True, False])
def test_dma_descriptors_cover_exactly_the_pages(layout, to_host):
    """The descriptor plan, executed by memmove on the CPU, equals the reference; adjacent pages merge."""
    layers, nb, nslots, n = 4, 12, 10, 8
    views = byte_views(make_kv(nb, layers, (4, 8), torch.float32, layout, "cpu"))
    page = views[0].shape[1]
    pool = make_pool(nslots, layers, page, "cpu")
    try:
        pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
        lay = layout_of(views, pool.address, nslots)
        addrs = np.array(lay.layer_addresses, dtype=np.int64)
        strides = np.array(lay.layer_strides, dtype=np.int64)
        rng = np.random.default_rng(1)
        blocks, slots = rng.permutation(nb)[:n], rng.permutation(nslots)[:n]
        host_want, layer_want = pool.slots.numpy().copy(), np_layers(views)
        for layer in range(layers):
            if to_host:
                host_want[slots, layer] = layer_want[layer][blocks]
            else:
                layer_want[layer][blocks] = host_want[slots, layer]
        dst, src, size = dma_descriptors(lay, addrs, strides, blocks, slots, to_host, 0, layers)
        # Interleaved: a block's pages are adjacent on both sides, so at most one descriptor per
        # block, and one per run of consecutive blocks going to consecutive slots.
        if layout == "interleaved":
            runs = 1 + int(np.count_nonzero((np.diff(blocks) != 1) | (np.diff(slots) != 1)))
            assert len(dst) == runs
        else:
            assert len(dst) <= n * layers
        assert int(size.sum()) == n * layers * page
        simulate_dma(dst, src, size)
        assert_bytes_equal(pool.slots.numpy(), host_want, "host")
        for layer in range(layers):
            assert_bytes_equal(views[layer].numpy(), layer_want[layer], f"layer {layer}")
        # One layer at a time, layer-major (the layer-wise promote plan).
        d1, _, s1 = dma_descriptors(lay, addrs, strides, blocks, slots, to_host, 2, 1, block_major=False)
        assert len(d1) == n and int(s1.sum()) == n * page
    finally:
        pool.close()


def test_dma_copier_submits_in_slices(monkeypatch):
    """The DMA backend's plan, with a memmove standing in for the driver, in slices of 5 copies."""
    layers, nb, nslots, n = 3, 9, 7, 6
    views = byte_views(make_kv(nb, layers, (8,), torch.float32, "separate", "cpu"))
    pool = make_pool(nslots, layers, views[0].shape[1], "cpu")
    calls = []

    def fake_batch(dst, src, size, stream):
        calls.append((len(dst), stream))
        simulate_dma(dst, src, size)

    class FakeStream:
        cuda_stream = 1234

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    try:
        copier = DmaCopier(layout_of(views, pool.address, nslots), fake_batch)
        copier.max_descriptors = 5
        rng = np.random.default_rng(3)
        blocks, slots = rng.permutation(nb)[:n], rng.permutation(nslots)[:n]
        want = pool.slots.numpy().copy()
        for layer in range(layers):
            want[slots, layer] = views[layer].numpy()[blocks]
        copier.run(blocks, slots, None, None, True, 0, layers)
        assert_bytes_equal(pool.slots.numpy(), want, "dma demote")
        total = len(
            dma_descriptors(copier.layout, copier.addrs, copier.strides, blocks, slots, True, 0, layers)[0]
        )
        assert total > 10  # separate layers: (almost) one descriptor per page
        assert [c[0] for c in calls] == [5] * (total // 5) + ([total % 5] if total % 5 else [])
        assert {c[1] for c in calls} == {1234}
    finally:
        pool.close()


def test_runs_of_adjacent_pages_merge_for_one_layer():
    views = byte_views(make_kv(8, 1, (16,), torch.float32, "separate", "cpu"))
    lay = layout_of(views, 1 << 20, 8)
    addrs = np.array(lay.layer_addresses, dtype=np.int64)
    strides = np.array(lay.layer_strides, dtype=np.int64)
    blocks = np.array([0, 1, 2, 5, 6, 3])
    slots = np.array([4, 5, 6, 0, 1, 7])
    dst, src, size = dma_descriptors(lay, addrs, strides, blocks, slots, True, 0, 1)
    assert (size // 64).tolist() == [3, 2, 1]
    assert src.tolist() == [addrs[0], addrs[0] + 5 * 64, addrs[0] + 3 * 64]
    assert dst.tolist() == [(1 << 20) + 4 * 64, (1 << 20), (1 << 20) + 7 * 64]


def test_byte_views_of_any_dtype_and_stride():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    v = byte_views([t])[0]
    assert v.shape == (2, 48) and v.dtype == torch.uint8 and v.data_ptr() == t.data_ptr()
    buf = torch.zeros(5, 2, 3, dtype=torch.bfloat16)
    v1 = byte_views([buf[:, 0], buf[:, 1]])[1]
    assert v1.stride() == (12, 1) and v1.data_ptr() == buf[:, 1].data_ptr()
    with pytest.raises(ValueError, match="not one contiguous page"):
        byte_views([torch.zeros(4, 6).t()])


def test_bad_arguments_raise_clear_errors():
    views = byte_views(make_kv(6, 2, (8,), torch.float32, "separate", "cpu"))
    pool = make_pool(4, 2, 32, "cpu")
    eng = CopyEngine(views, pool, backend="torch")
    try:
        with pytest.raises(ValueError, match="lengths differ"):
            eng.demote([0, 1], [0])
        with pytest.raises(ValueError, match=r"host_slots: ids must lie in \[0, 4\)"):
            eng.demote([0], [4])
        with pytest.raises(ValueError, match=r"gpu_block_ids: ids must lie in \[0, 6\)"):
            eng.promote([0], [-1])
        with pytest.raises(ValueError, match="host_slots: destinations must be distinct"):
            eng.demote([0, 1], [2, 2])
        with pytest.raises(ValueError, match="gpu_block_ids: destinations must be distinct"):
            eng.promote([0, 1], [3, 3])
        with pytest.raises(TypeError, match="integer ids"):
            eng.demote([0.5], [1])
        eng.promote([1, 1], [0, 2]).wait()  # one slot into two blocks is fine
        assert eng.demote([], []).done()
    finally:
        eng.close()
    with pytest.raises(ValueError, match="backend"):
        CopyEngine(views, pool, backend="nvlink")
    with pytest.raises(ValueError, match="'dma' is not available"):
        CopyEngine(views, pool, backend="dma")
    with pytest.raises(ValueError, match="layers: 1 views"):
        CopyEngine(views[:1], pool)
    with pytest.raises(ValueError, match="pages of 16 bytes"):
        CopyEngine(byte_views(make_kv(6, 2, (4,), torch.float32, "separate", "cpu")), pool)
    with pytest.raises(ValueError, match=r"layers\[1\]: shape"):
        CopyEngine([views[0], views[1][:3]], pool)
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        CopyEngine(views, pool)


def test_a_failing_backend_falls_back_to_torch(kernel_device, monkeypatch, caplog):
    views = byte_views(make_kv(6, 2, (16,), torch.float32, "separate", kernel_device))
    pool = make_pool(5, 2, 64, kernel_device)
    eng = CopyEngine(views, pool, backend="triton")

    def broken(*a, **k):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(eng._copiers["triton"], "run", broken)
    try:
        h = eng.demote([4, 0], [1, 3])
        h.wait()
        assert h.backend == "torch" and eng.backend == {"demote": "torch", "promote": "torch"}
        assert eng.stats.backend_fallbacks == 1 and "triton" in eng.unavailable
        assert "falling back to torch" in caplog.text
        assert torch.equal(pool.slots[1, 1], views[1][4].cpu()) and torch.equal(
            pool.slots[3, 0], views[0][0].cpu()
        )
    finally:
        eng.close()
        pool.close()


def test_calibration_measures_every_backend_on_scratch_memory(kernel_device, caplog):
    views = byte_views(make_kv(8, 3, (4, 16), torch.float32, "separate", kernel_device))
    pool = make_pool(6, 3, views[0].shape[1], kernel_device)
    pool.slots.fill_(7)
    before = [v.clone() for v in views]
    eng = CopyEngine(views, pool, backend="torch")
    try:
        with caplog.at_level(logging.WARNING):
            res = eng.calibrate(num_blocks=4, repeats=1)
        assert set(res) == {"demote", "promote"}
        assert set(res["demote"]) == set(eng._copiers) and all(v > 0 for v in res["promote"].values())
        assert "views of it are alive" not in caplog.text  # the scratch pool was released cleanly
        assert all(torch.equal(a, b) for a, b in zip(views, before)) and bool((pool.slots == 7).all())
    finally:
        eng.close()
        pool.close()


def test_auto_choice_prefers_dma_unless_clearly_beaten():
    avail = {"dma": 1, "triton": 1, "torch": 1}
    assert choose_backend({"dma": 50.0, "triton": 52.0, "torch": 20.0}, avail) == "dma"  # within 5%
    assert choose_backend({"dma": 40.0, "triton": 52.0}, avail) == "triton"
    assert choose_backend({"triton": 30.0, "torch": 31.0}, avail) == "torch"
    assert choose_backend({}, avail) == "dma" and choose_backend({}, {"torch": 1}) == "torch"
    assert choose_backend({"dma": 99.0, "torch": 1.0}, {"torch": 1}) == "torch"  # measured but gone
    both = {"dma": 1, "staged": 1, "triton": 1}
    assert choose_backend({}, both) == "staged"
    assert choose_backend({"dma": 30.0, "staged": 50.0, "triton": 52.0}, both) == "staged"  # faster DMA kind
    assert choose_backend({"dma": 50.0, "staged": 40.0, "triton": 51.0}, both) == "dma"
    assert choose_backend({"dma": 30.0, "staged": 40.0, "triton": 52.0}, both) == "triton"


class _MemmoveBatch:
    """Stands in for cuMemcpyBatchAsync on the CPU: the same descriptors, copied with memmove."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # descriptors per call
        self.calls2d: list[int] = []  # rows per strided copy

    def __call__(self, dsts, srcs, sizes, stream) -> None:
        assert dsts.dtype == srcs.dtype == sizes.dtype == np.uint64 and len(dsts) == len(srcs) == len(sizes)
        self.calls.append(len(dsts))
        for d, s, z in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            ctypes.memmove(d, s, z)

    def copy2d(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:
        assert width <= min(dst_pitch, src_pitch) and height > 0
        self.calls2d.append(height)
        for i in range(height):
            ctypes.memmove(dst + i * dst_pitch, src + i * src_pitch, width)


@pytest.mark.skipif(HAS_CUDA, reason="CPU stand-in for the DMA; the GPU runs the staged round trips")
@pytest.mark.parametrize("layout", ["separate", "interleaved"])
@pytest.mark.parametrize("staging_slots", [1, 3, 64])
def test_staged_copier_matches_reference_in_chunks_and_layer_groups(layout, staging_slots):
    """Staged DMA (slot runs into a staging buffer + the Triton kernel) against `dst[idx] = src[idx]`,
    whole and in layer groups, through several chunks of the staging buffer; descriptors: one per
    run of consecutive slots."""
    layers, nb, nslots, n = 6, 40, 48, 17
    kv = make_kv(nb, layers, (4, 8), torch.bfloat16, layout, "cpu", seed=3)
    views = byte_views(kv)
    page = views[0].shape[1]
    pool = make_pool(nslots, layers, page, "cpu")
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    batch = _MemmoveBatch()
    # staging_bytes sizes each half for `staging_slots` whole slots (more rows for a layer group)
    staging = 2 * staging_slots * layers * page
    copier = StagedCopier(layout_of(views, pool.address, nslots), views, batch, staging)
    rng = np.random.default_rng(staging_slots)
    try:
        for to_host in (True, False):
            for begin, count in [(0, layers), *copier.layer_groups(layers)]:
                blocks = rng.permutation(nb)[:n]
                slots = rng.permutation(nslots)[:n]
                dev, host = reference_copy(views, pool, blocks, slots, to_host, begin, count)
                bt = torch.from_numpy(blocks)
                copier.run(blocks, slots, bt, torch.from_numpy(slots), to_host, begin, count)
                what = f"{'demote' if to_host else 'promote'} layers [{begin}, {begin + count})"
                assert_matches_reference(views, pool, dev, host, what)
        # consecutive slots of a whole-slot copy merge into one descriptor per staging chunk, but
        # never over a boundary between two pinned registrations of the pool (here: every 8 slots)
        batch.calls.clear()
        copier.run(np.arange(12), np.arange(20, 32), torch.arange(12), torch.arange(20, 32), False, 0, layers)
        per_chunk = min(staging_slots, 12)
        assert batch.calls == [1] * (12 // per_chunk) + ([1] if 12 % per_chunk else [])
        chunked = layout_of(views, pool.address, nslots, host_chunk_bytes=8 * layers * page)
        copier.layout = chunked
        batch.calls.clear()
        copier.run(np.arange(12), np.arange(20, 32), torch.arange(12), torch.arange(20, 32), False, 0, layers)
        if staging_slots == 64:
            assert batch.calls == [2]  # slots 20-23 | 24-31 (a registration starts at slot 24)
        dev, host = np_layers(views), pool.slots.numpy()
        assert all(np.array_equal(dev[layer][:12], host[20:32, layer]) for layer in range(layers))
    finally:
        del copier
        pool.close()


@pytest.mark.skipif(HAS_CUDA, reason="CPU stand-in for the DMA; the GPU runs the staged round trips")
@pytest.mark.parametrize("to_host", [False, True])
def test_staged_layer_groups_copy_slot_runs_as_strided_copies(to_host):
    """A layer group's rows of consecutive slots go as one strided copy per run (from MIN_2D_ROWS
    rows on, never over a pinned-registration boundary), the other rows as batch descriptors; the
    bytes equal the reference either way."""
    layers, nb, nslots = 8, 40, 48
    views = byte_views(make_kv(nb, layers, (4, 8), torch.float16, "separate", "cpu", seed=5))
    page = views[0].shape[1]
    pool = make_pool(nslots, layers, page, "cpu")
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    batch = _MemmoveBatch()
    # registrations of 8 slots: a run over slot 24 splits there
    layout = layout_of(views, pool.address, nslots, host_chunk_bytes=8 * layers * page)
    copier = StagedCopier(layout, views, batch, 2 * 64 * layers * page)  # one chunk per group
    # runs: 18-23 (6 rows) | 24-29 (6) | 33, 34 (2: descriptors) | 40 | 42-46 (5)
    slots = np.array([18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 33, 34, 40, 42, 43, 44, 45, 46])
    blocks = np.random.default_rng(1).permutation(nb)[: len(slots)]
    try:
        for begin, count in copier.layer_groups(layers):
            dev, host = reference_copy(views, pool, blocks, slots, to_host, begin, count)
            batch.calls.clear()
            batch.calls2d.clear()
            bt, st = torch.from_numpy(blocks), torch.from_numpy(slots)
            copier.run(blocks, slots, bt, st, to_host, begin, count)
            assert batch.calls2d == [6, 6, 5] and batch.calls == [3]
            what = f"{'demote' if to_host else 'promote'} layers [{begin}, {begin + count})"
            assert_matches_reference(views, pool, dev, host, what)
        # a whole-slot copy keeps merging consecutive slots into 1-D descriptors
        batch.calls.clear()
        batch.calls2d.clear()
        copier.run(blocks, slots, torch.from_numpy(blocks), torch.from_numpy(slots), to_host, 0, layers)
        assert batch.calls2d == [] and batch.calls == [5]  # 18-23 | 24-29 | 33-34 | 40 | 42-46
    finally:
        del copier
        pool.close()


def test_layer_groups_cover_every_layer_once():
    views = byte_views(make_kv(4, 3, (2, 4), torch.float32, "separate", "cpu"))
    pool = make_pool(4, 3, views[0].shape[1], "cpu")
    try:
        copier = StagedCopier(layout_of(views, pool.address, 4), views, _MemmoveBatch(), 1 << 16)
        for num_layers in (1, 3, 8, 13, 64):
            groups = copier.layer_groups(num_layers)
            assert len(groups) == min(num_layers, 8)
            flat = [layer for b, c in groups for layer in range(b, b + c)]
            assert flat == list(range(num_layers)) and all(c >= 1 for _, c in groups)
    finally:
        pool.close()
    d, s, z = merge_runs(np.array([0, 10, 20, 50], np.int64), np.array([5, 15, 25, 30], np.int64), 10)
    assert d.tolist() == [0, 50] and s.tolist() == [5, 30] and z.tolist() == [30, 10]
    d, s, z = merge_runs(
        np.array([0, 10, 20, 50], np.int64), np.array([5, 15, 25, 30], np.int64), 10, np.array([0, 0, 1, 1])
    )
    assert d.tolist() == [0, 20, 50] and z.tolist() == [20, 10, 10]  # not across chunks 0 | 1


class _FakeEvent:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waited = False

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.waited = True


def test_layer_events_published_by_a_submission_thread_release_each_layer_in_turn():
    """A background (threaded) layer-wise submission: layer l can be waited for as soon as its event
    is published, before the rest are; a failed submission ends every wait instead of hanging."""
    import threading
    import time

    from triton_prefix_cache.copy_engine import CopyHandle

    def background_handle() -> CopyHandle:
        return CopyHandle("promote", "dma", 2, 0, layerwise=True, background=True)

    h = background_handle()
    assert h.layerwise and not h.done() and not h.layer_done(0)
    evs = [_FakeEvent(f"l{i}") for i in range(3)]
    gate = threading.Event()

    def submit():
        h._publish_layer(evs[0])
        gate.wait(5)  # layer 1 is published only once the reader has seen layer 0
        for ev in evs[1:]:
            h._publish_layer(ev)
        h._enqueue_done("dma", 0.0, evs[-1])
        h._end_background_submission()

    t = threading.Thread(target=submit)
    t.start()
    h.synchronize_layer(0)  # returns although layers 1-2 are not submitted yet
    assert evs[0].waited and not h._submitted.is_set() and len(h._layer_events) == 1
    assert not h.layer_done(1)
    gate.set()
    h.synchronize_layer(2)
    assert evs[2].waited
    t.join()
    h.wait()
    assert h.done() and h.layer_done(1)

    h = background_handle()  # the submission fails after layer 0: the waits end, error says why
    def fail():
        time.sleep(0.05)
        h._publish_layer(evs[0])
        h._end_background_submission(RuntimeError("injected"))

    t = threading.Thread(target=fail)
    t.start()
    h.synchronize_layer(2)
    t.join()
    assert isinstance(h.error, RuntimeError) and h._layer_event(2) is None and h.done()


# ---- layer-wise copies submitted group by group (CopyEngine.layerwise_ahead) -----------------------
def _pump_setup(device: str, backend: str, layers: int, ahead: int | None, n: int = 6, seed: int = 3):
    kv = make_kv(16, layers, (4, 8), torch.float32, "separate", device, seed)
    views = byte_views(kv)
    pool = make_pool(n, layers, views[0].shape[1], device)
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    eng = CopyEngine(views, pool, backend=backend, layerwise_ahead=ahead)
    blocks = np.random.default_rng(seed).permutation(16)[:n]
    return views, pool, eng, blocks


def _landed(views, pool, blocks) -> list[bool]:
    """Per layer: do the blocks hold the pool's pages (slot i -> blocks[i])?"""
    idx = torch.from_numpy(blocks)
    return [bool(torch.equal(v[idx].cpu(), pool.slots[:, i].cpu())) for i, v in enumerate(views)]


@pytest.mark.parametrize("ahead", [0, 2])
def test_layerwise_groups_land_as_their_layers_are_asked_for(ahead):
    """On the CPU (torch copier: a group per layer) a layer's pages land exactly when wait_layer asks
    for a layer at most `ahead` groups before it; done() and wait() submit the rest."""
    layers = 6
    views, pool, eng, blocks = _pump_setup("cpu", "torch", layers, ahead)
    try:
        h = eng.promote(np.arange(len(blocks)), blocks, layerwise=True)
        assert _landed(views, pool, blocks) == [i <= ahead for i in range(layers)]
        assert not h._layer_events or len(h._layer_events) == ahead + 1
        h.wait_layer(1)
        assert _landed(views, pool, blocks) == [i <= 1 + ahead for i in range(layers)]
        h.wait_layer(0)  # an earlier layer submits nothing more
        assert _landed(views, pool, blocks) == [i <= 1 + ahead for i in range(layers)]
        assert h.done()  # a poll submits whatever is left
        assert _landed(views, pool, blocks) == [True] * layers
        assert h.error is None and h.backend == "torch" and h.submit_seconds is not None
        assert len(h._layer_events) == layers
        assert eng.stats.late_groups == layers - (ahead + 1)
    finally:
        eng.close()
        pool.close()


def test_layerwise_group_failing_later_sets_the_error_not_raises(monkeypatch):
    """A group that fails (torch fallback included) after the submission returned: the handle says
    so (`error`), later layers have no event, nothing raises in the waiter; a failure among the
    first groups raises from promote, as a whole submission would."""
    layers = 5
    views, pool, eng, blocks = _pump_setup("cpu", "torch", layers, 0)
    real = eng._run_with_fallback

    def flaky(direction, blocks_, slots_, blocks_t, slots_t, to_host, begin, count, after=None):
        if begin >= fail_from:
            raise RuntimeError("simulated copy failure")
        return real(direction, blocks_, slots_, blocks_t, slots_t, to_host, begin, count, after)

    monkeypatch.setattr(eng, "_run_with_fallback", flaky)
    try:
        fail_from = 2
        h = eng.promote(np.arange(len(blocks)), blocks, layerwise=True)
        h.wait_layer(3)  # asks for groups 2-3: group 2 fails
        assert isinstance(h.error, RuntimeError) and h.done()
        assert len(h._layer_events) == 2 and h._layer_event(3) is None
        assert _landed(views, pool, blocks)[:2] == [True, True]
        fail_from = 0
        with pytest.raises(RuntimeError, match="simulated"):
            eng.promote(np.arange(len(blocks)), blocks, layerwise=True)
    finally:
        eng.close()
        pool.close()


def test_layerwise_ahead_must_be_none_or_non_negative():
    views, pool, eng, _ = _pump_setup("cpu", "torch", 2, None)
    eng.close()
    try:
        with pytest.raises(ValueError, match="layerwise_ahead"):
            CopyEngine(views, pool, backend="torch", layerwise_ahead=-1)
    finally:
        pool.close()


# ---- GPU host only ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ahead", [None, 0, 1])
def test_gpu_layerwise_events_order_each_layer(kernel_device, backend, ahead):
    """After wait_layer(l) on the current stream, work queued there sees layer l restored, also
    where the groups are submitted as their layers are asked for (`layerwise_ahead`: most groups
    enqueued after the readers before them)."""
    layers, nb, n = 16, 64, 48
    views = byte_views(make_kv(nb, layers, (16, 8, 256), torch.bfloat16, "separate", kernel_device))
    pool = make_pool(n, layers, views[0].shape[1], kernel_device)
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    eng = CopyEngine(views, pool, backend=backend, layerwise_ahead=ahead)
    try:
        blocks = torch.randperm(nb)[:n]
        h = eng.promote(torch.arange(n), blocks, layerwise=True)
        if ahead is not None and backend != "dma":  # DMA is submitted by its thread, never pumped
            assert h._pump is not None or ahead + 1 >= len(eng._copiers[backend].layer_groups(layers))
        snaps = []
        for layer in range(layers):
            h.wait_layer(layer)
            torch.cuda._sleep(200_000)  # the reader runs late, as a forward's layers do
            snaps.append(views[layer][blocks.to(kernel_device)].clone())  # queued on the current stream
        torch.cuda.synchronize()
        for layer in range(layers):
            assert torch.equal(snaps[layer].cpu(), pool.slots[:, layer]), f"layer {layer} read early"
        assert h.done() and h.error is None and h.gpu_seconds() is not None
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_demote_waits_for_the_writer_on_the_current_stream(kernel_device, backend):
    layers, nb = 4, 32
    kv = make_kv(nb, layers, (16, 8, 256), torch.bfloat16, "separate", kernel_device)
    views = byte_views(kv)
    pool = make_pool(nb, layers, views[0].shape[1], kernel_device)
    eng = CopyEngine(views, pool, backend=backend)
    try:
        torch.cuda._sleep(50_000_000)  # keep the current stream busy, then write the KV there
        for t in kv:
            t.fill_(3.0)
        eng.demote(torch.arange(nb), torch.arange(nb)).wait()
        want = byte_views([torch.full_like(kv[0][:1], 3.0)])[0].cpu()
        assert all(torch.equal(pool.slots[s, layer], want[0]) for s in (0, nb - 1) for layer in range(layers))
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layerwise", [False, True])
def test_gpu_promote_writes_after_the_work_on_the_current_stream(kernel_device, backend, layerwise):
    """A load's destination blocks may still be in use by work queued before it (a forward reading
    the blocks' previous owner): the load lands after that work, whatever the backend."""
    layers, nb = 4, 32
    kv = make_kv(nb, layers, (16, 8, 256), torch.bfloat16, "separate", kernel_device)
    views = byte_views(kv)
    pool = make_pool(nb, layers, views[0].shape[1], kernel_device)
    pool.slots.fill_(7)
    eng = CopyEngine(views, pool, backend=backend)
    try:
        torch.cuda._sleep(50_000_000)  # keep the current stream busy, then write the blocks there
        for v in views:
            v.fill_(3)
        eng.promote(torch.arange(nb), torch.arange(nb), layerwise=layerwise).wait()
        torch.cuda.synchronize()
        assert all(bool((v == 7).all()) for v in views), "the load landed before the earlier writes"
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
def test_gpu_staged_promote_reads_the_host_while_the_current_stream_is_busy(kernel_device, monkeypatch):
    """A staged load's DMAs (host pool -> staging buffer) do not wait for the caller's queued work;
    only its scatter into the blocks does. Checked by event states: the DMAs' completion is seen
    while the caller's stream is still busy, the blocks written only after it."""
    layers, nb = 4, 32
    kv = make_kv(nb, layers, (16, 8, 256), torch.bfloat16, "separate", kernel_device)
    views = byte_views(kv)
    pool = make_pool(nb, layers, views[0].shape[1], kernel_device)
    pool.slots.fill_(7)
    eng = CopyEngine(views, pool, backend="staged")
    landed: list[torch.cuda.Event] = []
    copier = eng._copiers["staged"]
    dma = copier._dma

    def timed_dma(dst, src, run_bytes, stream, to_host):
        dma(dst, src, run_bytes, stream, to_host)
        landed.append(stream.record_event())

    monkeypatch.setattr(copier, "_dma", timed_dma)
    try:
        torch.cuda._sleep(4_000_000_000)  # about two seconds of the current stream
        busy = torch.cuda.current_stream().record_event()
        h = eng.promote(torch.arange(nb), torch.arange(nb))
        assert landed
        while not landed[-1].query():
            assert not busy.query(), "the DMAs waited for the current stream's work"
        assert not busy.query() and not h.done()
        h.wait()
        assert busy.query() and all(bool((v == 7).all()) for v in views)
    finally:
        eng.close()
        pool.close()


def _fail_submissions(monkeypatch, eng: CopyEngine) -> None:
    """Make every later copy of `eng` fail where its submission thread enqueues it."""

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(eng, "_enqueue", boom)


@pytest.mark.gpu
def test_gpu_dma_demotes_queued_to_the_submission_thread(kernel_device, monkeypatch):
    """DMA demotes are enqueued by a thread: handles are not done before that, every queued demote
    lands where the reference puts it, and a failure there reaches the handle, not the caller."""
    layers, nb = 4, 64
    kv = make_kv(nb, layers, (16, 8, 64), torch.bfloat16, "separate", kernel_device, seed=5)
    views = byte_views(kv)
    pool = make_pool(nb, layers, views[0].shape[1], kernel_device)
    eng = CopyEngine(views, pool, backend="dma")
    try:
        rng = np.random.default_rng(1)
        slots = rng.permutation(nb)
        torch.cuda._sleep(20_000_000)  # the first demotes queue behind this on the demote stream
        hs = [eng.demote(np.arange(i * 8, i * 8 + 8), slots[i * 8 : i * 8 + 8]) for i in range(8)]
        assert hs[0]._submitted is not None
        for h in hs:
            h.wait()
            assert h.done() and h.error is None and h.gpu_seconds() is not None
        src = np_layers(views)
        host = pool.slots.numpy()
        for layer in range(layers):
            assert_bytes_equal(host[slots, layer], src[layer], f"layer {layer}")

        _fail_submissions(monkeypatch, eng)
        h = eng.demote([0], [0])
        h.wait()
        assert h.done() and isinstance(h.error, RuntimeError)
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
def test_gpu_dma_layerwise_loads_submitted_by_a_thread(kernel_device, monkeypatch):
    """DMA loads are enqueued by the promote thread: each layer is waitable once published, the
    restored pages equal the reference, and a failure there reaches the handle (every wait ends)."""
    layers, nb, n = 16, 128, 96
    views = byte_views(make_kv(nb, layers, (16, 8, 128), torch.bfloat16, "separate", kernel_device))
    pool = make_pool(n, layers, views[0].shape[1], kernel_device)
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    eng = CopyEngine(views, pool, backend="dma")
    try:
        torch.cuda._sleep(20_000_000)  # the copy queues behind this; submission goes on meanwhile
        blocks = torch.randperm(nb)[:n]
        h = eng.promote(torch.arange(n), blocks, layerwise=True)
        assert h._submitted is not None and h.layerwise
        snaps = []
        for layer in range(layers):
            h.wait_layer(layer)
            snaps.append(views[layer][blocks.to(kernel_device)].clone())
        h.wait()
        assert h.error is None and h.submit_seconds is not None and h.gpu_seconds() is not None
        for layer in range(layers):
            assert torch.equal(snaps[layer].cpu(), pool.slots[:, layer]), f"layer {layer} read early"

        _fail_submissions(monkeypatch, eng)
        h = eng.promote([0], [0], layerwise=True)
        for layer in range(layers):
            h.wait_layer(layer)  # returns (nothing to wait for) instead of hanging
        h.wait()
        assert h.done() and isinstance(h.error, RuntimeError)
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dma", "staged"])
def test_gpu_runs_of_consecutive_slots_never_span_two_pinned_chunks(kernel_device, backend):
    """Consecutive slots merge into long DMA runs (the staged layer-wise load: strided copies), but
    not over a boundary between two pinned registrations (the driver refuses such a copy); slots in
    reverse order (a document demoted tail first) too; every byte lands, no fallback to torch."""
    layers, nb = 4, 64
    kv = make_kv(nb, layers, (16, 8, 64), torch.bfloat16, "interleaved", kernel_device, seed=7)
    views = byte_views(kv)
    pool = make_pool(nb, layers, views[0].shape[1], kernel_device)  # 1 MiB registrations: 16 slots
    per = pool.slots_per_chunk
    assert per < nb
    eng = CopyEngine(views, pool, backend=backend)
    strided: list[int] = []
    if backend == "staged":
        batch = eng._copiers["staged"].batch
        real = batch.copy2d

        def counted(*args):
            strided.append(args[5])  # rows
            real(*args)

        batch.copy2d = counted
    try:
        src = np_layers(views)
        eng.demote(np.arange(nb), np.arange(nb)).wait()
        host = pool.slots.numpy().copy()
        for layer in range(layers):
            assert_bytes_equal(host[:, layer], src[layer], f"demote layer {layer}")
        for layerwise in (False, True):
            for order in (1, -1):
                for v in views:
                    v.zero_()
                strided.clear()
                ids = np.arange(nb)[::order]
                eng.promote(ids, ids, layerwise=layerwise).wait()
                for layer in range(layers):
                    assert_bytes_equal(views[layer].cpu().numpy(), host[:, layer], f"promote layer {layer}")
                if backend == "staged":  # one strided copy per registration and layer group
                    want = [per] * (nb // per) * len(eng._copiers["staged"].layer_groups(layers))
                    assert strided == (want if layerwise else []), strided
        assert eng.stats.backend_fallbacks == 0, eng.unavailable
    finally:
        eng.close()
        pool.close()


def compiled_variants(jit_fn) -> int | None:
    """How many variants of a Triton kernel this process has compiled (None: this Triton keeps its
    cache elsewhere)."""
    try:
        return sum(len(cache[0]) for cache in jit_fn.device_caches.values())
    except (AttributeError, TypeError, IndexError, KeyError):
        return None


@pytest.mark.gpu
def test_gpu_copies_compile_nothing_after_warm_up(kernel_device):
    """Batches of any size, and staged chunks that start at odd rows (index slices 8 bytes off a
    16-byte boundary), reuse the kernels compiled by `warm_up`: a compile inside an engine step
    stalls that step's load for as long as the compile takes (a layer group's second staging chunk
    starts at such a row)."""
    from triton_prefix_cache.kernels.copy import _page_copy_kernel

    layers, nb = 6, 120
    views = byte_views(make_kv(nb, layers, (16, 2, 64), torch.bfloat16, "separate", kernel_device, seed=2))
    page = views[0].shape[1]
    pool = make_pool(nb, layers, page, kernel_device)
    # halves of 7 whole slots: chunks start at rows 7, 14, ... (and more rows for a layer group)
    eng = CopyEngine(views, pool, backend="staged", staging_bytes=2 * 7 * layers * page)
    try:
        eng.warm_up()
        before = compiled_variants(_page_copy_kernel)
        if before is None:
            pytest.skip("this Triton keeps its kernel cache elsewhere")
        rng = np.random.default_rng(4)
        for n in (1, 2, 7, 9, 15, 16, 17, 33, 100):
            blocks, slots = rng.permutation(nb)[:n], rng.permutation(pool.num_slots)[:n]
            eng.demote(blocks, slots).wait()
            eng.promote(slots, blocks).wait()
            eng.promote(slots, blocks, layerwise=True).wait()
        assert eng.stats.backend_fallbacks == 0, eng.unavailable
        assert compiled_variants(_page_copy_kernel) == before
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
def test_gpu_staged_demotes_use_the_thread_only_when_large(kernel_device):
    """Small staged demotes are enqueued by the caller (no thread hand-off), large ones by the demote
    thread; both land where the reference puts them."""
    from triton_prefix_cache.copy_engine import STAGED_THREAD_BYTES

    layers, page = 4, 1 << 20  # 4 MiB a block
    nb = STAGED_THREAD_BYTES // (layers * page) + 8
    views = [torch.randint(0, 256, (nb, page), dtype=torch.uint8, device=kernel_device) for _ in range(4)]
    pool = make_pool(nb, layers, page, kernel_device)
    eng = CopyEngine(views, pool, backend="staged")
    try:
        small = eng.demote(np.arange(8), np.arange(8))
        large = eng.demote(np.arange(8, nb), np.arange(8, nb))
        assert small._submitted is None and large._submitted is not None
        small.wait()
        large.wait()
        assert small.error is None and large.error is None
        src = np_layers(views)
        for layer in range(layers):
            assert_bytes_equal(pool.slots.numpy()[:, layer], src[layer], f"layer {layer}")
        assert eng.stats.backend_fallbacks == 0, eng.unavailable
    finally:
        eng.close()
        pool.close()


@pytest.mark.gpu
def test_gpu_auto_calibrates_and_both_directions_overlap(kernel_device):
    layers, nb = 32, 256
    views = byte_views(make_kv(nb, layers, (16, 8, 256), torch.bfloat16, "separate", kernel_device))
    pool = make_pool(256, layers, views[0].shape[1], kernel_device)
    pool.slots.copy_(torch.randint(0, 256, tuple(pool.slots.shape), dtype=torch.uint8))
    eng = CopyEngine(views, pool, backend="auto")
    try:
        assert set(eng.calibration) == {"demote", "promote"}
        assert all(v > 0 for d in eng.calibration.values() for v in d.values()), eng.calibration
        assert eng.backend["demote"] in eng.calibration["demote"]
        host_before = pool.slots[128:].clone()
        dev_before = [v[:128].cpu() for v in views]
        h1 = eng.demote(torch.arange(128), torch.arange(128))  # blocks 0..127 -> slots 0..127
        h2 = eng.promote(torch.arange(128, 256), torch.arange(128, 256))  # slots 128.. -> blocks 128..
        h1.wait()
        h2.wait()
        for layer in range(layers):
            assert torch.equal(pool.slots[:128, layer], dev_before[layer])
            assert torch.equal(views[layer][128:].cpu(), host_before[:, layer])
    finally:
        eng.close()
        pool.close()
