"""The copy paths of the CopyEngine: each enqueues one gather/scatter of pages between an engine's
per-layer KV views and host-pool slots on the current stream (or runs it, on the CPU).

- `DmaCopier`: cuMemcpyBatchAsync, one descriptor per page (adjacent pages merged);
- `StagedCopier`: one DMA per run of consecutive slots (a strided copy for a layer group) into a
  device staging buffer, the Triton kernel between that buffer and the pages;
- `TritonCopier`: the Triton kernel over the pinned pool's device address;
- `TorchCopier`: per-layer index ops over a device view of the pool (or staged through the CPU).

A DMA descriptor never spans two pinned registrations of the pool (`host_chunks`): the driver
refuses such a copy. Selection, streams, handles and fallbacks live in copy_engine.py.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import torch

from .kernels.copy import PageLayout, copy_pages_torch, layout_of, word_views

#: Device staging memory of the "staged" backend, per direction (two halves: copy and kernel
#: overlap). Each half is one DMA step; this size holds one layer group of a 512-block
#: (8,192-token) load of Llama-3.1-8B's geometry, so such a load takes one step per layer group.
STAGING_BYTES = 256 << 20
#: Layer-group rows of consecutive slots go as one strided copy (cuMemcpy2DAsync) from this many
#: rows on; shorter runs as descriptors of one batch call. 0: batch descriptors only.
MIN_2D_ROWS = 4
#: CUDA stream priority of loads (lower is higher; streams default to 0): their kernels are
#: scheduled before the forward's and the stores' as SMs free up.
LOAD_PRIORITY = -1
#: Steps of a layer-wise "staged" load (each one descriptor per slot, then one kernel per chunk).
LAYERWISE_GROUPS = 8


class Copier:
    """Enqueues one copy on the current stream (or runs it, on the CPU)."""

    name = "?"
    device_indices = True  # whether run() needs the ids as device tensors
    #: whether a promote writes device pages only from a device staging buffer, after its host reads:
    #: then run() orders those writes alone after `after`, and the reads need not wait for it
    stages_writes = False

    def layer_groups(self, num_layers: int) -> list[tuple[int, int]]:
        """(first layer, count) of the steps a layer-wise copy takes: one layer each by default."""
        return [(layer, 1) for layer in range(num_layers)]

    def run(
        self,
        blocks: np.ndarray,
        slots: np.ndarray,
        blocks_t,
        slots_t,
        to_host: bool,
        layer_begin: int,
        layer_count: int,
        after: Any = None,
    ) -> None:
        """`after`: None, or (copiers that stage their writes) an event on another stream that this
        promote's writes of device pages must follow."""
        raise NotImplementedError


class DmaCopier(Copier):
    """Descriptors built in numpy, submitted in slices so the copy engines start on the first
    slice while the driver takes in the next."""

    name = "dma"
    device_indices = False
    #: descriptors per cuMemcpyBatchAsync call (512 MiB of 64 KiB pages)
    max_descriptors = 8192

    def __init__(self, layout: PageLayout, batch) -> None:
        self.layout = layout
        self.batch = batch
        #: per layer, the address of block 0 and the bytes between blocks (`dma_descriptors`)
        self.addrs = np.array(layout.layer_addresses, dtype=np.int64)
        self.strides = np.array(layout.layer_strides, dtype=np.int64)

    def run(self, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=None) -> None:
        dst, src, size = dma_descriptors(
            self.layout,
            self.addrs,
            self.strides,
            blocks,
            slots,
            to_host,
            layer_begin,
            layer_count,
            block_major=layer_count > 1,
        )
        stream = torch.cuda.current_stream().cuda_stream
        step = self.max_descriptors
        for i in range(0, len(dst), step):
            self.batch(dst[i : i + step], src[i : i + step], size[i : i + step], stream)


