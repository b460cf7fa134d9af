"""Copy microbenchmark of the host tier: demote/promote of KV blocks against pinned memcpy.

    python -m bench.copy_bench                         # GPU host: everything
    python -m bench.copy_bench --batches 64 1024 --pool-create-gib 0    # quick, no 64 GiB pool

Geometry from bench/models.py (default Llama-3.1-8B, 16-token blocks: 32 layers x 64 KiB pages,
2 MiB per block), one device tensor per layer as vLLM 0.26 allocates them. For each batch of
blocks (random permutations of device blocks and host slots) and each backend (dma =
cuMemcpyBatchAsync, triton = direct-access kernel, torch = per-layer index ops), both directions,
layer-wise promote too: wall time from submission to completion, checked byte for byte against
the reference on a sample. Baseline in the same run: one contiguous pinned<->device copy of the
same size (torch copy_, which is cudaMemcpyAsync) each way. Also: a Triton launch-config sweep,
both directions at once, and the time to create (pin) a 64 GiB host pool.
Output: a table, one line appended to bench/results.jsonl (kind "copy") and the chart
bench/results/copy-<model>.png (fraction of memcpy against blocks, per backend and direction).
Target: every backend chosen by "auto" at >= 85% of the same-size pinned memcpy, 64..4096 blocks,
both directions; 64 GiB pool in < 10 s.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import chart_beside, environment, print_table, save_run
from bench.models import get_model
from triton_prefix_cache import copiers
from triton_prefix_cache.copy_engine import CopyEngine
from triton_prefix_cache.host_pool import HostPool, HostPoolConfig

TARGET_FRACTION = 0.85
TARGET_POOL_SECONDS = 10.0


def extra_versions() -> dict:
    out: dict = {"cuda_runtime": torch.version.cuda}
    try:
        from triton_prefix_cache.cuda_driver import get_driver

        out["cuda_driver"] = get_driver().version
    except Exception as e:
        out["cuda_driver"] = f"unavailable: {e}"
    try:
        import cuda.bindings

        out["cuda_bindings"] = getattr(cuda.bindings, "__version__", "present")
    except ImportError:
        out["cuda_bindings"] = None
    return out


def wall(fn, iters: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn (which must block until its copy completes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def memcpy_baseline(host: torch.Tensor, dev: torch.Tensor, nbytes: int, iters: int) -> dict:
    """GB/s of one contiguous pinned copy of nbytes each way (on a side stream, like the engine).

    `host` is a buffer from the CUDA pinned allocator, not the pool: the driver rejects one DMA
    that spans two of the pool's chunk registrations.
    """
    s = torch.cuda.Stream() if dev.is_cuda else None
    h, d = host.view(-1)[:nbytes], dev.view(-1)[:nbytes]

    def run(dst, src):
        if s is None:  # CPU smoke run
            dst.copy_(src)
            return
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
        s.synchronize()

    out = {}
    for name, (dst, src) in {"h2d": (d, h), "d2h": (h, d)}.items():
        t = wall(lambda dst=dst, src=src: run(dst, src), iters)
        out[name] = nbytes / statistics.median(t) / 1e9
    return out


def verify(
    pool: HostPool, layers: list[torch.Tensor], direction: str, blocks, slots, run, sample: int = 8
) -> bool:
    """Scramble the destination of a sample of pairs, copy once more, byte-compare both sides."""
    idx = np.linspace(0, len(blocks) - 1, min(sample, len(blocks))).astype(int)
    probe = (0, len(layers) // 2, len(layers) - 1)
    for i in idx:
        b, s = int(blocks[i]), int(slots[i])
        if direction == "demote":
            pool.slots[s].fill_(0xA5)
        else:
            for layer in probe:
                layers[layer][b].fill_(0x5A)
    if layers[0].is_cuda:
        torch.cuda.synchronize()
    run()
    for i in idx:
        b, s = int(blocks[i]), int(slots[i])
        for layer in probe:
            if not torch.equal(layers[layer][b].cpu(), pool.slots[s, layer]):
                print(f"  MISMATCH {direction} block {b} slot {s} layer {layer}", flush=True)
                return False
    return True


def copy_fn(eng: CopyEngine, direction: str, blocks, slots, layerwise: bool = False,
            submits: list[float] | None = None):
    """A blocking call of one demote or promote, for timing; `submits` collects each call's host
    submission seconds (`CopyHandle.submit_seconds`)."""

    def run() -> None:
        if direction == "demote":
            h = eng.demote(blocks, slots)
        else:
            h = eng.promote(slots, blocks, layerwise=layerwise)
        h.wait()
        if submits is not None and h.submit_seconds is not None:
            submits.append(h.submit_seconds)

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024, 4096])
    ap.add_argument("--backends", nargs="+", default=["staged", "dma", "triton", "torch"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--pool-create-gib", type=float, default=64.0, help="0 skips the pool-creation timing")
    ap.add_argument(
        "--slot-order",
        choices=["random", "runs"],
        default="random",
        help="host slots of a batch: a random permutation, or consecutive slots in reverse (a "
        "document demoted tail first, as vLLM's free queue evicts it)",
    )
    ap.add_argument("--staging-mib", type=int, default=None, help="staged backend's buffer per direction")
    ap.add_argument(
        "--min-2d-rows",
        type=int,
        default=None,
        help="staged backend: rows of a slot run from which a layer group is one strided copy (0: never)",
    )
    ap.add_argument("--out", default=None,
                    help="write the result to this JSON file (its chart beside it) instead of appending "
                    "it to bench/results.jsonl")
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu only smoke-tests this script (tiny sizes, torch backend)",
    )
    args = ap.parse_args(argv)
    if args.min_2d_rows is not None:
        copiers.MIN_2D_ROWS = args.min_2d_rows
    staging = {} if args.staging_mib is None else {"staging_bytes": args.staging_mib << 20}
    env = environment()
    env.update(extra_versions())
    print(
        f"# {env['command']}\n# device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"cuda {env['cuda_runtime']} driver {env['cuda_driver']} | cuda.bindings {env['cuda_bindings']}",
        flush=True,
    )
    cuda = args.device.startswith("cuda")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    spec = get_model(args.model)
    L = spec.num_layers
    page = spec.kv_bytes_per_token() // L * args.block_size
    slot = L * page
    nmax = max(args.batches)
    geometry = {
        "model": spec.name,
        "block_size": args.block_size,
        "num_layers": L,
        "page_bytes": page,
        "block_bytes": slot,
        "gpu_blocks": nmax + 64,
        "host_slots": nmax + 64,
        "slot_order": args.slot_order,
        "staging_mib": (args.staging_mib if args.staging_mib is not None else copiers.STAGING_BYTES >> 20),
        "min_2d_rows": copiers.MIN_2D_ROWS,
    }
    print(f"# geometry: {geometry}", flush=True)

    layers = [torch.empty(nmax + 64, page, dtype=torch.uint8, device=dev) for _ in range(L)]
    g = torch.Generator(device=dev.type).manual_seed(0)
    for t in layers:
        t.random_(0, 256, generator=g)
    t0 = time.perf_counter()
    pool = HostPool(HostPoolConfig((nmax + 64) * slot, L, page, device=dev))
    print(f"# pool: {pool!r} in {time.perf_counter() - t0:.2f} s", flush=True)
    if pool.num_slots < nmax:
        print(f"pinned pool too small ({pool.num_slots} slots); reduce --batches", file=sys.stderr)
        return 1
    flat_dev = torch.empty(nmax * slot, dtype=torch.uint8, device=dev)
    flat_host = torch.empty(nmax * slot, dtype=torch.uint8, pin_memory=dev.type == "cuda")

    rows: list[dict] = []
    baselines: dict[int, dict] = {}
    rng = np.random.default_rng(0)
    for n in args.batches:
        baselines[n] = memcpy_baseline(flat_host, flat_dev, n * slot, args.iters)
        print(
            f"[memcpy] {n} blocks ({n * slot / 2**20:.0f} MiB): h2d {baselines[n]['h2d']:.1f} GB/s, "
            f"d2h {baselines[n]['d2h']:.1f} GB/s",
            flush=True,
        )
    del flat_dev, flat_host

    engines: dict[str, CopyEngine] = {}
    for name in args.backends:
        try:
            engines[name] = CopyEngine(layers, pool, backend=name, **staging)
        except ValueError as e:
            print(f"[{name}] unavailable: {e}", flush=True)
    if not engines:
        print(f"none of the backends {args.backends} is available on {dev}", file=sys.stderr)
        return 1

    def measure(eng: CopyEngine, name: str, n: int, label: str | None = None) -> None:
        blocks = rng.permutation(len(layers[0]))[:n]
        if args.slot_order == "runs":
            first = int(rng.integers(0, pool.num_slots - n + 1))
            slots = np.arange(first + n - 1, first - 1, -1)
        else:
            slots = rng.permutation(pool.num_slots)[:n]
        for direction, layerwise in (("demote", False), ("promote", False), ("promote", True)):
            submits: list[float] = []
            fn = copy_fn(eng, direction, blocks, slots, layerwise, submits)
            t = wall(fn, args.iters)
            ok = verify(pool, layers, direction, blocks, slots, fn)
            base = baselines[n]["d2h" if direction == "demote" else "h2d"]
            gbps = n * slot / statistics.median(t) / 1e9
            rows.append(
                {
                    "backend": label or name,
                    "direction": direction + ("-layerwise" if layerwise else ""),
                    "blocks": n,
                    "mib": n * slot / 2**20,
                    "ms_median": statistics.median(t) * 1e3,
                    "ms_min": min(t) * 1e3,
                    # host time the call spent submitting (threaded DMA: the thread's time)
                    "submit_ms_median": statistics.median(submits) * 1e3 if submits else None,
                    "gbps": gbps,
                    "memcpy_gbps": base,
                    "fraction": gbps / base,
                    "verified": ok,
                    "fallbacks": eng.stats.backend_fallbacks,
                    "actual_backend": eng.backend[direction],
                }
            )
            r = rows[-1]
            print(
                f"[{r['backend']}] {r['direction']:>17} {n:5d} blocks: {gbps:6.1f} GB/s "
                f"({r['fraction']:.0%} of memcpy)"
                + (f", submitted in {r['submit_ms_median']:.2f} ms" if submits else "")
                + ("" if ok else "  WRONG BYTES"),
                flush=True,
            )

    # Triton launch configs: measured once at a mid size, the best one is used below.
    sweep: list[dict] = []
    best_cfg = None
    if "triton" in engines and 1024 <= nmax and cuda:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        for chunk in (16384, 65536):
            for progs in (None, 4 * sms, sms, 32, 16):
                try:
                    e = CopyEngine(
                        layers, pool, backend="triton", triton_chunk_bytes=chunk, triton_max_programs=progs
                    )
                except ValueError:
                    continue
                blocks = rng.permutation(len(layers[0]))[:1024]
                slots = rng.permutation(pool.num_slots)[:1024]
                res = {"chunk_bytes": chunk, "max_programs": progs}
                for direction in ("demote", "promote"):
                    fn = copy_fn(e, direction, blocks, slots)
                    res[direction + "_gbps"] = 1024 * slot / statistics.median(wall(fn, 3)) / 1e9
                res["min_gbps"] = min(res["demote_gbps"], res["promote_gbps"])
                res["fallbacks"] = e.stats.backend_fallbacks  # > 0: the kernel failed, torch ran
                sweep.append(res)
                print(
                    f"[triton sweep] chunk {chunk} programs {progs}: demote {res['demote_gbps']:.1f}, "
                    f"promote {res['promote_gbps']:.1f} GB/s",
                    flush=True,
                )
                e.close()
        ok = [r for r in sweep if r["fallbacks"] == 0]
        best_cfg = max(ok, key=lambda r: r["min_gbps"]) if ok else None
        if best_cfg and (best_cfg["chunk_bytes"], best_cfg["max_programs"]) != (16384, None):
            engines["triton"].close()
            engines["triton"] = CopyEngine(
                layers,
                pool,
                backend="triton",
                triton_chunk_bytes=best_cfg["chunk_bytes"],
                triton_max_programs=best_cfg["max_programs"],
            )

    for n in args.batches:
        for name, eng in engines.items():
            measure(eng, name, n)

    # Both directions at once (different blocks and slots), the DMA path and the triton path.
    bidir = []
    n = min(1024, nmax // 2)
    for name, eng in engines.items():
        if name == "torch":
            continue
        perm_b = rng.permutation(len(layers[0]))
        perm_s = rng.permutation(pool.num_slots)

        def both(eng=eng, pb=perm_b, ps=perm_s):
            h1 = eng.demote(pb[:n], ps[:n])
            h2 = eng.promote(ps[n : 2 * n], pb[n : 2 * n])
            h1.wait()
            h2.wait()

        t = statistics.median(wall(both, args.iters))
        bidir.append({"backend": name, "blocks_each_way": n, "aggregate_gbps": 2 * n * slot / t / 1e9})
        print(
            f"[{name}] both directions, {n} blocks each: {bidir[-1]['aggregate_gbps']:.1f} GB/s aggregate",
            flush=True,
        )

    auto = CopyEngine(layers, pool, backend="auto")
    auto_choice = {"backend": auto.backend, "calibration_gbps": auto.calibration}
    print(f"[auto] chose {auto.backend} from {auto.calibration}", flush=True)
    auto.close()
    for eng in engines.values():
        eng.close()
    engines.clear()
    auto = None
    gc.collect()  # engines (and the Triton interpreter on a CPU run) hold views of the pool
    pool.close()
    layers.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    pool_create = (
        create_big_pool(args.pool_create_gib, L, page, dev) if args.pool_create_gib > 0 and cuda else None
    )

    summary = summarize(rows, auto_choice["backend"], pool_create)
    cols = [
        "backend",
        "direction",
        "blocks",
        "mib",
        "ms_median",
        "gbps",
        "memcpy_gbps",
        "fraction",
        "verified",
    ]
    print()
    print_table(rows, cols)
    print("\nsummary:", summary)
    payload = {
        "cuda": {k: env[k] for k in ("cuda_runtime", "cuda_driver", "cuda_bindings")},
        "geometry": geometry,
        "targets": {
            "fraction_of_memcpy": TARGET_FRACTION,
            "pool_create_seconds": TARGET_POOL_SECONDS,
            "pool_create_gib": args.pool_create_gib,
        },
        "memcpy_baseline_gbps": {str(k): v for k, v in baselines.items()},
        "summary": summary,
        "auto": auto_choice,
        "rows": rows,
        "triton_sweep": sweep,
        "triton_config_used": best_cfg,
        "bidirectional": bidir,
        "pool_create": pool_create,
    }
    path = save_run("copy", payload, args.out)
    what = spec.name + ("-runs" if args.slot_order == "runs" else "")
    png = plot(rows, chart_beside(args.out, "copy", what), env["device"])
    print(f"\nwrote {path}" + (f"\nchart {png}" if png else ""))
    return 0


def plot(rows: list[dict], path, device: str) -> str | None:
    """Fraction of a same-size pinned memcpy against blocks, per backend, one panel per direction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    directions = list(dict.fromkeys(r["direction"] for r in rows))
    if not directions:
        return None
    fig, axes = plt.subplots(1, len(directions), figsize=(5 * len(directions), 4.2), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["blocks"], r["fraction"]) for r in rows
                         if r["backend"] == backend and r["direction"] == direction)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.axhline(TARGET_FRACTION, color="k", ls="--", lw=1, label=f"target {TARGET_FRACTION:.0%}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("blocks per copy")
        ax.set_ylabel("fraction of pinned memcpy")
        ax.set_title(direction)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"KV block copies on {device}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


#: HostPool creation variants timed: the defaults first (the target applies to them).
POOL_VARIANTS = [
    {"huge_pages": False, "prefault": True},
    {"huge_pages": True, "prefault": True},
    {"huge_pages": False, "prefault": False},
]


def create_big_pool(gib: float, layers: int, page: int, dev: torch.device) -> dict:
    """Time HostPool creation (allocation, prefault, chunked pinning) and close for `gib` GiB, with
    the default settings and with transparent huge pages or the parallel prefault switched off."""
    need = int(gib * 2**30)
    avail = _mem_available()
    if avail is not None and avail < need + 8 * 2**30:
        print(f"[pool] skipped: {gib} GiB asked, {avail / 2**30:.1f} GiB available", flush=True)
        return {"skipped": True, "gib": gib, "available_gib": avail / 2**30}
    variants = []
    for opts in POOL_VARIANTS:
        t0 = time.perf_counter()
        pool = HostPool(HostPoolConfig(need, layers, page, device=dev, **opts))
        t_create = time.perf_counter() - t0
        st = pool.stats.as_dict()
        t0 = time.perf_counter()
        pool.close()
        t_close = time.perf_counter() - t0
        gc.collect()
        variants.append({**opts, "create_seconds": t_create, "close_seconds": t_close, **st})
        print(
            f"[pool] {gib} GiB {opts}: created in {t_create:.2f} s (prefault {st['prefault_seconds']:.2f} s, "
            f"register {st['register_seconds']:.2f} s, {st['chunks_pinned']} chunks, "
            f"pinned {st['pinned_bytes'] / 2**30:.1f} GiB), closed in {t_close:.2f} s",
            flush=True,
        )
    default = variants[0]
    return {
        "gib": gib,
        "create_seconds": default["create_seconds"],
        "met": default["create_seconds"] < TARGET_POOL_SECONDS and default["pin_failures"] == 0,
        "fastest": min(variants, key=lambda v: v["create_seconds"]),
        "variants": variants,
    }


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def summarize(rows: list[dict], auto_backend: dict, pool_create: dict | None) -> dict:
    """Per backend and direction, the worst fraction of memcpy over all batch sizes; target check for
    the backends "auto" picked."""
    worst: dict[str, float] = {}
    for r in rows:
        key = f"{r['backend']}/{r['direction']}"
        worst[key] = min(worst.get(key, 1e9), r["fraction"])
    chosen = [f"{auto_backend[d]}/{d}" for d in ("demote", "promote")]
    out = {
        "worst_fraction": worst,
        "auto_backends": auto_backend,
        "auto_worst_fraction": min(worst.get(k, 0.0) for k in chosen),
        "all_verified": all(r["verified"] for r in rows),
    }
    out["copy_target_met"] = out["auto_worst_fraction"] >= TARGET_FRACTION and out["all_verified"]
    if pool_create is not None:
        out["pool_create_met"] = pool_create.get("met")
    return out


if __name__ == "__main__":
    sys.exit(main())
