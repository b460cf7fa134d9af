"""CopyEngine: demote (device blocks -> host slots) and promote (host slots -> device blocks).

The engine's KV cache arrives as per-layer byte views `[num_blocks, page_bytes]` (`byte_views`
makes them from KV tensors of any dtype); the host tier is a HostPool `[num_slots, L, page_bytes]`.
Four backends (copiers.py) move the pages, every one batched (never a Python loop per page):
- "dma": cuMemcpyBatchAsync, one descriptor per page (contiguous runs merged), no SMs used;
- "staged": one DMA per run of consecutive slots (a slot's pages are one host run; a layer group's
  runs are one strided copy) into or out of a device staging buffer, and the Triton kernel between
  that buffer and the layers at HBM speed;
- "triton": PageCopyKernel reading/writing the pinned pool through its device address;
- "torch": one index_select + index_copy_ per layer, over a device view of the pool (or, where the
  pool has no device address, staged through pageable CPU memory; slow but always correct).
backend="auto" measures the available ones on scratch memory of the same geometry and picks the
fastest per direction, keeping a DMA backend unless another is more than 5% faster (the copy
engines take no SMs from the model). A backend that fails at run time is logged, counted and
replaced by "torch".

On CUDA, demotes and promotes run on two side streams (so both directions overlap), each ordered
after the caller's current stream at submission (a staged promote: its scatter into the device
pages, its reads of the host pool only where the staging buffer is free); the returned
CopyHandle polls or waits, and a
layer-wise promote records one event per layer. Page-wise DMA copies and large staged demotes are
enqueued by one thread per direction (`_Submitter`: submitting a descriptor per page takes the
driver about as long as the copy itself), the events of a layer-wise load published layer by
layer. On the CPU copies are synchronous and the handle is done at once. Callers keep the
TierManager's invariants: a slot is never written while read.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .copiers import (
    LOAD_PRIORITY,
    STAGING_BYTES,
    Copier,
    DmaCopier,
    StagedCopier,
    TorchCopier,
    TritonCopier,
    device_view,
    on_stream,
)
from .host_pool import HostPool, HostPoolConfig
from .kernels.copy import check_layer_views, layout_of
from .stats import CopyStats

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dma", "staged", "triton", "torch")
DIRECTIONS = ("demote", "promote")
#: "auto" keeps DMA unless another backend beats it by more than this factor.
DMA_PREFERENCE = 1.05
#: Most device (and pinned) scratch memory a calibration takes.
CALIBRATE_BYTES = 128 << 20
#: Staged demotes of at least this many bytes are submitted by the demote thread.
STAGED_THREAD_BYTES = 256 << 20


def byte_views(kv_caches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 `[num_blocks, page_bytes]` views of per-layer KV tensors whose dim 0 is the block.

    Each block must be one contiguous page (true of vLLM's FlashAttention layouts with the block
    dimension first); any dtype, any stride between blocks.
    """
    out = []
    for i, t in enumerate(kv_caches):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError(f"kv_caches[{i}]: expected a tensor whose dim 0 indexes blocks")
        try:
            flat = t.view(t.shape[0], -1)
        except RuntimeError:
            flat = None
        if flat is None or (flat.shape[1] > 1 and flat.stride(1) != 1):
            raise ValueError(f"kv_caches[{i}]: a block is not one contiguous page (strides {t.stride()})")
        out.append(flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat)
    return out