def dma_descriptors(
    layout: PageLayout,
    addrs: np.ndarray,
    strides: np.ndarray,
    blocks: np.ndarray,
    slots: np.ndarray,
    to_host: bool,
    layer_begin: int,
    layer_count: int,
    block_major: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dsts, srcs, sizes) as uint64 arrays, one per page, runs of adjacent pages merged."""
    ls = np.arange(layer_begin, layer_begin + layer_count, dtype=np.int64)
    dev = addrs[ls][None, :] + blocks[:, None] * strides[ls][None, :]
    host = layout.host_address + slots[:, None] * layout.slot_bytes + ls[None, :] * layout.page_bytes
    if not block_major:
        dev, host = dev.T, host.T
    dev, host = dev.ravel(), host.ravel()
    src, dst = (dev, host) if to_host else (host, dev)
    return merge_runs(dst, src, layout.page_bytes, host_chunks(layout, host))


class StagedCopier(Copier):
    """DMA through a device staging buffer: a few large descriptors instead of one per page.

    A slot holds its block's L pages contiguously, so the pages of a layer range [l0, l0 + c) of
    one slot are one host run; the device pages are scattered (one per layer and block). This
    copier moves each slot's run with one DMA descriptor into (or out of) a staging buffer in device
    memory laid out like the pool (`[chunk slots, c, page]`), and the Triton gather/scatter kernel
    moves pages between the staging buffer and the layers at HBM speed. A whole-slot copy of n
    blocks thus takes at most n descriptors (one per run of consecutive slots) where the plain DMA
    copier takes n * L; a layer group's runs of consecutive slots (the engine sorts a copy's pairs
    by slot) are one strided copy each (`MIN_2D_ROWS`), the rest one descriptor per slot.

    The buffer has two halves per direction (demote and promote run at once), so one chunk's DMA
    overlaps the previous chunk's kernel: DMAs run on the caller's (copy) stream, kernels on an
    auxiliary stream, ordered by events. On the CPU (tests, with the Triton interpreter and a
    stand-in `batch`) the same steps run in order.
    """

    name = "staged"
    device_indices = True
    stages_writes = True

    def __init__(self, layout: PageLayout, layers: list[torch.Tensor], batch, staging_bytes: int) -> None:
        self.layout = layout
        self.layers = layers
        self.batch = batch
        self.device = layers[0].device
        self.cuda = self.device.type == "cuda"
        self.half_bytes = max(staging_bytes // 2, layout.slot_bytes)
        # one buffer per direction (demotes and promotes run at once), each in two halves
        self.staging = {
            to_host: torch.empty(2 * self.half_bytes, dtype=torch.uint8, device=self.device)
            for to_host in (True, False)
        }
        self.aux = {to_host: torch.cuda.Stream(self.device, priority=0 if to_host else LOAD_PRIORITY)
                    for to_host in (True, False)} if self.cuda else {}
        self._kernels: dict[tuple[bool, int, int], tuple[Any, int, torch.Tensor]] = {}
        # One copy at a time per direction: a run's chunks order the halves of its buffer among
        # themselves only, and demotes are enqueued from two threads (large ones by the engine's
        # submission thread, which releases the GIL inside driver calls, small ones by the caller).
        self._busy = {to_host: threading.Lock() for to_host in (True, False)}

    def layer_groups(self, num_layers: int) -> list[tuple[int, int]]:
        """A layer-wise copy in LAYERWISE_GROUPS steps (one descriptor per slot and step)."""
        g = min(num_layers, LAYERWISE_GROUPS)
        bounds = [num_layers * i // g for i in range(g + 1)]
        return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]

    def _kernel(self, to_host: bool, layer_begin: int, layer_count: int):
        """(kernel over layers [begin, begin + count) and the staging buffer, slots per half)."""
        key = (to_host, layer_begin, layer_count)
        if key not in self._kernels:
            from .kernels.copy import PageCopyKernel

            run_bytes = layer_count * self.layout.page_bytes
            cap = self.half_bytes // run_bytes
            buf = self.staging[to_host]
            sub = self.layers[layer_begin : layer_begin + layer_count]
            sub_layout = layout_of(sub, buf.data_ptr(), 2 * cap)
            kernel = PageCopyKernel(sub_layout, self.device, host=buf[: 2 * cap * run_bytes], dev_base=sub[0])
            rows = torch.arange(2 * cap, dtype=torch.int64, device=self.device)  # staging slot ids
            self._kernels[key] = (kernel, cap, rows)
        return self._kernels[key]

    def run(self, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=None) -> None:
        with self._busy[to_host]:
            self._run(blocks, blocks_t, slots, to_host, layer_begin, layer_count, after)

    def _run(self, blocks, blocks_t, slots, to_host, layer_begin, layer_count, after) -> None:
        kernel, cap, rows = self._kernel(to_host, layer_begin, layer_count)
        page = self.layout.page_bytes
        run_bytes = layer_count * page
        buf_addr = self.staging[to_host].data_ptr()
        host_runs = self.layout.host_address + slots * self.layout.slot_bytes + layer_begin * page
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        aux = self.aux.get(to_host)
        if aux is not None:
            aux.wait_stream(stream)  # the kernels start after the copy stream's ordering point
            if after is not None:  # and, a promote's, after the work that last used its blocks
                aux.wait_event(after)
        try:
            half_free: list[Any] = [None, None]  # event: the half's last user (kernel or DMA) is done
            n = len(blocks)
            for k, i0 in enumerate(range(0, n, cap)):
                i1 = min(n, i0 + cap)
                half = k % 2
                stage = buf_addr + half * cap * run_bytes + np.arange(i1 - i0, dtype=np.int64) * run_bytes
                stage_rows = rows[half * cap : half * cap + (i1 - i0)]
                if to_host:  # gather on the aux stream, then DMA the staged runs out on the copy stream
                    with on_stream(aux):
                        if half_free[half] is not None:
                            aux.wait_event(half_free[half])
                        kernel(blocks_t[i0:i1], stage_rows, True)
                        gathered = _record(aux)
                    if gathered is not None:
                        stream.wait_event(gathered)
                    self._dma(host_runs[i0:i1], stage, run_bytes, stream, True)
                    half_free[half] = _record(stream)
                else:  # DMA the runs in on the copy stream, then scatter them on the aux stream
                    if half_free[half] is not None:
                        stream.wait_event(half_free[half])
                    self._dma(stage, host_runs[i0:i1], run_bytes, stream, False)
                    landed = _record(stream)
                    with on_stream(aux):
                        if landed is not None:
                            aux.wait_event(landed)
                        kernel(blocks_t[i0:i1], stage_rows, False)
                        half_free[half] = _record(aux)
        finally:  # also when a chunk failed: events recorded later cover the kernels already queued
            if aux is not None:
                stream.wait_stream(aux)  # the copy stream's next event covers every kernel
                blocks_t.record_stream(aux)  # used there: its memory is not reused before aux is done

    def _dma(self, dst: np.ndarray, src: np.ndarray, run_bytes: int, stream, to_host: bool) -> None:
        """Staged rows (contiguous, `run_bytes` apart) to or from their host runs. A whole-slot copy
        merges consecutive slots into one descriptor; a layer group's runs are a slot apart, so a
        run of consecutive slots is one strided copy (rows of `run_bytes` at the slot pitch) instead
        of one descriptor per slot, each of which costs driver time to submit."""
        host = dst if to_host else src
        chunk = host_chunks(self.layout, host)
        handle = stream.cuda_stream if stream is not None else 0
        slot = self.layout.slot_bytes
        n = len(host)
        if run_bytes < slot and MIN_2D_ROWS and n >= MIN_2D_ROWS:
            cut = np.ones(n, dtype=bool)
            cut[1:] = host[1:] != host[:-1] + slot
            if chunk is not None:  # never one copy over two pinned registrations
                cut[1:] |= chunk[1:] != chunk[:-1]
            starts = np.flatnonzero(cut)
            lens = np.diff(np.append(starts, n))
            strided = lens >= MIN_2D_ROWS
            if strided.any():
                pitch = (slot, run_bytes) if to_host else (run_bytes, slot)  # (dst, src)
                for i, rows in zip(starts[strided].tolist(), lens[strided].tolist()):
                    self.batch.copy2d(int(dst[i]), pitch[0], int(src[i]), pitch[1], run_bytes, rows, handle)
                rest = ~np.repeat(strided, lens)
                if not rest.any():
                    return
                dst, src = dst[rest], src[rest]
                chunk = chunk[rest] if chunk is not None else None
        d, s, z = merge_runs(dst, src, run_bytes, chunk)
        self.batch(d, s, z, handle)


def merge_runs(
    dst: np.ndarray, src: np.ndarray, run_bytes: int, chunk: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors (uint64 dsts, srcs, sizes) for copies of `run_bytes` each, adjacent ones merged
    where `chunk` (the host registration of each copy, if given) is the same: the driver refuses
    one copy over two separately pinned chunks (CUDA_ERROR_INVALID_VALUE)."""
    n = len(dst)
    if n > 1:
        joined = (src[1:] == src[:-1] + run_bytes) & (dst[1:] == dst[:-1] + run_bytes)
        if chunk is not None:
            joined &= chunk[1:] == chunk[:-1]
        if joined.any():
            starts = np.flatnonzero(np.concatenate(([True], ~joined)))
            sizes = np.diff(np.append(starts, n)) * run_bytes
            return dst[starts].view(np.uint64), src[starts].view(np.uint64), sizes.astype(np.uint64)
    return dst.view(np.uint64), src.view(np.uint64), np.full(n, run_bytes, dtype=np.uint64)


