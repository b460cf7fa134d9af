"""HostPool: exact size, page alignment, chunked pinning without straddling slots, graceful
fallback when pinning fails, and no leaks over many create/close cycles.

On the CPU the pinning logic runs against a recording fake registrar (injected); the `gpu` tests
pin for real on the GPU host.
"""

from __future__ import annotations

import gc
import logging
import mmap
import threading

import pytest
import torch

from triton_prefix_cache.host_pool import OS_PAGE, HostPool, HostPoolConfig, TorchRegistrar

MiB = 1 << 20


class FakeRegistrar:
    """Records live registrations; fails (returns an error, or raises) on chosen calls, numbered in
    call order (in parallel mode that is not necessarily chunk order: `failed` says which address)."""

    def __init__(
        self,
        fail_calls: set[int] = frozenset(),
        raise_calls: set[int] = frozenset(),
        parallel: bool = False,
        alias_offset: int = 0,
        scatter: bool = False,
        fail_unregister: bool = False,
    ) -> None:
        self.fail_calls, self.raise_calls = set(fail_calls), set(raise_calls)
        self.parallel = parallel
        self.alias_offset, self.scatter = alias_offset, scatter
        self.fail_unregister = fail_unregister
        self.live: dict[int, int] = {}
        self.failed: list[int] = []
        self._calls = 0
        self._lock = threading.Lock()

    def register(self, address: int, nbytes: int) -> int:
        with self._lock:
            call = self._calls
            self._calls += 1
            if call in self.raise_calls or call in self.fail_calls:
                self.failed.append(address)
                if call in self.raise_calls:
                    raise RuntimeError("simulated driver crash")
                return 2  # like cudaErrorMemoryAllocation
            assert address not in self.live, "registered twice"
            self.live[address] = nbytes
            return 0

    def unregister(self, address: int) -> int:
        with self._lock:
            assert address in self.live, "unregistering memory that is not registered"
            del self.live[address]
        return 1 if self.fail_unregister else 0

    def device_address(self, address: int) -> int | None:
        extra = 4096 * len([a for a in self.live if a < address]) if self.scatter else 0
        return address + self.alias_offset + extra

    def describe(self, code: int) -> str:
        return f"fake error {code}"


