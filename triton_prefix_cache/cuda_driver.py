"""The few CUDA driver calls torch does not expose, through ctypes on libcuda.so.1.

- host memory registration that releases the GIL and works from any thread (the pool pins its
  chunks in parallel), and the device alias of registered memory;
- batched DMA: `cuMemcpyBatchAsync`, one driver call for many (src, dst, size) descriptors given as
  numpy arrays (no Python object per page). Its entry point comes from cuda-bindings' (cuda-python)
  `cuGetProcAddress` where that is importable, else from the driver's own `cuGetProcAddress_v2`;
  either way the CUDA 12.8 ABI (with the `failIdx` out-argument) is asked for, which every driver
  since 12.8 serves, including CUDA 13 (whose headers rename the 8-argument form `_v2`);
- strided DMA: `cuMemcpy2DAsync`, one call for a run of equal rows at a fixed pitch on each side
  (a layer group of consecutive host slots: one call where the batch takes one descriptor a slot).

Nothing here runs at import; `get_driver()` raises CudaDriverError on a machine without CUDA.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

CU_MEMHOSTREGISTER_PORTABLE = 0x01
CU_MEMHOSTREGISTER_DEVICEMAP = 0x02
CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1
#: CUmemorytype of a unified (UVA) address: the driver tells pinned host from device memory itself.
CU_MEMORYTYPE_UNIFIED = 4
#: cudaVersion asked of cuGetProcAddress for cuMemcpyBatchAsync: the 9-argument 12.8 ABI.
_BATCH_ABI_VERSION = 12080


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed, or the driver (or one of its entry points) is unavailable."""


