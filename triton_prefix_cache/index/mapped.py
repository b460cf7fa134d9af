"""Mapped staging: pinned host memory the index's kernels read and write in place.

A CUDA index that answers the host (the scheduler's lookups) must move a few kilobytes each way
per call. A `.to(device)` from pageable memory and a `.cpu()` of the answer are copy-engine
transfers: on an engine's GPU they queue behind the KV cache's copies (gigabytes a step), and the
pageable one goes through the driver's bounce buffer, so one lookup would wait for them. Pinned
host memory is mapped into the device's address space instead: the host writes a call's inputs
there, the kernels read them over PCIe, a small SM kernel writes the answers back there, and the
host waits for one event on the index's stream, for nothing else.

`MappedStaging` hands out regions of one pinned buffer per call (`reset` frees them all): the
caller waits for its stream before `reset`, so a region is never rewritten while a kernel reads
it. The buffer grows by doubling; the outgrown one stays alive until the next `reset`.
"""

from __future__ import annotations

import torch

#: Region alignment in bytes (any dtype's, and whole cache lines for the kernels' loads).
ALIGN = 256


class MappedStaging:
    """Regions of pinned, device-mapped host memory: (host tensor, device tensor) over the same bytes."""

    def __init__(self, device: torch.device, nbytes: int = 1 << 16) -> None:
        if device.type != "cuda":
            raise ValueError(f"device: mapped staging needs a CUDA device, got {device}")
        self.device = device
        self._host: torch.Tensor | None = None
        self._dev: torch.Tensor | None = None
        self._outgrown: list[torch.Tensor] = []
        self._used = 0
        self._grow(nbytes)

    @property
    def capacity(self) -> int:
        return 0 if self._host is None else self._host.numel()

    def _grow(self, need: int) -> None:
        size = max(need, 2 * self.capacity, ALIGN)
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dev = _device_alias(host, self.device)
        if self._host is not None:
            self._outgrown.append(self._host)  # regions handed out in this call may still be read
        self._host, self._dev = host, dev
        self._used = 0

    def take(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(host uint8, device uint8) views of one fresh region of `nbytes`, valid until `reset`."""
        start = -(-self._used // ALIGN) * ALIGN
        if start + nbytes > self.capacity:
            self._grow(start + nbytes)
            start = 0
        self._used = start + nbytes
        assert self._host is not None and self._dev is not None
        return self._host[start : start + nbytes], self._dev[start : start + nbytes]

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor over a mapped copy of the CPU tensor `t` (same dtype and shape)."""
        t = t.contiguous()
        host, dev = self.take(t.numel() * t.element_size())
        host.view(t.dtype).view(t.shape).copy_(t)
        return dev.view(t.dtype).view(t.shape)

    def out(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(host, device) tensors of `like`'s dtype and shape over one region, for an answer."""
        host, dev = self.take(like.numel() * like.element_size())
        return host.view(like.dtype).view(like.shape), dev.view(like.dtype).view(like.shape)

    def reset(self) -> None:
        """Free every region (the caller has waited for every kernel that used them)."""
        self._used = 0
        self._outgrown.clear()


def _device_alias(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA uint8 tensor over the device mapping of pinned `host` (no copy)."""
    from ..copiers import device_view

    address = host.data_ptr()
    try:  # the driver's word for the mapping; with unified addressing it is the host address
        from ..cuda_driver import get_driver

        mapped = get_driver().host_device_pointer(address) or address
    except Exception:  # no driver through ctypes: unified addressing (every 64-bit CUDA platform)
        mapped = address
    return device_view(mapped, host.numel(), device)
