"""Gather/scatter of KV pages between an engine's per-layer block tables and host-pool slots.

Geometry (`PageLayout`): L layers, each a byte view `[num_blocks, page_bytes]` with its own base
address and row stride (any dtype behind it), and a host pool `[num_slots, L, page_bytes]`. For
pairs (block_i, slot_i) and layers l: demote is `host[slot_i, l] = layer_l[block_i]`, promote the
reverse. One block is L pages in L places, so every copy is a gather/scatter of n * L pages.

`PageCopyKernel` (Triton) reads and writes pinned host memory directly: the pool arrives as a CUDA
tensor over its device-visible (UVA) address, which Triton's launcher accepts because the driver
resolves registered host memory like device memory. The layers arrive as one base pointer (layer
0) plus a small table of per-layer word offsets and strides, so one launch covers every layer of
any layout; pointer arguments (not integers cast to pointers) keep the alignment facts that let
the compiler emit 16-byte loads and stores. Each program copies 16 KiB chunks of pages in a
grid-stride loop (`max_programs` caps the SMs it takes from the model); layers vary slowest, so
a launch over all layers tends to finish layer 0 first. The word size (up to 8 bytes) and the
alignment hint come from the common alignment of every address, stride and size.

`copy_pages_torch` is the same copy with one index_select/index_copy_ per layer (never per page):
the CPU path, and on CUDA the path over a device view of the pool.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Serializes launches of the copy kernel: Triton's first-launch compilation is not thread-safe.
_LAUNCH_LOCK = threading.Lock()


@dataclass(frozen=True)
class PageLayout:
    """Where every page lives. Addresses are those the copying device uses (CPU addresses when
    the engine runs on the CPU, device-visible ones for a CUDA engine)."""

    layer_addresses: tuple[int, ...]
    layer_strides: tuple[int, ...]  # bytes from one block to the next, per layer
    num_blocks: int
    page_bytes: int
    host_address: int
    num_slots: int
    #: bytes per separate pinned registration of the pool (0: one); one DMA never crosses two
    host_chunk_bytes: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_addresses)

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.page_bytes

    def _common(self) -> int:
        g = 0
        for v in (self.page_bytes, self.host_address, *self.layer_addresses, *self.layer_strides):
            g = math.gcd(g, int(v))
        return g

    @property
    def word_bytes(self) -> int:
        """Widest word (1, 2, 4 or 8 bytes) that divides every address, stride and size."""
        g = self._common()
        return min(8, g & -g)

    @property
    def aligned16(self) -> bool:
        return self._common() % 16 == 0


def layout_of(
    layers: list[torch.Tensor], host_address: int, num_slots: int, host_chunk_bytes: int = 0
) -> PageLayout:
    """The PageLayout of byte views `[num_blocks, page_bytes]` (uint8, rows contiguous)."""
    check_layer_views(layers)
    return PageLayout(
        layer_addresses=tuple(t.data_ptr() for t in layers),
        layer_strides=tuple(t.stride(0) for t in layers),
        num_blocks=layers[0].shape[0],
        page_bytes=layers[0].shape[1],
        host_address=int(host_address),
        num_slots=num_slots,
        host_chunk_bytes=int(host_chunk_bytes),
    )


def check_layer_views(layers: list[torch.Tensor], name: str = "layers") -> None:
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{name}: expected a non-empty list of per-layer byte views")
    first = layers[0]
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 2:
            raise ValueError(
                f"{name}[{i}]: expected a uint8 tensor [num_blocks, page_bytes], got "
                f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}"
            )
        if t.shape != first.shape:
            raise ValueError(
                f"{name}[{i}]: shape {tuple(t.shape)} differs from that of {name}[0], {tuple(first.shape)}"
            )
        if t.device != first.device:
            raise ValueError(f"{name}[{i}]: on {t.device}, {name}[0] on {first.device}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}[{i}]: each page must be contiguous (stride(1) == 1), got {t.stride()}")
        if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
            raise ValueError(f"{name}[{i}]: pages overlap (stride(0)={t.stride(0)} < {t.shape[1]} bytes)")


# No value specialization of the integer arguments nor of the index arrays' alignment: Triton would
# otherwise compile a variant per batch size class (n == 1, n % 16 == 0, ...) or per index slice
# starting off a 16-byte boundary (a staged copy's second chunk of an odd row count) at its first
# launch, which is inside an engine step, after warm-up. One variant serves every launch; the
# alignment facts come from ALIGN.
_UNSPECIALIZED = ["blocks", "slots", "n", "layer_begin", "total", "chunks_per_page", "slot_words",
                  "page_words"]


def _jit_unspecialized(fn):
    try:
        return triton.jit(do_not_specialize=_UNSPECIALIZED, do_not_specialize_on_alignment=_UNSPECIALIZED)(fn)
    except TypeError:  # a Triton without do_not_specialize_on_alignment: do_not_specialize covers both
        return triton.jit(do_not_specialize=_UNSPECIALIZED)(fn)


@_jit_unspecialized
def _page_copy_kernel(
    dev_base,  # *word: block 0 of layer 0; every layer is addressed relative to it
    layer_offs,  # *int64 [L]: words from dev_base to block 0 of each layer (may be negative)
    layer_strides,  # *int64 [L]: words between blocks of that layer
    host_base,  # *word: slot 0 of the host pool, as the device sees it
    blocks,  # *int64 [n]
    slots,  # *int64 [n]
    n,
    layer_begin,
    total,  # n * layers in this launch * chunks per page
    chunks_per_page,
    slot_words,
    page_words,
    TO_HOST: tl.constexpr,
    BLOCK: tl.constexpr,  # words per chunk
    ALIGN: tl.constexpr,  # words every offset is a multiple of (16 bytes' worth, or 1)
    EVEN: tl.constexpr,  # BLOCK divides page_words
):
    item = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    while item < total:
        page = item // chunks_per_page
        chunk = item - page * chunks_per_page
        lrel = page // n
        i = page - lrel * n
        layer = layer_begin + lrel
        blk = tl.load(blocks + i)
        slot = tl.load(slots + i)
        skip = chunk * BLOCK
        dev_off = tl.load(layer_offs + layer) + blk * tl.load(layer_strides + layer) + skip
        host_off = slot * slot_words + layer * page_words + skip
        if ALIGN > 1:  # lets the compiler use 16-byte loads and stores
            dev_off = tl.multiple_of(dev_off, ALIGN)
            host_off = tl.multiple_of(host_off, ALIGN)
        if TO_HOST:
            src = dev_base + dev_off
            dst = host_base + host_off
        else:
            src = host_base + host_off
            dst = dev_base + dev_off
        if EVEN:
            tl.store(dst + offs, tl.load(src + offs))
        else:
            mask = offs < page_words - skip
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
        item += step


class _Address:
    """Stands in for a tensor in a Triton launch: just `data_ptr()` and `dtype` (the launcher
    resolves the address through the driver, as it does for tensors)."""

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        self._address = address
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self._address


class PageCopyKernel:
    """Launcher of `_page_copy_kernel` for one PageLayout on one device (CUDA, or the CPU when
    Triton interprets). Launches on the current stream; index tensors must be int64 on `device`.

    `host` is a tensor over the pool's memory as the device sees it (a CUDA view of the pinned
    pool, or the CPU pool when interpreting); without one, the pool's device address is passed
    as a bare pointer.
    """

    def __init__(
        self,
        layout: PageLayout,
        device: torch.device,
        host: torch.Tensor | None = None,
        dev_base: torch.Tensor | None = None,
        chunk_bytes: int = 16384,
        max_programs: int | None = None,
        num_warps: int = 4,
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes & (chunk_bytes - 1):
            raise ValueError(f"chunk_bytes: expected a power of two, got {chunk_bytes}")
        if max_programs is not None and max_programs <= 0:
            raise ValueError(f"max_programs: expected a positive int or None, got {max_programs}")
        self.layout = layout
        self.device = torch.device(device)
        wb = self.word_bytes = layout.word_bytes
        dt = _WORD_DTYPES[wb]
        self.page_words = layout.page_bytes // wb
        self.slot_words = layout.slot_bytes // wb
        self.block = min(max(1, chunk_bytes // wb), triton.next_power_of_2(self.page_words))
        self.chunks_per_page = triton.cdiv(self.page_words, self.block)
        self.even = self.page_words % self.block == 0
        self.align = 16 // wb if layout.aligned16 else 1
        self.max_programs = max_programs
        self.num_warps = num_warps
        base = layout.layer_addresses[0]
        if dev_base is None or dev_base.data_ptr() != base:
            raise ValueError("dev_base: expected a tensor starting at block 0 of layer 0")
        self._dev_base = dev_base.view(dt) if dev_base.dtype != dt else dev_base
        if host is not None:
            if host.data_ptr() != layout.host_address:
                raise ValueError("host: expected a tensor starting at the layout's host address")
            self._host = host.view(-1).view(dt)
        else:
            self._host = _Address(layout.host_address, dt)
        self._offs = torch.tensor(
            [(a - base) // wb for a in layout.layer_addresses], dtype=torch.int64, device=self.device
        )
        self._strides = torch.tensor(
            [s // wb for s in layout.layer_strides], dtype=torch.int64, device=self.device
        )

    def __call__(
        self,
        blocks: torch.Tensor,
        slots: torch.Tensor,
        to_host: bool,
        layer_begin: int = 0,
        layer_count: int | None = None,
    ) -> None:
        L = self.layout.num_layers
        layer_count = L - layer_begin if layer_count is None else layer_count
        if layer_begin < 0 or layer_count < 0 or layer_begin + layer_count > L:
            raise ValueError(f"layers [{layer_begin}, {layer_begin + layer_count}) outside [0, {L})")
        n = blocks.numel()
        total = n * layer_count * self.chunks_per_page
        if total == 0:
            return
        if total >= 2**62:
            raise ValueError(f"too many pages in one launch: {total}")
        grid = (min(total, self.max_programs or total, 2**31 - 1),)
        with _LAUNCH_LOCK:  # launches come from two threads (copy engine submission); compile once
            self._launch(grid, blocks, slots, n, layer_begin, total, to_host)

    def _launch(self, grid, blocks, slots, n, layer_begin, total, to_host) -> None:
        _page_copy_kernel[grid](
            self._dev_base,
            self._offs,
            self._strides,
            self._host,
            blocks,
            slots,
            n,
            layer_begin,
            total,
            self.chunks_per_page,
            self.slot_words,
            self.page_words,
            TO_HOST=bool(to_host),
            BLOCK=self.block,
            ALIGN=self.align,
            EVEN=self.even,
            num_warps=self.num_warps,
        )


def word_views(
    layers: list[torch.Tensor], host: torch.Tensor, word_bytes: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same memory as wider words: layers [nb, page/w], host [S, L, page/w]."""
    dt = _WORD_DTYPES[word_bytes]
    return [t.view(dt) for t in layers], host.view(dt)


def copy_pages_torch(
    layers: list[torch.Tensor],
    host: torch.Tensor,
    blocks: torch.Tensor,
    slots: torch.Tensor,
    to_host: bool,
    layer_begin: int = 0,
    layer_count: int | None = None,
) -> None:
    """One gather and one scatter per layer. `layers` [nb, w] and `host` [S, L, w] share a dtype
    and a device with `blocks` and `slots` (int64)."""
    layer_count = len(layers) - layer_begin if layer_count is None else layer_count
    for layer in range(layer_begin, layer_begin + layer_count):
        if to_host:
            host[:, layer].index_copy_(0, slots, layers[layer].index_select(0, blocks))
        else:
            layers[layer].index_copy_(0, blocks, host[:, layer].index_select(0, slots))
