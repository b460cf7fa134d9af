"""The CPU table's probe loops in C (`cpu_table.py`), compiled on first use and called through ctypes.

Per-key loops are what a CPU does best with a hash table; vectorized numpy pays tens of
microseconds per probe round instead. The C source is generated from keys.py (the markers and the
hash), so it follows the same layout and hash as every other backend. It is built once per machine
with the system C compiler into a cache folder (`$TPC_CACHE_DIR`, default
~/.cache/triton-prefix-cache); where no compiler works, `load()` returns None and the CPU table
probes with numpy. The loops are plain C rather than numba because loading LLVM into a vLLM 0.32
process breaks vLLM's kernel-override scan (vllm/triton_utils/dispatcher.py calls `vars()` on every
module attribute, and llvmlite's library wrapper answers with a function wrapper).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .. import keys as K

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#define EMPTY ((int64_t)@EMPTY@ULL)
#define TOMB ((int64_t)@TOMB@ULL)
#define FIRST_REAL ((int64_t)@FIRST_REAL@ULL)

/* keys.hash_words (uint64_t: >> is the logical shift, * wraps) */
static inline int64_t home(int64_t w0, int64_t w1, int64_t mask) {
    uint64_t x = (uint64_t)w0 ^ ((uint64_t)w1 * @HASH_MUL_IN@ULL);
    x = (x ^ (x >> @HASH_SHIFT_1@)) * @HASH_MUL_1@ULL;
    x = (x ^ (x >> @HASH_SHIFT_2@)) * @HASH_MUL_2@ULL;
    x = x ^ (x >> @HASH_SHIFT_3@);
    return (int64_t)(x & (uint64_t)mask);
}

void tpc_home(const int64_t *k, int64_t n, int64_t mask, int64_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = home(k[2 * i], k[2 * i + 1], mask);
}

/* slot of the key or -1; *tomb: first tombstone on the way (or -1); *empty: the EMPTY that ended it */
static inline int64_t find(const int64_t *tk, int64_t w0, int64_t w1, int64_t mask,
                           int64_t *tomb, int64_t *empty) {
    int64_t pos = home(w0, w1, mask);
    *tomb = -1;
    for (;;) {
        int64_t s0 = tk[2 * pos];
        if (s0 == w0 && tk[2 * pos + 1] == w1) return pos;
        if (s0 == EMPTY) { *empty = pos; return -1; }
        if (s0 == TOMB && *tomb < 0) *tomb = pos;
        pos = (pos + 1) & mask;
    }
}

static inline int64_t key0(int64_t w0) { return w0 < FIRST_REAL ? FIRST_REAL : w0; }

void tpc_lookup(const int64_t *tk, const int32_t *tv, int64_t mask, const int64_t *k, int64_t n,
                int32_t *out) {
    int64_t tomb, empty;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = find(tk, key0(k[2 * i]), k[2 * i + 1], mask, &tomb, &empty);
        out[i] = s >= 0 ? tv[s] : -1;
    }
}

/* how many leading keys are present: stops at the first miss */
int64_t tpc_leading(const int64_t *tk, int64_t mask, const int64_t *k, int64_t n) {
    int64_t tomb, empty;
    for (int64_t i = 0; i < n; i++)
        if (find(tk, key0(k[2 * i]), k[2 * i + 1], mask, &tomb, &empty) < 0) return i;
    return n;
}

/* one key after the other, as a dict would: the first occurrence is new, later ones update */
int64_t tpc_insert(int64_t *tk, int32_t *tv, int64_t mask, const int64_t *k, const int32_t *v, int64_t n,
                   uint8_t *new_) {
    int64_t reused = 0, tomb, empty;
    for (int64_t i = 0; i < n; i++) {
        int64_t w0 = key0(k[2 * i]), w1 = k[2 * i + 1];
        int64_t s = find(tk, w0, w1, mask, &tomb, &empty);
        new_[i] = s < 0;
        if (s < 0) {
            s = tomb >= 0 ? tomb : empty;
            reused += tomb >= 0;
            tk[2 * s] = w0;
            tk[2 * s + 1] = w1;
        }
        tv[s] = v[i];
    }
    return reused;
}

void tpc_remove(int64_t *tk, int64_t mask, const int64_t *k, int64_t n, uint8_t *removed) {
    int64_t tomb, empty;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = find(tk, key0(k[2 * i]), k[2 * i + 1], mask, &tomb, &empty);
        removed[i] = s >= 0;
        if (s >= 0) tk[2 * s] = TOMB;
    }
}
"""
# Every constant comes from keys.py: the markers, and the hash (one definition for all backends).
for _name, _value in (
    ("EMPTY", K.EMPTY),
    ("TOMB", K.TOMBSTONE),
    ("FIRST_REAL", K.FIRST_REAL),
    ("HASH_MUL_IN", K.HASH_MUL_IN),
    ("HASH_MUL_1", K.HASH_MUL_1),
    ("HASH_MUL_2", K.HASH_MUL_2),
):
    _SOURCE = _SOURCE.replace(f"@{_name}@", hex(_value % 2**64))