class CopyHandle:
    """One submitted demote or promote. `done()` polls, `wait()` blocks the host; for a layer-wise
    promote, `wait_layer(l)` makes a stream wait (on the device) until layer l has landed.

    A copy enqueued by a submission thread of the engine (`background`, see `_Submitter`) is not
    done until that thread has enqueued it, and `wait_layer(l)` / `wait_all()` first block the host
    until layer l (or the whole copy) is on its stream, which for a layer-wise load is well before
    the end. A layer-wise copy submitted group by group (`_GroupPump`) submits, in those calls,
    the groups they need.

    The engine side changes a handle only through its `_`-methods (`_record_start`, `_attach_pump`,
    `_publish_layer`, `_enqueue_done`, and `_end_background_submission` for a background copy).
    `_enqueue_done` assigns `_event` and then `_pump` last, and `_end_background_submission` sets
    `_submitted` after everything else, so a poller on another thread that sees the copy enqueued
    sees the whole handle.
    """

    def __init__(
        self,
        direction: str,
        backend: str,
        num_blocks: int,
        nbytes: int,
        *,
        layerwise: bool = False,
        background: bool = False,
    ) -> None:
        self.direction = direction
        #: the backend that ran the copy (a backend that failed falls back to torch)
        self.backend = backend
        self.num_blocks = num_blocks
        self.nbytes = nbytes
        #: why the submission failed part way (the copy, or its layers from the failed group on,
        #: did not happen); None otherwise
        self.error: BaseException | None = None
        #: host seconds the submission took (background or not), once it has ended; None before,
        #: and for a copy the CPU ran synchronously
        self.submit_seconds: float | None = None
        #: the copy's last event; None on the CPU, or until the copy is on its stream
        self._event: Any = None
        #: one event per layer, in layer order, as they are published; None: not layer-wise
        self._layer_events: list | None = [] if layerwise else None
        #: recorded on the copy stream before the first copy (CUDA): `gpu_seconds` measures from it
        self._start: Any = None
        #: the copy's index arrays, kept alive until `wait`
        self._keep: tuple = ()
        #: set once a background submission has ended; None: enqueued by the caller
        self._submitted: threading.Event | None = threading.Event() if background else None
        #: guards `_layer_events` while a background submission appends to it
        self._progress: threading.Condition | None = (
            threading.Condition() if background and layerwise else None
        )
        #: the `_GroupPump` of a copy submitted group by group, until every group is submitted
        self._pump: _GroupPump | None = None

    def __repr__(self) -> str:
        return (
            f"CopyHandle({self.direction}, {self.backend}, {self.num_blocks} blocks, {self.nbytes} B"
            f"{', layer-wise' if self.layerwise else ''}{f', error={self.error!r}' if self.error else ''})"
        )

    # ---- the caller's side --------------------------------------------------------------------
    def done(self) -> bool:
        pump = self._pump
        if pump is not None:  # asked before every layer was: submit the rest now
            pump.pump(None)
        if self._submitted is not None and not self._submitted.is_set():
            return False
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        self._wait_enqueued()
        if self._event is not None:
            self._event.synchronize()
        self._keep = ()

    def gpu_seconds(self) -> float | None:
        """Device time from the copy stream reaching this copy to its last page landing (the copy
        itself, not the queueing before it); None on the CPU or before the copy is done."""
        if not self.done() or self._start is None or self._event is None:
            return None
        return self._start.elapsed_time(self._event) / 1e3

    @property
    def layerwise(self) -> bool:
        return self._layer_events is not None

    def layer_done(self, layer: int) -> bool:
        if self._submitted is not None and not self._submitted.is_set():
            with self._progress or contextlib.nullcontext():
                if self._layer_events is None or len(self._layer_events) <= layer:
                    return False
        ev = self._layer_event(layer)
        return ev is None or bool(ev.query())

    def wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Order `stream` (default: the current one) after layer `layer`'s copy; the host does not
        block on the copy (only, for a background submission, until that layer is enqueued)."""
        ev = self._layer_event(layer)
        if ev is not None:
            (stream or torch.cuda.current_stream()).wait_event(ev)

    def wait_all(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order `stream` (default: the current one) after the whole copy; the host does not block
        on the copy."""
        self._wait_enqueued()
        if self._event is not None:
            (stream or torch.cuda.current_stream()).wait_event(self._event)

    def synchronize_layer(self, layer: int) -> None:
        ev = self._layer_event(layer)
        if ev is not None:
            ev.synchronize()

    def _wait_enqueued(self, layer: int | None = None) -> None:
        """Block the host until the copy (or layer `layer` of a layer-wise one) is on its stream;
        a copy submitted group by group submits what that takes, here, on the caller's thread."""
        pump = self._pump
        if pump is not None:
            pump.pump(layer)
        sub = self._submitted
        if sub is None or sub.is_set():
            return
        if layer is not None and self._progress is not None:
            with self._progress:
                self._progress.wait_for(lambda: sub.is_set() or len(self._layer_events or ()) > layer)
            return
        sub.wait()

    def _layer_event(self, layer: int):
        self._wait_enqueued(layer)
        if self._layer_events is None:
            return self._event
        # Short only where a submission failed before this layer (`error` says so).
        return self._layer_events[layer] if layer < len(self._layer_events) else None

    # ---- the engine's side --------------------------------------------------------------------
    def _record_start(self, start, keep: tuple) -> None:
        """The copy stream reaches this copy at `start` (an event); `keep` holds its index arrays
        (host and device) until `wait`."""
        self._start = start
        self._keep = keep

    def _attach_pump(self, pump: _GroupPump) -> None:
        """The copy is submitted group by group from here on (before its first group is)."""
        self._pump = pump

    def _publish_layer(self, event, count: int = 1) -> None:
        """The next `count` layers landed at `event` (None on the CPU: already there); wakes any
        waiter for them."""
        assert self._layer_events is not None, "not a layer-wise copy"
        if self._progress is None:
            self._layer_events.extend([event] * count)
            return
        with self._progress:
            self._layer_events.extend([event] * count)
            self._progress.notify_all()

    def _enqueue_done(
        self, backend: str, submit_seconds: float, event=None, error: BaseException | None = None
    ) -> None:
        """The submission has ended: every copy is on its stream, or `error` stopped it part way.
        backend: the one that ran; event: the copy's last one (default: the last layer's)."""
        if error is not None:
            self.error = error
        self.backend = backend
        self.submit_seconds = submit_seconds
        if event is None and self._layer_events:
            event = self._layer_events[-1]
        self._event = event  # after the fields above: a poller that sees it sees them
        self._pump = None  # last: the handle is complete

    def _end_background_submission(self, error: BaseException | None = None) -> None:
        """The submission thread is done with this copy (`error`: it raised before
        `_enqueue_done`); wakes every waiter."""
        assert self._submitted is not None, "not a background copy"
        if error is not None:
            self.error = error
        with self._progress or contextlib.nullcontext():
            self._submitted.set()
            if self._progress is not None:
                self._progress.notify_all()


