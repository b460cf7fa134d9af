"""Remote tier microbenchmark: blocks between host-pool slots and a Mooncake Store, through
RemoteStore against the client's raw zero-copy calls on the same slots, in the same run.

    python -m bench.remote_bench                  # Llama-3.1-8B blocks, 16, 64 and 256 per batch
    python -m bench.remote_bench --batches 16 --reps 3 --out /tmp/remote.json

A master and a store service are started on loopback (`remote.local`); this process is the one
client. Per batch size and direction, the median of `--reps` batches, fresh keys each time:
- ours: `RemoteStore.start_put` (existence check, xxh3-64 of each slot, header + slot from the
  registered pool) and `start_get` (header + slot into the pool, header and checksum verified);
- raw: `batch_put_from` / `batch_get_into` of the bare slots, one buffer per value;
- raw_multi_get: `batch_get_into_multi_buffers` of our values into [header, slot] without checks
  (what reading the header as its own buffer costs);
- checksum: xxh3-64 over the batch's slots alone (the CPU work our path adds each way).
Output: a table, one line appended to bench/results.jsonl (kind "remote"), or `--out` JSON.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from bench.common import environment, print_table, save_run
from bench.models import get_model
from triton_prefix_cache.host_pool import HostPool, HostPoolConfig
from triton_prefix_cache.remote.keys import HEADER_BYTES, RemoteNamespace, checksum
from triton_prefix_cache.remote.local import LocalStore
from triton_prefix_cache.remote.store import BlockStatus, RemoteStore


def median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def run(args: argparse.Namespace) -> dict:
    spec = get_model(args.model)
    layers = spec.num_layers
    page = spec.kv_bytes_per_token() // layers * args.block_size
    ns = RemoteNamespace(spec.name, spec.dtype, args.block_size, layers, page, "bench:random")
    slot = ns.slot_bytes
    most = max(args.batches)
    # every rep writes fresh keys both ways (ours and raw), plus a warm-up batch
    need = 2 * sum(args.batches) * (args.reps + 1) * (slot + HEADER_BYTES)
    segment_gib = max(1 / 64, need * 1.3 / (1 << 30))
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalStore.start(segment_gib, tmp) as local, \
            HostPool(HostPoolConfig(size_bytes=2 * most * slot, num_layers=layers, page_bytes=page,
                                    device="cpu")) as pool:
        view = pool.slots.numpy()
        view[:] = rng.integers(0, 256, view.shape, dtype=np.uint8)
        store = RemoteStore.connect(local.url, ns, pool)
        client = store.client
        headers = np.zeros((most, HEADER_BYTES), dtype=np.uint8)
        client.register_buffer(headers.ctypes.data, headers.nbytes)
        try:
            for n in args.batches:
                src = np.arange(n)
                dst = np.arange(most, most + n)
                src_addr = (pool.address + src * slot).tolist()
                dst_addr = (pool.address + dst * slot).tolist()
                t = {"put": [], "get": [], "raw_put": [], "raw_get": [], "raw_multi_get": [], "checksum": []}
                multi = [[headers.ctypes.data + i * HEADER_BYTES, a] for i, a in enumerate(dst_addr)]
                for rep in range(args.reps + 1):
                    keys = rng.integers(-(2**63), 2**63 - 1, (n, 2), dtype=np.int64)
                    raw_keys = [f"raw/{k}" for k in ns.object_keys(keys)]
                    t0 = time.perf_counter()
                    r = store.wait(store.start_put(keys, src))
                    t1 = time.perf_counter()
                    g = store.wait(store.start_get(keys, dst))
                    t2 = time.perf_counter()
                    codes = client.batch_put_from(raw_keys, src_addr, [slot] * n)
                    t3 = time.perf_counter()
                    got = client.batch_get_into(raw_keys, dst_addr, [slot] * n)
                    t4 = time.perf_counter()
                    multi_got = client.batch_get_into_multi_buffers(ns.object_keys(keys), multi,
                                                                    [[HEADER_BYTES, slot]] * n)
                    t5 = time.perf_counter()
                    for s in src:
                        checksum(view[s])
                    t6 = time.perf_counter()
                    if not (r.status == BlockStatus.OK).all() or not g.ok.all():
                        raise RuntimeError(f"batch of {n}: put {r.status.tolist()}, get {g.status.tolist()}")
                    if any(c != 0 for c in codes) or any(c != slot for c in got) or any(
                            c != slot + HEADER_BYTES for c in multi_got):
                        raise RuntimeError(f"raw batch of {n}: put {codes}, get {got}, multi get {multi_got}")
                    if rep == 0:
                        continue  # warm-up: connections, first touch of the segment
                    for name, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                        t[name].append(dt)
                nbytes = n * slot
                row = {"blocks": n, "MiB": nbytes / (1 << 20)}
                for name in t:
                    row[f"{name} GB/s"] = median_gbps(nbytes, t[name])
                row["put / raw"] = row["put GB/s"] / row["raw_put GB/s"]
                row["get / raw"] = row["get GB/s"] / row["raw_get GB/s"]
                rows.append(row)
        finally:
            stats = store.stats.as_dict()
            client.unregister_buffer(headers.ctypes.data)
            store.close()
    return {"model": spec.name, "block_size": args.block_size, "slot_bytes": slot, "reps": args.reps,
            "transport": "tcp loopback, one client process", "rows": rows, "remote_stats": stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the result here instead of appending to the record")
    args = ap.parse_args(argv)
    env = environment()
    print(f"# {env['command']}\n# {env['device']}, {env['cpu_count']} CPUs, torch {env['torch']}")
    result = run(args)
    print(f"# {result['model']}, {args.block_size}-token blocks: {result['slot_bytes'] / (1 << 20):g} MiB "
          f"per block; {result['transport']}; median of {args.reps}")
    cols = ["blocks", "MiB", "put GB/s", "raw_put GB/s", "put / raw", "get GB/s", "raw_get GB/s", "get / raw",
            "raw_multi_get GB/s", "checksum GB/s"]
    print_table(result["rows"], cols)
    from importlib.metadata import PackageNotFoundError, version

    try:
        result["mooncake"] = version("mooncake-transfer-engine-non-cuda")
    except PackageNotFoundError:
        result["mooncake"] = version("mooncake-transfer-engine")
    where = save_run("remote", result, args.out)
    print(f"# result: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