def host_chunks(layout: PageLayout, host: np.ndarray) -> np.ndarray | None:
    """The pinned registration each host address lies in (None: the pool is one registration)."""
    if layout.host_chunk_bytes <= 0:
        return None
    return (host - layout.host_address) // layout.host_chunk_bytes


def on_stream(stream: torch.cuda.Stream | None):
    """`torch.cuda.stream(stream)`, or no context for None (the CPU, where copies run in order)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


class TritonCopier(Copier):
    """The Triton gather/scatter kernel (`PageCopyKernel`) over the pool's device address."""

    name = "triton"

    def __init__(
        self,
        layout: PageLayout,
        layers: list[torch.Tensor],
        host: torch.Tensor | None,
        chunk_bytes: int,
        max_programs: int | None,
    ) -> None:
        from .kernels.copy import PageCopyKernel

        self.kernel = PageCopyKernel(
            layout,
            layers[0].device,
            host=host,
            dev_base=layers[0],
            chunk_bytes=chunk_bytes,
            max_programs=max_programs,
        )

    def run(self, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=None) -> None:
        self.kernel(blocks_t, slots_t, to_host, layer_begin, layer_count)


class TorchCopier(Copier):
    """Per-layer index ops. `host` is a device view of the pool (direct) or the CPU pool (staged)."""

    name = "torch"

    def __init__(self, layers: list[torch.Tensor], host: torch.Tensor, word_bytes: int) -> None:
        self.layers, self.host = word_views(layers, host, word_bytes)
        self.staged = self.host.device != self.layers[0].device

    def run(self, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=None) -> None:
        if not self.staged:
            copy_pages_torch(self.layers, self.host, blocks_t, slots_t, to_host, layer_begin, layer_count)
            return
        slots_c = torch.from_numpy(slots)
        for layer in range(layer_begin, layer_begin + layer_count):
            if to_host:
                pages = self.layers[layer].index_select(0, blocks_t).cpu()
                self.host[:, layer].index_copy_(0, slots_c, pages)
            else:
                pages = self.host[:, layer].index_select(0, slots_c).to(self.layers[layer].device)
                self.layers[layer].index_copy_(0, blocks_t, pages)


class _CudaArray:
    """Just enough of __cuda_array_interface__ (v2, no stream semantics) for torch.as_tensor."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "strides": None,
            "version": 2,
        }


def device_view(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 CUDA tensor over device-visible memory (e.g. a registered host pool); no copy."""
    t = torch.as_tensor(_CudaArray(address, nbytes), device=device)
    if t.data_ptr() != address or t.device != device:
        raise RuntimeError(
            f"device view landed at {t.data_ptr():#x} on {t.device}, not {address:#x} on {device}"
        )
    return t