class _GroupPump:
    """Submits one layer-wise copy group by group (`CopyEngine.layerwise_ahead`).

    `start` submits the first `ahead + 1` layer groups (a failure there raises, as a whole
    submission would); `pump(layer)` submits the groups up to `ahead` past the one holding `layer`,
    `pump(None)` all that are left, on the calling thread (in an engine: the forward's, between
    layers). A later group that fails even on the torch fallback ends the submission with the
    handle's `error` set, publishing nothing more, as a failed background submission does. A lock
    keeps groups in order. Later groups are not ordered after the caller's stream again: the
    forward queued there waits for them.
    """

    def __init__(
        self,
        engine: CopyEngine,
        h: CopyHandle,
        groups: list[tuple[int, int]],
        enqueue_group: Callable[[int, int], None],
        seconds: float = 0.0,
    ) -> None:
        self.engine, self.h = engine, h
        self.groups = groups
        self.enqueue_group = enqueue_group  # (first layer, count) -> None, on the copy's stream
        self.group_of = np.repeat(np.arange(len(groups)), [count for _, count in groups])
        self.ahead = int(engine.layerwise_ahead or 0)
        self.next = 0
        self.seconds = seconds  # host time spent submitting, so far
        self.lock = threading.Lock()

    def start(self) -> None:
        self.h._attach_pump(self)
        with self.lock:
            self._submit_through(min(len(self.groups) - 1, self.ahead))

    def pump(self, layer: int | None) -> None:
        with self.lock:
            if self.next >= len(self.groups):
                return
            n = len(self.groups)
            last = n - 1 if layer is None else min(n - 1, int(self.group_of[layer]) + self.ahead)
            before = self.next
            try:
                self._submit_through(last)
            except Exception as e:  # the copy's layers from this group on did not happen
                log.warning("copy engine: layer-wise %s failed at group %d (%r)", self.h.direction,
                            self.next, e)
                self.engine.stats.late_groups += self.next - before
                self.next = n
                self._finish(error=e)
                return
            self.engine.stats.late_groups += self.next - before

    def _submit_through(self, last: int) -> None:
        t0 = time.perf_counter()
        try:
            while self.next <= last:
                self.enqueue_group(*self.groups[self.next])
                self.next += 1
        finally:
            self.seconds += time.perf_counter() - t0
        if self.next == len(self.groups):
            self._finish()

    def _finish(self, error: BaseException | None = None) -> None:
        self.h._enqueue_done(self.engine.backend[self.h.direction], self.seconds, error=error)