for _name in ("HASH_SHIFT_1", "HASH_SHIFT_2", "HASH_SHIFT_3"):
    _SOURCE = _SOURCE.replace(f"@{_name}@", str(getattr(K, _name)))
assert "@" not in _SOURCE

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_lib: ctypes.CDLL | None = None
_tried = False


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None where that is impossible."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("CPU index: no C compiler; the CPU table probes with numpy")
        return None
    tag = hashlib.sha1(_SOURCE.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TPC_CACHE_DIR", Path.home() / ".cache" / "triton-prefix-cache"))
    so = cache / f"cpu_table-{tag}.so"
    try:
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "cpu_table.c"
                src.write_text(_SOURCE)
                out = Path(tmp) / so.name
                subprocess.run(
                    [cc, "-O3", "-shared", "-fPIC", "-o", str(out), str(src)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(out, so)  # atomic: concurrent builders never load a half-written file
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU index: could not build or load the C probe (%s); the CPU table probes with numpy",
                    str(e))
        return None
    lib.tpc_home.argtypes = [_P, _I64, _I64, _P]
    lib.tpc_home.restype = None
    lib.tpc_lookup.argtypes = [_P, _P, _I64, _P, _I64, _P]
    lib.tpc_lookup.restype = None
    lib.tpc_leading.argtypes = [_P, _I64, _P, _I64]
    lib.tpc_leading.restype = _I64
    lib.tpc_insert.argtypes = [_P, _P, _I64, _P, _P, _I64, _P]
    lib.tpc_insert.restype = _I64
    lib.tpc_remove.argtypes = [_P, _I64, _P, _I64, _P]
    lib.tpc_remove.restype = None
    _lib = lib
    return lib


def _loaded() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("CPU index: the C probe could not be built here (see the log); use numpy")
    return lib


def _ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


def home_slot(k: np.ndarray, num_slots: int) -> np.ndarray:
    """keys.home_slot computed by the C code (for the test that every backend hashes alike)."""
    k = np.ascontiguousarray(k)
    out = np.empty(len(k), dtype=np.int64)
    _loaded().tpc_home(_ptr(k), len(k), num_slots - 1, _ptr(out))
    return out


def lookup(tk: np.ndarray, tv: np.ndarray, k: np.ndarray) -> np.ndarray:
    lib = _loaded()
    k = np.ascontiguousarray(k)
    out = np.empty(len(k), dtype=np.int32)
    lib.tpc_lookup(_ptr(tk), _ptr(tv), len(tk) - 1, _ptr(k), len(k), _ptr(out))
    return out


def leading(tk: np.ndarray, k: np.ndarray) -> int:
    """How many leading keys of k are in the table (stops at the first miss)."""
    k = np.ascontiguousarray(k)
    return int(_loaded().tpc_leading(_ptr(tk), len(tk) - 1, _ptr(k), len(k)))


def insert(tk: np.ndarray, tv: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, int]:
    lib = _loaded()
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    new = np.zeros(len(k), dtype=np.uint8)
    reused = lib.tpc_insert(_ptr(tk), _ptr(tv), len(tk) - 1, _ptr(k), _ptr(v), len(k), _ptr(new))
    return new.view(bool), int(reused)


def remove(tk: np.ndarray, k: np.ndarray) -> np.ndarray:
    lib = _loaded()
    k = np.ascontiguousarray(k)
    removed = np.zeros(len(k), dtype=np.uint8)
    lib.tpc_remove(_ptr(tk), len(tk) - 1, _ptr(k), len(k), _ptr(removed))
    return removed.view(bool)
