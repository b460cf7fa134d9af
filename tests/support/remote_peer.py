"""A store client in its own process, driven by tests/unit/test_remote_store.py: one JSON request per line
on stdin, one JSON answer per line on stdout (the Mooncake client logs to stderr).

Requests ({"op": ...}): connect (url, ns: RemoteNamespace fields, slots, name), fill (slots, seed),
put, get (keys, slots), exists (keys), corrupt (keys, where: "payload" | "header"), timed (a
sequence of calls after the store died, each timed), stats, quit. A peer holds one host pool and
any number of stores over it, each with its own client, chosen by `name` (default "main"). Slot
contents are derived from a seed so two processes can compare them by digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import numpy as np

from triton_prefix_cache.host_pool import HostPool, HostPoolConfig
from triton_prefix_cache.remote.keys import HEADER_BYTES, RemoteNamespace
from triton_prefix_cache.remote.store import RemoteStore, RemoteStoreError


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def slot_bytes_for(seed: int, slot: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng([seed, slot]).integers(0, 256, shape, dtype=np.uint8)


class Peer:
    def __init__(self) -> None:
        self.pool: HostPool | None = None
        self.stores: dict[str, RemoteStore] = {}
        self.warnings = Count()
        logging.getLogger("triton_prefix_cache.remote").addHandler(self.warnings)

    def connect(self, url: str, ns: dict, slots: int, name: str = "main") -> dict:
        if name in self.stores:
            self.stores.pop(name).close()
        namespace = RemoteNamespace(**ns)
        if self.pool is None or (self.pool.num_layers, self.pool.page_bytes) != (
                namespace.num_layers, namespace.page_bytes):
            self.pool = HostPool(HostPoolConfig(size_bytes=slots * namespace.slot_bytes,
                                                num_layers=namespace.num_layers,
                                                page_bytes=namespace.page_bytes, device="cpu"))
        t = time.monotonic()
        try:
            self.stores[name] = RemoteStore.connect(url, namespace, self.pool)
        except RemoteStoreError as e:
            return {"error": str(e), "seconds": time.monotonic() - t}
        return {"seconds": time.monotonic() - t}

    def fill(self, slots: list[int], seed: int) -> dict:
        view = self.pool.slots.numpy()
        for s in slots:
            view[s] = slot_bytes_for(seed, s, view.shape[1:])
        return {"digests": self.digests(slots)}

    def digests(self, slots: list[int]) -> list[str]:
        view = self.pool.slots.numpy()
        return [hashlib.sha1(view[s].tobytes()).hexdigest() for s in slots]

    def put(self, keys: list, slots: list[int], timeout: float | None = 60, name: str = "main") -> dict:
        t = time.monotonic()
        store = self.stores[name]
        r = store.wait(store.start_put(np.array(keys, dtype=np.int64), slots), timeout)
        return {"status": r.status.tolist(), "nbytes": r.nbytes, "timed_out": r.timed_out,
                "seconds": time.monotonic() - t}

    def get(self, keys: list, slots: list[int], timeout: float | None = 60, name: str = "main") -> dict:
        t = time.monotonic()
        store = self.stores[name]
        r = store.wait(store.start_get(np.array(keys, dtype=np.int64), slots), timeout)
        return {"status": r.status.tolist(), "nbytes": r.nbytes, "timed_out": r.timed_out,
                "digests": self.digests(slots), "seconds": time.monotonic() - t}

    def exists(self, keys: list, name: str = "main") -> dict:
        t = time.monotonic()
        found = self.stores[name].exists(np.array(keys, dtype=np.int64))
        return {"found": found.tolist(), "seconds": time.monotonic() - t}

    def corrupt(self, keys: list, where: str, name: str = "main") -> dict:
        """Flip one byte of each stored value through the raw client: read it into a registered
        buffer, flip, remove, write it back."""
        store = self.stores[name]
        client = store.client
        size = HEADER_BYTES + store.namespace.slot_bytes
        buf = np.zeros(size, dtype=np.uint8)
        assert client.register_buffer(buf.ctypes.data, size) == 0
        codes = []
        for obj in store.namespace.object_keys(np.array(keys, dtype=np.int64)):
            assert client.get_into(obj, buf.ctypes.data, size) == size
            buf[HEADER_BYTES + size // 2 if where == "payload" else 40] ^= 0xFF
            client.remove(obj, True)
            codes.append(client.put_from(obj, buf.ctypes.data, size))
        client.unregister_buffer(buf.ctypes.data)
        return {"codes": codes}

    def timed(self, keys: list, slots: list[int], rounds: int, name: str = "main") -> dict:
        """Lookups, puts and gets against a store that went away: how long each took, what it said."""
        out = []
        keys_np = np.array(keys, dtype=np.int64)
        for _ in range(rounds):
            for op in ("exists", "put", "get"):
                t = time.monotonic()
                if op == "exists":
                    res = self.stores[name].exists(keys_np).tolist()
                else:
                    store = self.stores[name]
                    start = store.start_put if op == "put" else store.start_get
                    r = store.wait(start(keys_np, slots), timeout=120)
                    res = r.status.tolist()
                out.append({"op": op, "seconds": time.monotonic() - t, "result": res})
        return {"calls": out}

    def stats(self, name: str = "main") -> dict:
        store = self.stores[name]
        return {"stats": store.stats.as_dict(), "degraded": store.degraded,
                "warnings": self.warnings.messages}

    def quit(self) -> dict:
        """Close the main store; the others go with the process (a client's close takes about a
        second, one at a time)."""
        t = time.monotonic()
        if "main" in self.stores:
            self.stores["main"].close()
        return {"seconds": time.monotonic() - t}


def main() -> None:
    peer = Peer()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            answer = getattr(peer, op)(**req)
        except Exception as e:  # the test shows it
            answer = {"exception": repr(e)}
        print(json.dumps(answer), flush=True)
        if op == "quit":
            os._exit(0)


if __name__ == "__main__":
    main()
