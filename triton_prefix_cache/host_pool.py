"""HostPool: the host tier's memory, one page-aligned allocation cut into fixed-size slots.

A slot holds one KV block for all layers contiguously, `[num_layers, page_bytes]`, so the pool reads
as `slots[num_slots, num_layers, page_bytes]` (uint8). Invariants:
- one anonymous mmap of exactly `num_slots * slot_bytes` (never rounded up to a power of two, as
  PyTorch's pinned allocator does), page-aligned;
- for a CUDA engine it is registered (pinned and mapped) in chunks whose size is a multiple of both
  the slot size and the OS page, so no slot straddles two registrations and no page is registered
  twice; if a chunk fails to register the pool ends before it (smaller, still fully pinned), with
  a warning and `stats.pin_failures`, never an exception; the unpinned tail is given back to the OS;
- for a CPU engine it is plain memory;
- `close()` unregisters every chunk it registered and unmaps the memory.
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .stats import PoolStats

log = logging.getLogger(__name__)

OS_PAGE = mmap.PAGESIZE


class Registrar(Protocol):
    """Pins host memory for one CUDA device. Injectable, so tests can simulate failures."""

    #: whether `register` may run on several threads at once (and releases the GIL)
    parallel: bool

    def register(self, address: int, nbytes: int) -> int:
        """Pin and map [address, address + nbytes); 0 on success, else an error code."""

    def unregister(self, address: int) -> int:
        """Undo a successful `register` of the range starting at `address`; 0 on success."""

    def device_address(self, address: int) -> int | None:
        """The device-side address of registered host memory, or None if unknown."""

    def describe(self, code: int) -> str:
        """A readable name for an error code."""


class DriverRegistrar:
    """cuMemHostRegister (portable + device-mapped) through ctypes: GIL-free, any thread."""

    parallel = True

    def __init__(self, device: torch.device) -> None:
        from .cuda_driver import (
            CU_MEMHOSTREGISTER_DEVICEMAP,
            CU_MEMHOSTREGISTER_PORTABLE,
            CudaDriverError,
            get_driver,
        )

        with torch.cuda.device(device):
            torch.empty(1, device=device)  # makes the device's primary context current on this thread
            self.driver = get_driver()
            self.context = self.driver.current_context()
        if not self.context:
            raise CudaDriverError("no current CUDA context after initializing the device")
        self._flags = CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP

    def register(self, address: int, nbytes: int) -> int:
        self.driver.set_context(self.context)  # worker threads start without one
        return self.driver.host_register(address, nbytes, self._flags)

    def unregister(self, address: int) -> int:
        self.driver.set_context(self.context)
        return self.driver.host_unregister(address)

    def device_address(self, address: int) -> int | None:
        self.driver.set_context(self.context)
        return self.driver.host_device_pointer(address)

    def describe(self, code: int) -> str:
        return self.driver.error_name(code)


class TorchRegistrar:
    """cudaHostRegister through torch.cuda.cudart(): the fallback when libcuda cannot be driven directly."""

    parallel = False
    _FLAGS = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._cudart = torch.cuda.cudart()

    def register(self, address: int, nbytes: int) -> int:
        with torch.cuda.device(self._device):
            return _code(self._cudart.cudaHostRegister(address, nbytes, self._FLAGS))

    def unregister(self, address: int) -> int:
        with torch.cuda.device(self._device):
            return _code(self._cudart.cudaHostUnregister(address))

    def device_address(self, address: int) -> int | None:
        return None

    def describe(self, code: int) -> str:
        return f"cudaError {code}"


def _code(err) -> int:
    return int(getattr(err, "value", err))


def default_registrar(device: torch.device) -> Registrar:
    from .cuda_driver import CudaDriverError

    try:
        return DriverRegistrar(device)
    except CudaDriverError as e:
        log.info("host pool: pinning through torch's cudart (driver API unavailable: %s)", str(e))
        return TorchRegistrar(device)


@dataclass(frozen=True)
class HostPoolConfig:
    """size_bytes: the most host memory to use (whole slots only; the remainder is not allocated).
    num_layers, page_bytes: the KV geometry, one page per layer per block.
    device: the engine's KV device; a CUDA device gets pinned memory, "cpu" plain memory.
    chunk_bytes: target size of one pinned registration (rounded to whole slots and OS pages).
    huge_pages: ask for transparent huge pages. Off by default: where the kernel compacts memory on
        a huge-page fault (THP defrag "madvise"), faulting them in is slower than faulting in 4 KiB
        pages; bench/copy_bench.py times both.
    prefault: touch every page (in parallel) before pinning; the driver would fault them one thread
        at a time. Only used when pinning.
    register_threads: chunks registered at once, where the registrar allows it.
    """

    size_bytes: int
    num_layers: int
    page_bytes: int
    device: str | torch.device = "cuda"
    chunk_bytes: int = 1 << 30
    huge_pages: bool = False
    prefault: bool = True
    register_threads: int = 8

    def __post_init__(self) -> None:
        for name in ("size_bytes", "num_layers", "page_bytes", "chunk_bytes", "register_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or a CUDA device, got {self.device!r}")
        if self.size_bytes < self.slot_bytes:
            raise ValueError(
                f"size_bytes: {self.size_bytes} is smaller than one slot "
                f"({self.num_layers} layers x {self.page_bytes} bytes = {self.slot_bytes})"
            )

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.page_bytes


class HostPool:
    """Slots of host memory for KV blocks; see the module docstring for the invariants.

    Public state: `slots` (uint8 [num_slots, num_layers, page_bytes], CPU), `address` (host address
    of slot 0), `device_address` (the address a CUDA kernel uses for slot 0, or None when the pool is
    not directly addressable from the device), `pinned`, `registered_chunks`, `stats` (PoolStats).
    """

    def __init__(self, config: HostPoolConfig, registrar: Registrar | None = None) -> None:
        t0 = time.perf_counter()
        self.config = config
        # An injected registrar (tests) stands in for CUDA, so pinning logic runs without a GPU.
        self.device = _resolve_device(config.device, need_cuda=registrar is None)
        self.num_layers = config.num_layers
        self.page_bytes = config.page_bytes
        self.slot_bytes = config.slot_bytes
        self.requested_slots = config.size_bytes // self.slot_bytes
        self.slots_per_chunk = _slots_per_chunk(self.slot_bytes, config.chunk_bytes)
        self.chunk_bytes = self.slots_per_chunk * self.slot_bytes
        self.stats = PoolStats(requested_bytes=config.size_bytes)
        self._closed = False
        self._registrar: Registrar | None = None
        self._registered: list[tuple[int, int]] = []

        self.allocated_slots = self._allocate(self.requested_slots)
        nbytes = self.allocated_slots * self.slot_bytes
        if config.huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError as e:  # THP disabled: a hint only
                log.debug("host pool: MADV_HUGEPAGE refused: %s", str(e))
        self._array = np.frombuffer(self._mmap, dtype=np.uint8, count=nbytes)
        self._tensor = torch.from_numpy(self._array)
        self.address = self._tensor.data_ptr()
        self.stats.allocated_bytes = nbytes
        self.device_address: int | None = self.address if self.device.type == "cpu" else None

        if self.device.type == "cuda":
            self.num_slots = self._pin(registrar)
        else:
            self.num_slots = self.allocated_slots
        self.pinned = self.device.type == "cuda" and self.num_slots > 0
        self.slots = self._tensor[: self.num_slots * self.slot_bytes].view(
            self.num_slots, self.num_layers, self.page_bytes
        )
        self.stats.num_slots = self.num_slots
        self.stats.create_seconds = time.perf_counter() - t0

    def _allocate(self, nslots: int) -> int:
        """Map `nslots` slots of anonymous memory, halving on failure (a warning and a stat each
        time); only when not even one slot can be mapped is that an error."""
        while True:
            try:
                self._mmap = mmap.mmap(
                    -1,
                    nslots * self.slot_bytes,
                    flags=mmap.MAP_PRIVATE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                )
                return nslots
            except (OSError, OverflowError) as e:
                if nslots <= 1:
                    raise MemoryError(
                        f"host pool: cannot map even one slot ({self.slot_bytes} bytes): {e}"
                    ) from e
                self.stats.alloc_failures += 1
                log.warning(
                    "host pool: mapping %d slots (%.2f GiB) failed (%s); trying half as many",
                    nslots,
                    nslots * self.slot_bytes / 2**30,
                    e,
                )
                nslots //= 2

    # ---- pinning --------------------------------------------------------------------------------
    def _pin(self, registrar: Registrar | None) -> int:
        """Register the chunks in order; the pool is the prefix that got pinned. Returns its slots."""
        nbytes = self.allocated_slots * self.slot_bytes
        chunks = [(off, min(self.chunk_bytes, nbytes - off)) for off in range(0, nbytes, self.chunk_bytes)]
        try:
            self._registrar = registrar or default_registrar(self.device)
        except Exception as e:  # no way to pin at all: an empty tier, not a crash
            self._fail_tail(0, chunks, f"no CUDA registrar: {e!r}")
            return 0
        reg = self._registrar
        if self.config.prefault:
            t = time.perf_counter()
            self._tensor[::OS_PAGE].zero_()  # one write per page, on torch's intra-op threads
            self.stats.prefault_seconds = time.perf_counter() - t

        t = time.perf_counter()
        codes: list[int | None] = [None] * len(chunks)

        def one(i: int) -> int:
            off, n = chunks[i]
            try:
                return reg.register(self.address + off, n)
            except Exception as e:  # a registrar that raises: that chunk failed
                log.warning("host pool: registering chunk %d raised %s", i, repr(e))
                return -1

        workers = min(self.config.register_threads, len(chunks)) if reg.parallel else 1
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="tpc-pin") as ex:
                for i, code in enumerate(ex.map(one, range(len(chunks)))):
                    codes[i] = code
        else:
            for i in range(len(chunks)):
                codes[i] = one(i)
                if codes[i] != 0:
                    break
        first_bad = next((i for i, c in enumerate(codes) if c != 0), len(chunks))
        for i in range(first_bad + 1, len(chunks)):  # parallel successes past the failure
            if codes[i] == 0:
                self._unregister(self.address + chunks[i][0])
        self._registered = [(self.address + off, n) for off, n in chunks[:first_bad]]
        self.stats.register_seconds = time.perf_counter() - t
        self.stats.chunks_pinned = first_bad
        pinned_bytes = sum(n for _, n in chunks[:first_bad])
        self.stats.pinned_bytes = pinned_bytes
        if first_bad < len(chunks):
            code = codes[first_bad]
            why = reg.describe(code) if code is not None and code >= 0 else "the registrar raised"
            self._fail_tail(first_bad, chunks, why)
        self._find_device_address()
        return pinned_bytes // self.slot_bytes

    def _fail_tail(self, first_bad: int, chunks: list[tuple[int, int]], why: str) -> None:
        self.stats.pin_failures += 1
        off = chunks[first_bad][0] if chunks else 0
        log.warning(
            "host pool: pinning chunk %d of %d (at byte %d) failed: %s; continuing with a smaller "
            "pinned pool of %.2f GiB of the %.2f GiB asked for",
            first_bad,
            len(chunks),
            off,
            why,
            off / 2**30,
            self.config.size_bytes / 2**30,
        )
        total = self.allocated_slots * self.slot_bytes
        if off < total and hasattr(mmap, "MADV_DONTNEED"):
            try:  # the tail was prefaulted: give its memory back (chunk starts are page-aligned)
                self._mmap.madvise(mmap.MADV_DONTNEED, off, total - off)
            except (OSError, ValueError) as e:
                log.debug("host pool: could not release the unpinned tail: %s", str(e))

    def _find_device_address(self) -> None:
        """Device alias of slot 0, kept only if every chunk maps at the same offset (one flat view)."""
        if not self._registered or self._registrar is None:
            return
        try:
            aliases = [self._registrar.device_address(a) for a, _ in self._registered]
        except Exception as e:  # no alias: only direct access is lost
            log.info("host pool: no device address for the pinned pool (%s); direct access is off", repr(e))
            return
        if any(a is None for a in aliases):
            return
        base = aliases[0]
        if all(al - base == a - self.address for al, (a, _) in zip(aliases, self._registered)):
            self.device_address = base
        else:
            log.info("host pool: chunks map to scattered device addresses; direct device access is off")

    def _unregister(self, address: int) -> None:
        assert self._registrar is not None
        try:
            code = self._registrar.unregister(address)
        except Exception as e:  # counted and logged; closing goes on
            code, why = -1, repr(e)
        else:
            why = self._registrar.describe(code)
        if code != 0:
            self.stats.unregister_failures += 1
            log.warning("host pool: unregistering %#x failed: %s", address, why)

    # ---- lifetime -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def registered_chunks(self) -> list[tuple[int, int]]:
        """(address, nbytes) of each registration currently held."""
        return list(self._registered)

    def close(self) -> None:
        """Unregister and unmap. Callers must have finished every copy into or out of the pool.

        Idempotent. If views of the pool are still referenced elsewhere, the memory is unmapped
        when the last of them goes (with a warning), never while it can still be read.
        """
        if self._closed:
            return
        self._closed = True
        for address, _ in reversed(self._registered):
            self._unregister(address)
        self._registered = []
        self.slots = None
        self._tensor = None
        self._array = None
        mm, self._mmap = self._mmap, None
        try:
            mm.close()
        except BufferError:
            log.warning(
                "host pool: closed while views of it are alive; it is unmapped when they are released"
            )

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA, or even the logging module, may be gone
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("pinned" if self.pinned else "unpinned")
        return (
            f"HostPool({self.num_slots} slots x {self.num_layers} layers x {self.page_bytes} B, "
            f"{self.nbytes / 2**30:.2f} GiB, {state}, device={self.device})"
        )


def _resolve_device(device: str | torch.device, need_cuda: bool = True) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and (need_cuda or torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: a CUDA device was asked for but torch sees none")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _slots_per_chunk(slot_bytes: int, chunk_bytes: int) -> int:
    """Slots per registration: about chunk_bytes, and a whole number of OS pages."""
    step = OS_PAGE // math.gcd(slot_bytes, OS_PAGE)  # slots per chunk must be a multiple of this
    spc = max(1, chunk_bytes // slot_bytes)
    return max(step, spc // step * step)