def config(
    size: int, layers: int = 4, page: int = 64 * 1024, chunk: int = 4 * MiB, device: str = "cuda", **kw
) -> HostPoolConfig:
    return HostPoolConfig(
        size_bytes=size, num_layers=layers, page_bytes=page, chunk_bytes=chunk, device=device, **kw
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_cpu_pool_is_exact_page_aligned_plain_memory():
    slot = 3 * 5000
    with HostPool(config(10 * slot + 7, layers=3, page=5000, device="cpu")) as pool:
        assert pool.num_slots == 10 and pool.slot_bytes == slot
        assert pool.stats.allocated_bytes == 10 * slot  # never rounded up (to a power of two or else)
        assert pool.address % OS_PAGE == 0
        assert not pool.pinned and pool.registered_chunks == [] and pool.device_address == pool.address
        assert pool.slots.shape == (10, 3, 5000) and pool.slots.dtype == torch.uint8
        for s in (0, 3, 9):
            assert pool.slots[s].data_ptr() == pool.address + s * slot
        pool.slots[9, 2, -1] = 7  # the last byte is writable
        assert int(pool.slots.view(-1)[-1]) == 7
    assert pool.closed and pool.slots is None


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("page", [64 * 1024, 3000])
def test_chunks_cover_the_pool_on_slot_and_page_boundaries(parallel, page):
    reg = FakeRegistrar(parallel=parallel)
    layers = 3
    nslots = 37 if page % OS_PAGE == 0 else 1200  # odd slots need 512-slot chunks to stay page-aligned
    size = nslots * layers * page + 11
    with HostPool(config(size, layers=layers, page=page, chunk=1 * MiB), registrar=reg) as pool:
        slot = layers * page
        assert pool.num_slots == nslots and pool.pinned
        chunks = sorted(pool.registered_chunks)
        assert len(chunks) > 1
        pos = pool.address
        for addr, n in chunks:  # contiguous, whole slots, page-aligned starts
            assert addr == pos and (addr - pool.address) % slot == 0 and (addr - pool.address) % OS_PAGE == 0
            assert n % slot == 0
            pos += n
        assert pos == pool.address + pool.nbytes
        assert sorted(reg.live.items()) == chunks
        assert pool.stats.pinned_bytes == pool.nbytes and pool.stats.pin_failures == 0
        assert pool.device_address == pool.address
    assert reg.live == {}


@pytest.mark.parametrize("parallel", [False, True])
def test_failed_chunk_gives_a_smaller_pinned_pool(parallel, caplog):
    reg = FakeRegistrar(fail_calls={3}, parallel=parallel)
    page, layers = 64 * 1024, 4
    slot = page * layers  # 256 KiB; chunks of 4 MiB hold 16 slots
    with caplog.at_level(logging.WARNING):
        pool = HostPool(config(100 * slot, layers=layers, page=page), registrar=reg)
    assert pool.slots_per_chunk == 16 and len(reg.failed) == 1
    bad = (reg.failed[0] - pool.address) // pool.chunk_bytes  # 3 when registering in order
    assert bad == 3 or parallel
    assert pool.num_slots == bad * 16 and pool.slots.shape[0] == bad * 16 and pool.pinned == (bad > 0)
    assert pool.stats.pin_failures == 1 and pool.stats.chunks_pinned == bad
    assert pool.stats.pinned_bytes == bad * 16 * slot and pool.stats.requested_bytes == 100 * slot
    assert "smaller pinned pool" in caplog.text and "fake error 2" in caplog.text
    # Parallel registration may have pinned chunks past the failure: they must be undone.
    assert sorted(reg.live) == [pool.address + i * 16 * slot for i in range(bad)]
    pool.close()
    assert reg.live == {}


def test_first_chunk_failure_or_raise_is_an_empty_tier_not_a_crash(caplog):
    for reg in (FakeRegistrar(fail_calls={0}), FakeRegistrar(raise_calls={0})):
        with caplog.at_level(logging.WARNING):
            pool = HostPool(config(8 * MiB), registrar=reg)
        assert pool.num_slots == 0 and not pool.pinned and pool.stats.pin_failures == 1
        assert pool.slots.shape == (0, 4, 64 * 1024)
        pool.close()
        assert reg.live == {}


def test_failed_allocation_halves_until_it_fits(monkeypatch, caplog):
    real_mmap = mmap.mmap

    def small_mmap(fd, length, *a, **k):
        if length > 5 * MiB:
            raise OSError(12, "Cannot allocate memory")
        return real_mmap(fd, length, *a, **k)

    monkeypatch.setattr("triton_prefix_cache.host_pool.mmap.mmap", small_mmap)
    with caplog.at_level(logging.WARNING):
        pool = HostPool(config(16 * MiB, device="cpu"))  # 64 slots of 256 KiB: 32, then 16 fit
    assert pool.num_slots == 16 and pool.stats.alloc_failures == 2 and pool.stats.allocated_bytes == 4 * MiB
    assert "trying half as many" in caplog.text
    pool.close()
    monkeypatch.setattr(
        "triton_prefix_cache.host_pool.mmap.mmap", lambda *a, **k: (_ for _ in ()).throw(OSError())
    )
    with pytest.raises(MemoryError, match="cannot map even one slot"):
        HostPool(config(1 * MiB, device="cpu"))


def test_device_address_needs_a_flat_mapping():
    with HostPool(config(16 * MiB), registrar=FakeRegistrar(alias_offset=1 << 40)) as pool:
        assert pool.device_address == pool.address + (1 << 40)
    with HostPool(config(16 * MiB), registrar=FakeRegistrar(scatter=True)) as pool:
        assert pool.device_address is None


def test_close_is_idempotent_and_counts_unregister_failures(caplog):
    reg = FakeRegistrar(fail_unregister=True)
    pool = HostPool(config(16 * MiB), registrar=reg)
    n = len(pool.registered_chunks)
    with caplog.at_level(logging.WARNING):
        pool.close()
        pool.close()
    assert pool.stats.unregister_failures == n and reg.live == {}


def test_close_with_live_views_defers_the_unmap(caplog):
    pool = HostPool(config(1 * MiB, device="cpu"))
    view = pool.slots[1]
    view.fill_(5)
    with caplog.at_level(logging.WARNING):
        pool.close()
    assert "views of it are alive" in caplog.text
    assert int(view.sum()) == 5 * view.numel()  # still mapped while referenced
    del view


@pytest.mark.parametrize("device", ["cpu", "fake-pinned"])
def test_no_leak_over_many_create_close_cycles(device):
    size = 32 * MiB
    reg = None

    def cycle():
        nonlocal reg
        reg = FakeRegistrar(parallel=True) if device != "cpu" else None
        pool = HostPool(config(size, device="cpu" if device == "cpu" else "cuda"), registrar=reg)
        pool.slots.view(-1)[::4096].fill_(1)  # touch every page
        pool.close()
        assert reg is None or reg.live == {}

    for _ in range(3):
        cycle()
    gc.collect()
    before = rss_bytes()
    for _ in range(40):  # 40 x 32 MiB = 1.25 GiB allocated and touched in total
        cycle()
    gc.collect()
    assert rss_bytes() - before < 48 * MiB


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"size_bytes.*smaller than one slot"):
        HostPoolConfig(size_bytes=100, num_layers=2, page_bytes=64, device="cpu")
    with pytest.raises(ValueError, match="num_layers"):
        HostPoolConfig(size_bytes=1 << 20, num_layers=0, page_bytes=64, device="cpu")
    with pytest.raises(ValueError, match="page_bytes"):
        HostPoolConfig(size_bytes=1 << 20, num_layers=2, page_bytes=True, device="cpu")
    with pytest.raises(ValueError, match="device"):
        HostPoolConfig(size_bytes=1 << 20, num_layers=2, page_bytes=64, device="meta")