class Driver:
    """Typed ctypes handles on the driver calls used here. One per process (`get_driver`)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaDriverError(f"the CUDA driver library libcuda.so.1 cannot be loaded: {e}") from e
        self.lib = lib
        vp, sz, u32, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int

        def fn(name: str, *argtypes):
            try:
                f = getattr(lib, name)
            except AttributeError as e:
                raise CudaDriverError(f"the CUDA driver has no {name}: {e}") from e
            f.argtypes = list(argtypes)
            f.restype = i32
            return f

        self._init = fn("cuInit", u32)
        self._version = fn("cuDriverGetVersion", ctypes.POINTER(i32))
        self._error_name = fn("cuGetErrorName", i32, ctypes.POINTER(ctypes.c_char_p))
        self._ctx_get = fn("cuCtxGetCurrent", ctypes.POINTER(vp))
        self._ctx_set = fn("cuCtxSetCurrent", vp)
        self._register = fn("cuMemHostRegister_v2", vp, sz, u32)
        self._unregister = fn("cuMemHostUnregister", vp)
        self._dev_ptr = fn("cuMemHostGetDevicePointer_v2", ctypes.POINTER(ctypes.c_uint64), vp, u32)
        self._memcpy2d = fn("cuMemcpy2DAsync_v2", vp, vp)
        self._proc = fn(
            "cuGetProcAddress_v2",
            ctypes.c_char_p,
            ctypes.POINTER(vp),
            i32,
            ctypes.c_uint64,
            ctypes.POINTER(i32),
        )
        self.check(self._init(0), "cuInit")

    def error_name(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self._error_name(int(code), ctypes.byref(s)) != 0 or not s.value:
            return f"CUresult {code}"
        return f"{s.value.decode()} ({code})"

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise CudaDriverError(f"{what} failed: {self.error_name(code)}")

    @property
    def version(self) -> int:
        v = ctypes.c_int()
        self.check(self._version(ctypes.byref(v)), "cuDriverGetVersion")
        return v.value

    def current_context(self) -> int:
        ctx = ctypes.c_void_p()
        self.check(self._ctx_get(ctypes.byref(ctx)), "cuCtxGetCurrent")
        return ctx.value or 0

    def set_context(self, ctx: int) -> None:
        self.check(self._ctx_set(ctx), "cuCtxSetCurrent")

    def host_register(self, address: int, nbytes: int, flags: int) -> int:
        """cuMemHostRegister; returns the CUresult (0 = success) instead of raising."""
        return int(self._register(address, nbytes, flags))

    def host_unregister(self, address: int) -> int:
        return int(self._unregister(address))

    def host_device_pointer(self, address: int) -> int:
        """The device address of registered host memory (equal to `address` on most UVA systems)."""
        out = ctypes.c_uint64()
        self.check(self._dev_ptr(ctypes.byref(out), address, 0), "cuMemHostGetDevicePointer")
        return out.value

    def memcpy2d_async(self, copy: _Memcpy2D, stream: int) -> int:
        """cuMemcpy2DAsync; returns the CUresult (0 = success) instead of raising."""
        return int(self._memcpy2d(ctypes.addressof(copy), stream))

    def proc_address(self, symbol: str, cuda_version: int) -> int:
        pfn = ctypes.c_void_p()
        status = ctypes.c_int()
        code = self._proc(symbol.encode(), ctypes.byref(pfn), cuda_version, 0, ctypes.byref(status))
        self.check(code, f"cuGetProcAddress({symbol})")
        if status.value != 0 or not pfn.value:
            raise CudaDriverError(
                f"cuGetProcAddress({symbol}, {cuda_version}): not found (status {status.value})"
            )
        return pfn.value


_driver_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _load_driver() -> Driver:
    return Driver()


def get_driver() -> Driver:
    """The process-wide driver handle; raises CudaDriverError where there is no CUDA driver."""
    with _driver_lock:
        return _load_driver()


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D (the _v2 layout, 64-bit sizes and device pointers)."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t),
        ("srcY", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64),
        ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t),
        ("dstY", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64),
        ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
    ]


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    """CUmemcpyAttributes: the location hints are left zero (ignored for pinned and device memory)."""

    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


_BATCH_FN = ctypes.CFUNCTYPE(
    ctypes.c_int,  # CUresult
    ctypes.c_void_p,  # CUdeviceptr *dsts
    ctypes.c_void_p,  # CUdeviceptr *srcs
    ctypes.c_void_p,  # size_t *sizes
    ctypes.c_size_t,  # count
    ctypes.c_void_p,  # CUmemcpyAttributes *attrs
    ctypes.c_void_p,  # size_t *attrsIdxs
    ctypes.c_size_t,  # numAttrs
    ctypes.c_void_p,  # size_t *failIdx
    ctypes.c_void_p,  # CUstream
)


def _batch_entry_point(driver: Driver) -> tuple[int, str]:
    """(function pointer, where it came from) of cuMemcpyBatchAsync in its 12.8 ABI."""
    errors = []
    try:
        from cuda.bindings import driver as cbd  # cuda-python, present on the GPU image

        err, pfn, status = cbd.cuGetProcAddress(b"cuMemcpyBatchAsync", _BATCH_ABI_VERSION, 0)
        if int(getattr(err, "value", err)) == 0 and int(getattr(status, "value", status)) == 0 and pfn:
            return int(pfn), "cuda.bindings"
        errors.append(f"cuda.bindings cuGetProcAddress: {err}, status {status}")
    except ImportError as e:
        errors.append(f"cuda.bindings not importable ({e})")
    except Exception as e:  # a bindings version with another signature: use the driver
        errors.append(f"cuda.bindings cuGetProcAddress raised {e!r}")
    try:
        return driver.proc_address("cuMemcpyBatchAsync", _BATCH_ABI_VERSION), "libcuda cuGetProcAddress_v2"
    except (CudaDriverError, AttributeError) as e:
        errors.append(str(e))
    raise CudaDriverError(
        "cuMemcpyBatchAsync is unavailable (needs a CUDA 12.8+ driver): " + "; ".join(errors)
    )


class BatchMemcpy:
    """cuMemcpyBatchAsync over numpy descriptor arrays, enqueued on a given (non-default) stream;
    `copy2d` enqueues one strided copy (cuMemcpy2DAsync) on such a stream.

    Sources are read in stream order (CU_MEMCPY_SRC_ACCESS_ORDER_STREAM), so a copy never sees
    data older than the work queued before it on that stream. The descriptor arrays are consumed
    by the call itself.
    """

    def __init__(self, driver: Driver | None = None) -> None:
        self.driver = driver or get_driver()
        pfn, self.source = _batch_entry_point(self.driver)
        self._fn = _BATCH_FN(pfn)
        self._attrs = _MemcpyAttributes(srcAccessOrder=CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, flags=0)
        self._attr_idx = np.zeros(1, dtype=np.uint64)
        # one descriptor reused by copy2d (the driver reads it during the call only), under a lock:
        # copies come from two threads (the demote thread, the step's)
        self._copy2d_lock = threading.Lock()
        self._copy2d = _Memcpy2D(srcMemoryType=CU_MEMORYTYPE_UNIFIED, dstMemoryType=CU_MEMORYTYPE_UNIFIED)

    def __call__(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int) -> None:
        n = int(dsts.shape[0])
        if n == 0:
            return
        if not stream:
            raise ValueError(
                "stream: cuMemcpyBatchAsync refuses the legacy default stream; pass a side stream"
            )
        d = np.ascontiguousarray(dsts, dtype=np.uint64)
        s = np.ascontiguousarray(srcs, dtype=np.uint64)
        z = np.ascontiguousarray(sizes, dtype=np.uint64)
        if s.shape[0] != n or z.shape[0] != n:
            raise ValueError(f"dsts, srcs, sizes: lengths differ ({n}, {s.shape[0]}, {z.shape[0]})")
        fail = ctypes.c_size_t(0)
        code = self._fn(
            d.ctypes.data,
            s.ctypes.data,
            z.ctypes.data,
            n,
            ctypes.addressof(self._attrs),
            self._attr_idx.ctypes.data,
            1,
            ctypes.addressof(fail),
            stream,
        )
        if code != 0:
            i = min(fail.value, n - 1)
            raise CudaDriverError(
                f"cuMemcpyBatchAsync of {n} copies failed: {self.driver.error_name(code)} at copy "
                f"{fail.value} (dst {int(d[i]):#x}, src {int(s[i]):#x}, {int(z[i])} bytes)"
            )

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
               stream: int) -> None:
        """`height` rows of `width` bytes, row i from `src + i * src_pitch` to `dst + i * dst_pitch`
        (unified addresses: pinned host or device memory), enqueued on `stream`."""
        if height <= 0:
            return
        if not stream:
            raise ValueError("stream: pass a side stream, not the legacy default stream")
        if width > min(src_pitch, dst_pitch):
            raise ValueError(f"width {width} exceeds a pitch ({src_pitch}, {dst_pitch}): rows would overlap")
        with self._copy2d_lock:
            c = self._copy2d
            c.srcDevice, c.srcPitch, c.dstDevice, c.dstPitch = src, src_pitch, dst, dst_pitch
            c.WidthInBytes, c.Height = width, height
            code = self.driver.memcpy2d_async(c, stream)
        if code != 0:
            raise CudaDriverError(
                f"cuMemcpy2DAsync of {height} rows x {width} bytes failed: {self.driver.error_name(code)} "
                f"(dst {dst:#x} pitch {dst_pitch}, src {src:#x} pitch {src_pitch})"
            )