# ---- the engine --------------------------------------------------------------------------------------
class CopyEngine:
    """Moves KV blocks between per-layer device pages and a HostPool (see the module docstring).

    layers: one uint8 `[num_blocks, page_bytes]` view per layer, all on one device (`byte_views`).
    backend: "auto", "staged", "dma", "triton" or "torch" (CPU engines: "torch", or "triton" under
        TRITON_INTERPRET=1 for tests).
    wait_for_current_stream: order each copy after the work already queued on the caller's stream
        (the forward that wrote the KV, earlier users of reused blocks).
    staging_bytes: device memory of the "staged" backend's buffer, per direction.
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        pool: HostPool,
        backend: str = "auto",
        *,
        wait_for_current_stream: bool = True,
        triton_chunk_bytes: int = 16384,
        triton_max_programs: int | None = None,
        calibrate_blocks: int = 64,
        layerwise_ahead: int | None = None,
        staging_bytes: int = STAGING_BYTES,
    ) -> None:
        layers = list(layers)
        check_layer_views(layers)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        if pool.closed:
            raise ValueError("pool: the HostPool is closed")
        if len(layers) != pool.num_layers:
            raise ValueError(
                f"layers: {len(layers)} views, but the pool holds {pool.num_layers} layers per slot"
            )
        if layers[0].shape[1] != pool.page_bytes:
            raise ValueError(
                f"layers: pages of {layers[0].shape[1]} bytes, but the pool's are {pool.page_bytes}"
            )
        self.device = layers[0].device
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"layers: expected CPU or CUDA tensors, got {self.device}")
        if self.device.type == "cuda" and pool.device != self.device:
            raise ValueError(f"pool: pinned for {pool.device}, but the layers are on {self.device}")
        self.layers = layers
        self.pool = pool
        self.num_layers = len(layers)
        self.num_blocks = layers[0].shape[0]
        self.page_bytes = pool.page_bytes
        self.slot_bytes = pool.slot_bytes
        self.wait_for_current_stream = wait_for_current_stream
        if layerwise_ahead is not None and layerwise_ahead < 0:
            raise ValueError(f"layerwise_ahead: expected None or an int >= 0, got {layerwise_ahead!r}")
        #: None: a layer-wise copy (not submitted by a thread) is enqueued whole by `promote`;
        #: k: only its first k + 1 layer groups are, and each `wait_layer(l)` submits, on the
        #: caller's thread, the groups up to k past l's group (`_GroupPump`), so a forward that
        #: waits per layer starts after one group's submission instead of all of them
        self.layerwise_ahead = layerwise_ahead
        if staging_bytes <= 0:
            raise ValueError(f"staging_bytes: expected a positive int, got {staging_bytes!r}")
        #: device staging memory of the "staged" backend, per direction
        self.staging_bytes = int(staging_bytes)
        self.stats = CopyStats()
        self._triton_opts = (triton_chunk_bytes, triton_max_programs)
        self.calibration: dict[str, dict[str, float]] = {}
        self._copiers, self.unavailable = self._build_copiers(
            layers, pool.slots, pool.address, pool.device_address, pool.chunk_bytes
        )
        for name, why in self.unavailable.items():
            log.info("copy engine: backend %s unavailable: %s", name, why)
        self._streams: dict[str, Any] = {}
        #: DMA copies are enqueued by one thread per direction (see `_Submitter`)
        self._submitters: dict[str, _Submitter] = {}
        if self.device.type == "cuda":
            # Loads are on a request's critical path (a forward waits for a layer-wise load, a
            # request for its async one), stores never are: loads' kernels go first on the SMs.
            self._streams = {
                d: torch.cuda.Stream(self.device, priority=LOAD_PRIORITY if d == "promote" else 0)
                for d in DIRECTIONS
            }

        if backend == "auto":
            if self.device.type == "cuda" and len(self._copiers) > 1:
                self.calibration = self.calibrate(calibrate_blocks)
            self.backend = {d: choose_backend(self.calibration.get(d, {}), self._copiers) for d in DIRECTIONS}
        else:
            if backend not in self._copiers:
                raise ValueError(
                    f"backend: {backend!r} is not available here: {self.unavailable.get(backend)}"
                )
            self.backend = {d: backend for d in DIRECTIONS}
        log.info(
            "copy engine: %s, backends %s%s",
            self.device,
            self.backend,
            f", calibration GB/s {self.calibration}" if self.calibration else "",
        )

    # ---- construction helpers -------------------------------------------------------------------
    def _build_copiers(
        self,
        layers: list[torch.Tensor],
        host: torch.Tensor,
        host_address: int,
        device_address: int | None,
        chunk_bytes: int,
    ) -> tuple[dict[str, Copier], dict[str, str]]:
        """(copiers by name, why each missing backend is missing) for one set of layers and pool,
        pinned in registrations of `chunk_bytes` (DMA descriptors never span two)."""
        copiers: dict[str, Copier] = {}
        missing: dict[str, str] = {}
        nslots = host.shape[0]
        if self.device.type == "cpu":
            layout = layout_of(layers, host_address, nslots)
            copiers["torch"] = TorchCopier(layers, host, layout.word_bytes)
            if os.environ.get("TRITON_INTERPRET") == "1":
                copiers["triton"] = TritonCopier(layout, layers, host, *self._triton_opts)
            else:
                missing["triton"] = (
                    "Triton has no CPU backend (TRITON_INTERPRET=1 runs it interpreted, for tests)"
                )
            missing["dma"] = missing["staged"] = "DMA needs a CUDA engine"
            return copiers, missing
        try:
            from .cuda_driver import BatchMemcpy

            batch = BatchMemcpy()
            host_layout = layout_of(layers, host_address, nslots, chunk_bytes)
            copiers["dma"] = DmaCopier(host_layout, batch)
        except (RuntimeError, OSError) as e:  # CudaDriverError included
            missing["dma"] = missing["staged"] = f"{e}"
        else:
            try:
                copiers["staged"] = StagedCopier(host_layout, layers, batch, self.staging_bytes)
            except (RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
                missing["staged"] = f"no device staging buffer: {e!r}"
        if device_address is not None:
            dlayout = layout_of(layers, device_address, nslots)
            view = None
            try:
                view = device_view(device_address, host.numel(), self.device).view(host.shape)
                copiers["torch"] = TorchCopier(layers, view, dlayout.word_bytes)
            except (RuntimeError, TypeError, ValueError) as e:
                log.info("copy engine: no device view of the pool (%s); the torch path is staged", repr(e))
            # Without a view, the kernel gets the pool's device address as a bare pointer.
            copiers["triton"] = TritonCopier(dlayout, layers, view, *self._triton_opts)
        else:
            missing["triton"] = "the pool has no device address (not pinned, or not mapped flat)"
        if "torch" not in copiers:
            copiers["torch"] = TorchCopier(layers, host, layout_of(layers, host_address, nslots).word_bytes)
        return copiers, missing

    # ---- public API -----------------------------------------------------------------------------
    def demote(self, gpu_block_ids, host_slots) -> CopyHandle:
        """Copy device blocks into host slots: host[slot_i, l] = layer_l[block_i] for every layer."""
        blocks = _ids(gpu_block_ids, "gpu_block_ids", self.num_blocks)
        slots = _ids(host_slots, "host_slots", self.pool.num_slots)
        _same_len(blocks, slots, "gpu_block_ids", "host_slots")
        _unique(slots, "host_slots")
        self.stats.demotes += 1
        self.stats.blocks_to_host += len(blocks)
        self.stats.bytes_to_host += len(blocks) * self.slot_bytes
        return self._submit("demote", blocks, slots, layerwise=False)

    def promote(self, host_slots, gpu_block_ids, layerwise: bool = False) -> CopyHandle:
        """Copy host slots into device blocks: layer_l[block_i] = host[slot_i, l] for every layer.

        layerwise: one event per layer (layers copied in order), for `CopyHandle.wait_layer`.
        """
        slots = _ids(host_slots, "host_slots", self.pool.num_slots)
        blocks = _ids(gpu_block_ids, "gpu_block_ids", self.num_blocks)
        _same_len(blocks, slots, "gpu_block_ids", "host_slots")
        _unique(blocks, "gpu_block_ids")
        self.stats.promotes += 1
        self.stats.blocks_from_host += len(blocks)
        self.stats.bytes_from_host += len(blocks) * self.slot_bytes
        return self._submit("promote", blocks, slots, layerwise=layerwise)

    def warm_up(self, block: int = 0, slot: int = 0) -> float:
        """Run every copy path once on one block: device block -> host slot -> the same block, so
        the block ends with the bytes it had. The first real copy then pays no kernel compilation
        or driver set-up (the Triton kernel compiles at its first launch, inside a step). Only for
        a block and slot nothing else uses meanwhile (an engine's startup). Stats are left alone.
        Returns the seconds taken."""
        b = _ids([block], "block", self.num_blocks)
        s = _ids([slot], "slot", self.pool.num_slots)
        t0 = time.perf_counter()
        self._submit("demote", b, s, layerwise=False).wait()
        self._submit("promote", b, s, layerwise=False).wait()
        self._submit("promote", b, s, layerwise=True).wait()
        return time.perf_counter() - t0

    def synchronize(self) -> None:
        for submitter in self._submitters.values():
            submitter.drain()
        for s in self._streams.values():
            s.synchronize()

    def close(self) -> None:
        """Wait for every copy, then drop the views of the pool and the layers."""
        self.synchronize()
        for submitter in self._submitters.values():
            submitter.close()
        self._submitters = {}
        self._copiers = {}
        self.layers = []

    # ---- submission -----------------------------------------------------------------------------
    def _submit(self, direction: str, blocks: np.ndarray, slots: np.ndarray, layerwise: bool) -> CopyHandle:
        if not self._copiers:
            raise RuntimeError("copy engine is closed")
        to_host = direction == "demote"
        nbytes = len(blocks) * self.slot_bytes
        if len(slots) > 1 and (slots[1:] < slots[:-1]).any():
            # pairs in slot order (each pair is independent; blocks, or slots, are distinct): runs
            # of consecutive slots, e.g. a document demoted tail first, become single DMAs
            order = np.argsort(slots, kind="stable")
            blocks, slots = blocks[order], slots[order]
        backend = self.backend[direction]
        group_by_group = layerwise and self.layerwise_ahead is not None and len(blocks) > 0
        if self.device.type == "cpu":
            ids = torch.from_numpy(blocks), torch.from_numpy(slots)
            if group_by_group:
                h = CopyHandle(direction, backend, len(blocks), nbytes, layerwise=True)
                self._start_pump(h, None, blocks, slots, *ids)
                return h
            self._run_with_fallback(direction, blocks, slots, *ids, to_host, 0, self.num_layers)
            h = CopyHandle(direction, self.backend[direction], len(blocks), nbytes, layerwise=layerwise)
            if layerwise:  # synchronous: every layer is there already
                h._publish_layer(None, self.num_layers)
            return h
        stream = self._streams[direction]
        after = None  # an event of the caller's stream that the copy's writes of device pages wait for
        if self.wait_for_current_stream:  # ordered now, even where the copies are enqueued later
            current = torch.cuda.current_stream(self.device)
            # (.get: a fallback on the submission thread may just have dropped this backend)
            if direction == "promote" and getattr(self._copiers.get(backend), "stages_writes", False):
                # A staged load writes device pages only in its scatter kernels: its DMAs (host to
                # the staging buffer) run while the caller's queued forward does.
                after = current.record_event()
            else:
                stream.wait_stream(current)
        # Page-wise DMA (a descriptor per page) is submitted by a thread either way; large staged
        # demotes too, off the step's critical path. Staged loads and small staged demotes take
        # little driver time to submit and are enqueued here, with no thread hand-off in front.
        threaded = backend == "dma" or (backend == "staged" and to_host and nbytes >= STAGED_THREAD_BYTES)
        background = threaded and len(blocks) > 0
        h = CopyHandle(direction, backend, len(blocks), nbytes, layerwise=layerwise, background=background)
        if background:
            submitter = self._submitters.get(direction)
            if submitter is None:
                submitter = self._submitters[direction] = _Submitter(direction, self.device)
            enqueue = functools.partial(self._enqueue, h, stream, blocks, slots, layerwise, False, after)
            submitter.put(h, enqueue)
        else:
            self._enqueue(h, stream, blocks, slots, layerwise, group_by_group, after)
        return h

    def _enqueue(
        self,
        h: CopyHandle,
        stream,
        blocks: np.ndarray,
        slots: np.ndarray,
        layerwise: bool,
        group_by_group: bool,
        after=None,
    ) -> None:
        """Put h's copies on `stream` (already ordered after the work that produced the source; a
        load's writes of device pages also after the event `after`, when given).
        A layer-wise copy publishes each layer's event as soon as it is recorded; one submitted
        `group_by_group` enqueues its first groups here and the rest as its layers are asked for."""
        t0 = time.perf_counter()
        direction = h.direction
        with torch.cuda.stream(stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            blocks_t = slots_t = None
            if self._copiers[self.backend[direction]].device_indices:  # a fallback uploads its own
                blocks_t, slots_t = _upload(blocks, self.device), _upload(slots, self.device)
            h._record_start(start, keep=(blocks, slots, blocks_t, slots_t))
            if group_by_group:
                self._start_pump(h, stream, blocks, slots, blocks_t, slots_t, time.perf_counter() - t0, after)
                return
            done = None  # layer-wise: the last layer's event
            if layerwise:
                groups = self._copiers[self.backend[direction]].layer_groups(self.num_layers)
                for begin, count in groups:
                    self._enqueue_group(h, stream, blocks, slots, blocks_t, slots_t, begin, count, after)
            else:
                self._run_with_fallback(
                    direction, blocks, slots, blocks_t, slots_t, direction == "demote", 0, self.num_layers,
                    after,
                )
                done = torch.cuda.Event(enable_timing=True)
                done.record(stream)
        # the backend that ran (a failed backend fell back to torch)
        h._enqueue_done(self.backend[direction], time.perf_counter() - t0, done)

    def _start_pump(
        self, h: CopyHandle, stream, blocks, slots, blocks_t, slots_t, seconds: float = 0.0, after=None
    ) -> None:
        """Submit h's layer-wise copy group by group (`_GroupPump`), its first groups now; `stream`
        None: the CPU. `seconds`: host time the submission has taken so far."""

        def enqueue_group(begin: int, count: int) -> None:
            with on_stream(stream):
                self._enqueue_group(h, stream, blocks, slots, blocks_t, slots_t, begin, count, after)

        groups = self._copiers[self.backend[h.direction]].layer_groups(self.num_layers)
        _GroupPump(self, h, groups, enqueue_group, seconds).start()

    def _enqueue_group(
        self, h: CopyHandle, stream, blocks, slots, blocks_t, slots_t, begin: int, count: int, after=None
    ) -> None:
        """Layers [begin, begin + count) of a layer-wise copy on the current stream (`stream`; None:
        the CPU, synchronous), its event published for every layer of the group (they land
        together); the last group's event is timed."""
        if len(blocks):
            self._run_with_fallback(
                h.direction, blocks, slots, blocks_t, slots_t, h.direction == "demote", begin, count, after
            )
        ev = None
        if stream is not None:
            ev = torch.cuda.Event(enable_timing=begin + count == self.num_layers)
            ev.record(stream)
        h._publish_layer(ev, count)

    def _run_with_fallback(
        self, direction, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=None
    ):
        if len(blocks) == 0:
            return
        name = self.backend[direction]
        try:
            copier = self._copiers[name]
            self._run(copier, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after)
            return
        except Exception as e:  # any failure of a fast path falls back to torch (re-raised for torch)
            if name == "torch":
                raise
            log.warning(
                "copy engine: %s backend failed for %s (%r); falling back to torch", name, direction, e
            )
            self.stats.backend_fallbacks += 1
            self.unavailable[name] = f"failed at run time: {e!r}"
            self._copiers.pop(name, None)
            for d in DIRECTIONS:
                if self.backend[d] == name:
                    self.backend[d] = "torch"
        self._run(
            self._copiers["torch"], blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after
        )

    def _run(
        self, copier: Copier, blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=None
    ) -> None:
        """One copier's copy on the current (side) stream; `after`: an event the copy's writes of
        device pages wait for (the whole copy, unless the copier stages its writes)."""
        if copier.device_indices and blocks_t is None:  # uploaded on the current (side) stream
            blocks_t, slots_t = _upload(blocks, self.device), _upload(slots, self.device)
        if after is not None and not copier.stages_writes:
            torch.cuda.current_stream(self.device).wait_event(after)
            after = None
        copier.run(blocks, slots, blocks_t, slots_t, to_host, layer_begin, layer_count, after=after)

    # ---- measurement ------------------------------------------------------------------------------
    def calibrate(self, num_blocks: int = 64, repeats: int = 3) -> dict[str, dict[str, float]]:
        """GB/s of each available backend, each direction, on scratch memory of this geometry.

        Uses its own device pages and its own pinned pool, so no cached KV is touched. ("auto"
        calls it on CUDA only; on the CPU it runs when called, e.g. by tests.)
        """
        nb = max(1, min(num_blocks, CALIBRATE_BYTES // self.slot_bytes))
        scratch = [
            torch.empty(nb, self.page_bytes, dtype=torch.uint8, device=self.device)
            for _ in range(self.num_layers)
        ]
        spool = HostPool(
            HostPoolConfig(nb * self.slot_bytes, self.num_layers, self.page_bytes, device=self.device)
        )
        copiers: dict[str, Copier] = {}
        try:
            if spool.num_slots < nb:
                log.warning("copy engine: calibration pool could not be pinned; keeping default backends")
                return {}
            built, _ = self._build_copiers(
                scratch, spool.slots, spool.address, spool.device_address, spool.chunk_bytes
            )
            copiers.update((k, c) for k, c in built.items() if k in self._copiers)
            del built
            return _measure(copiers, self.device, nb, self.num_layers, self.slot_bytes, repeats)
        finally:
            copiers.clear()  # drop every view of the scratch pool before unmapping it
            if self.device.type == "cpu":
                gc.collect()  # the Triton interpreter leaves reference cycles holding its arguments
            spool.close()


class _Submitter:
    """A thread that enqueues one direction's copies for the engine's caller.

    Building and submitting one DMA descriptor per page takes the driver about as long as the
    copy itself. Enqueued from the thread that runs the model, that time would delay the step's
    forward, and a layer-wise load could start the forward only once every layer's pages were
    submitted. Here the caller only orders the copy stream after its own work (`_submit`) and
    queues the job; this thread builds and submits the descriptors (ctypes releases the GIL inside
    the driver call) and the job publishes each layer's event as it goes, so a forward starts on
    layer 0 while later layers are still being submitted. One thread per direction: a long demote
    never delays a load. Jobs of a direction run in order.
    """

    def __init__(self, direction: str, device: torch.device) -> None:
        self._direction = direction
        self._device = device
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"tpc-{direction}-submit", daemon=True)
        self._thread.start()

    def put(self, h: CopyHandle, enqueue: Callable[[], None]) -> None:
        """Run `enqueue` (which puts h's copies on their stream) on this thread, after the jobs
        queued before it; h learns when it has ended."""
        self._jobs.put((h, enqueue))

    def drain(self) -> None:
        """Return once every queued job is enqueued on its stream (or failed)."""
        self._jobs.join()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            log.warning("copy engine: the %s submission thread did not stop within 60 s", self._direction)

    def _loop(self) -> None:
        torch.cuda.set_device(self._device)
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                h, enqueue = job
                error = None
                try:
                    enqueue()
                except BaseException as e:  # surfaced through the handle: the caller counts it
                    error = e
                    log.warning(
                        "copy engine: %s of %d blocks failed at submission: %s",
                        h.direction, h.num_blocks, repr(e),
                    )
                finally:
                    h._end_background_submission(error)
            finally:
                self._jobs.task_done()


def _measure(
    copiers: dict[str, Copier], device: torch.device, nb: int, num_layers: int, slot_bytes: int, repeats: int
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {d: {} for d in DIRECTIONS}
    rng = np.random.default_rng(0)
    blocks = rng.permutation(nb).astype(np.int64)
    slots = rng.permutation(nb).astype(np.int64)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with on_stream(stream):
        blocks_t = torch.from_numpy(blocks).to(device)
        slots_t = torch.from_numpy(slots).to(device)
        for name, c in copiers.items():
            for d in DIRECTIONS:
                try:
                    results[d][name] = _time_copy(
                        c,
                        stream,
                        blocks,
                        slots,
                        blocks_t,
                        slots_t,
                        d == "demote",
                        num_layers,
                        nb * slot_bytes,
                        repeats,
                    )
                except Exception as e:  # a backend that fails is left out
                    log.warning("copy engine: calibrating %s %s failed: %s", name, d, repr(e))
    if stream is not None:
        stream.synchronize()
    return results


def _time_copy(
    copier: Copier,
    stream,
    blocks,
    slots,
    blocks_t,
    slots_t,
    to_host: bool,
    num_layers: int,
    nbytes: int,
    repeats: int,
) -> float:
    sync = stream.synchronize if stream is not None else (lambda: None)
    copier.run(blocks, slots, blocks_t, slots_t, to_host, 0, num_layers)  # warm-up (compiles the kernel)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copier.run(blocks, slots, blocks_t, slots_t, to_host, 0, num_layers)
        sync()
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def choose_backend(gbps: dict[str, float], available) -> str:
    """The fastest measured backend, a DMA one ("dma" or "staged", the faster) unless beaten by more
    than DMA_PREFERENCE; without measurements, "staged", else "dma", else torch."""
    gbps = {k: v for k, v in gbps.items() if k in available}
    dma = [k for k in ("staged", "dma") if k in available]
    if not gbps:
        return dma[0] if dma else "torch"
    best = max(gbps, key=gbps.get)
    measured_dma = [k for k in dma if k in gbps]
    if measured_dma:
        d = max(measured_dma, key=gbps.get)
        if gbps[d] * DMA_PREFERENCE >= gbps[best]:
            return d
    return best


def _upload(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """Index array -> tensor on `device`, enqueued on the current stream without blocking the host.

    From pageable memory, CUDA first waits for the stream's earlier work (here: the copy stream,
    ordered after the model's stream, so the host would wait for the running forward); from pinned
    memory (torch's caching host allocator, which keeps it until the copy is done) it does not."""
    t = torch.from_numpy(ids)
    if device.type != "cuda":
        return t
    try:
        t = t.pin_memory()
    except RuntimeError as e:  # pinned memory exhausted: the pageable copy is slower, still right
        log.warning("copy engine: pinning %d indices failed (%s); uploading them pageable", len(ids), repr(e))
    return t.to(device, non_blocking=True)


def _ids(x, name: str, limit: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= limit:
        raise ValueError(f"{name}: ids must lie in [0, {limit}), got min {lo}, max {hi}")
    return np.ascontiguousarray(a)


def _same_len(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{na} and {nb}: lengths differ ({len(a)} vs {len(b)})")


def _unique(a: np.ndarray, name: str) -> None:
    if len(a) > 1 and len(np.unique(a)) != len(a):
        raise ValueError(f"{name}: destinations must be distinct (two copies into one place)")