# ---- GPU host: real pinning --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("registrar", ["driver", "torch"])
def test_gpu_pool_is_pinned_in_chunks_and_device_addressable(registrar):
    dev = torch.device("cuda", torch.cuda.current_device())
    reg = TorchRegistrar(dev) if registrar == "torch" else None
    page, layers = 64 * 1024, 32
    with HostPool(
        config(40 * layers * page, layers=layers, page=page, chunk=16 * MiB), registrar=reg
    ) as pool:
        assert pool.pinned and pool.num_slots == 40 and pool.stats.pin_failures == 0
        assert len(pool.registered_chunks) == 5  # 8 slots of 2 MiB per 16 MiB chunk
        if registrar == "driver":
            assert pool.device_address is not None
        src = torch.randint(0, 255, (pool.nbytes,), dtype=torch.uint8, device=dev)
        flat = pool.slots.view(-1)
        # Pinned: real async DMAs. One copy per registration: the driver rejects a DMA that spans
        # two registrations (cudaErrorInvalidValue), which is why no slot straddles a chunk.
        base = pool.address
        chunks = [(addr - base, size) for addr, size in pool.registered_chunks]
        for lo, size in chunks:
            flat[lo : lo + size].copy_(src[lo : lo + size], non_blocking=True)
        torch.cuda.synchronize()
        for lo, size in chunks:
            assert torch.equal(flat[lo : lo + size].to(dev), src[lo : lo + size])
        if pool.device_address is not None:
            from triton_prefix_cache.copiers import device_view

            view = device_view(pool.device_address, pool.nbytes, dev)
            assert torch.equal(view, src)  # a device kernel reading the host pool directly
            del view


@pytest.mark.gpu
def test_gpu_no_leak_over_many_pinned_cycles():
    def cycle():
        pool = HostPool(config(256 * MiB, layers=32, page=64 * 1024, chunk=64 * MiB))
        assert pool.pinned and pool.stats.pin_failures == 0
        pool.close()
        assert pool.stats.unregister_failures == 0

    cycle()
    gc.collect()
    before = rss_bytes()
    for _ in range(40):
        cycle()
    gc.collect()
    assert rss_bytes() - before < 64 * MiB
