"""Kernel microbenchmark of the prefix index: the Triton table, the CPU table, the plain-torch
reference on CUDA, and a Python dict.

    python -m bench.kernels                      # GPU host: everything
    python -m bench.kernels --sizes 1e3 1e4      # quick (a CPU machine runs only cpu and dict)
    python -m bench.kernels --cpu-probe numpy    # the CPU table's numpy probe instead of C

Providers: "triton" (the Triton backend), "reference-cuda" (tests/support/index_reference.py, the tests'
oracle, on CUDA: what the kernels are compared against), "cpu" (the CPU backend, C probe loops or
numpy) and "dict" (a Python dict with tuple keys). Lookup, insert and remove of N keys at load 0.5
for N from 1e3 to 1e7, and match_prefix for 256 requests x 512 blocks (half fully present, half
missing from a random block on). Every timed result is checked against the known answer in the
same run. Triton and reference-cuda times are kernel times (CUDA events / triton.testing.do_bench)
of the table operations; the `*_api` rows time the public PrefixIndex call with its validation,
stream hand-off and host sync. Output: a table, one line appended to bench/results.jsonl (kind
"kernels") and the chart bench/results/kernels-index.png (keys/s against keys per batch).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from bench.common import (
    chart_beside,
    device_slug,
    environment,
    print_table,
    save_run,
    time_cpu,
    time_with_setup,
)
from triton_prefix_cache import PrefixIndex
from triton_prefix_cache.index.cpu_table import CpuTable

GPU_PROVIDERS = ("triton", "reference-cuda")

TARGETS = {
    "lookup_keys_per_s": {"h200": 5e9, "h100": 3.5e9},
    "insert_keys_per_s": 1e9,
    "match_prefix_us": 50.0,
}


def rand_keys(n: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n, 2), generator=g, dtype=torch.int64).to(device)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"benchmark result check failed: {what}")


def index_backend(provider: str, cpu_probe: str | None):
    """(PrefixIndex's `backend` argument, device) of a provider."""
    if provider == "triton":
        return "triton", "cuda"
    if provider == "reference-cuda":
        # The tests' oracle: importable from the repository root (python -m bench.kernels).
        from tests.support.index_reference import ReferenceTable

        return ReferenceTable, "cuda"
    return functools.partial(CpuTable, probe=cpu_probe), "cpu"


def bench_index(provider: str, n: int, cpu_probe: str | None = None) -> list[dict]:
    backend, device = index_backend(provider, cpu_probe)
    keys = rand_keys(n, n, device)
    vals = torch.randperm(n, device=device).to(torch.int32)
    perm = torch.randperm(n, device=device)
    queries, want = keys[perm].contiguous(), vals[perm]
    # Capacity for N keys rounds the slots up to a power of two; filler keys bring the table to a
    # load of 0.5 once the N measured keys are in, so every size is measured at the same load.
    idx = PrefixIndex(n, device=device, backend=backend)
    idx = PrefixIndex(idx.num_slots // 2, device=device, backend=backend)
    filler = rand_keys(idx.capacity - n, n + 1, device)
    fill_vals = torch.arange(filler.shape[0], dtype=torch.int32, device=device)
    rows = []

    def prefill() -> None:
        idx.clear()
        idx.insert(filler, fill_vals)

    def row(op: str, seconds: float) -> None:
        rows.append(
            {
                "provider": provider,
                "op": op,
                "n": n,
                "load": idx.capacity / idx.num_slots,
                "us": seconds * 1e6,
                "keys_per_s": n / seconds,
            }
        )

    table = idx.table
    if provider == "triton":
        from triton.testing import do_bench

        from triton_prefix_cache.kernels import hash_table as ht

        def raw_insert():  # the launcher: the table's insert adds a host sync for its counts
            ht.insert(table.slot_keys, table.slot_values, table.first, table.last, table.fresh, keys, vals)

        row("insert", time_with_setup(raw_insert, prefill))
        idx._live = idx.capacity  # the raw launcher bypassed the bookkeeping
        check(torch.equal(idx.lookup(queries), want), "triton insert+lookup")
        row("insert_api", time_with_setup(lambda: idx.insert(keys, vals), prefill))
        row("lookup", do_bench(lambda: table.lookup(queries), return_mode="median") / 1e3)
        row("lookup_api", do_bench(lambda: idx.lookup(queries), return_mode="median") / 1e3)
        check(torch.equal(table.lookup(queries), want), "triton lookup")
        saved = table.slot_keys.clone()
        row(
            "remove",
            time_with_setup(lambda: table.remove(keys), lambda: table.slot_keys.copy_(saved)),
        )
        table.slot_keys.copy_(saved)
        idx._tombstones = 0
        check(bool(idx.remove(keys).all()) and bool((idx.lookup(queries) == -1).all()), "triton remove")
    else:
        reps = 10 if device == "cuda" else 3
        row(
            "insert",
            time_with_setup(lambda: idx.insert(keys, vals), prefill, reps=reps, warmup=1, device=device),
        )
        got = None

        def lookup():
            nonlocal got
            got = idx.lookup(queries)

        row("lookup", time_with_setup(lookup, lambda: None, reps=reps, warmup=1, device=device))
        check(torch.equal(got, want), f"{provider} lookup")
        saved = table.slot_keys.clone()

        def restore():
            table.slot_keys.copy_(saved)
            idx._live, idx._tombstones = idx.capacity, 0

        # The table operation itself, as for Triton (the public call may add a rebuild).
        row(
            "remove",
            time_with_setup(
                lambda: table.remove(keys),
                restore,
                reps=reps,
                warmup=1,
                device=device,
            ),
        )
        restore()
        check(bool(idx.remove(keys).all()), f"{provider} remove")
    return rows


def bench_dict(n: int) -> list[dict]:
    keys = rand_keys(n, n, "cpu")
    vals = torch.randperm(n).to(torch.int32)
    perm = torch.randperm(n)
    klist = [tuple(k) for k in keys.tolist()]
    vlist = vals.tolist()
    qlist = [klist[i] for i in perm.tolist()]
    want = vals[perm].tolist()
    d: dict = {}

    def insert():
        d.clear()
        for k, v in zip(klist, vlist):
            d[k] = v

    rows = []
    t = time_cpu(insert)
    rows.append({"provider": "dict", "op": "insert", "n": n, "us": t * 1e6, "keys_per_s": n / t})
    got = []
    t = time_cpu(lambda: got.__setitem__(slice(None), [d.get(k, -1) for k in qlist]))
    check(got == want, "dict lookup")
    rows.append({"provider": "dict", "op": "lookup", "n": n, "us": t * 1e6, "keys_per_s": n / t})

    def remove():
        for k in klist:
            d.pop(k, None)

    t = time_with_setup(remove, insert, reps=3, warmup=0, device="cpu")
    rows.append({"provider": "dict", "op": "remove", "n": n, "us": t * 1e6, "keys_per_s": n / t})
    return rows


def bench_match_prefix(
    provider: str, requests: int = 256, blocks: int = 512, fill: int = 1_000_000, cpu_probe: str | None = None
) -> list[dict]:
    backend, device = index_backend(provider, cpu_probe)
    g = torch.Generator().manual_seed(7)
    n = requests * blocks
    keys = rand_keys(n, 1, device)
    present = torch.ones(n, dtype=torch.bool)
    want = []
    for r in range(requests):
        if r % 2 == 0:
            want.append(blocks)
        else:
            miss_from = int(torch.randint(0, blocks, (1,), generator=g))
            present[r * blocks + miss_from : (r + 1) * blocks] = False
            want.append(miss_from)
    idx = PrefixIndex(max(fill, n), device=device, backend=backend)
    filler = rand_keys(max(fill, n) - int(present.sum()), 2, device)
    stored = torch.cat([keys[present.to(device)], filler])
    idx.insert(stored, torch.arange(stored.shape[0], dtype=torch.int32, device=device))
    offsets = torch.arange(0, n + 1, blocks, dtype=torch.int64, device=device)
    counts, _ = idx.match_prefix(keys, offsets)
    check(counts.cpu().tolist() == want, f"{provider} match_prefix counts")
    rows = []
    if provider == "triton":
        from triton.testing import do_bench

        t = do_bench(lambda: idx.table.match_prefix(keys, offsets), return_mode="median") / 1e3
        rows.append({"provider": provider, "op": "match_prefix", "n": n, "us": t * 1e6, "keys_per_s": n / t})
        t = do_bench(lambda: idx.match_prefix(keys, offsets), return_mode="median") / 1e3
        rows.append(
            {"provider": provider, "op": "match_prefix_api", "n": n, "us": t * 1e6, "keys_per_s": n / t}
        )
    else:
        t = time_with_setup(
            lambda: idx.match_prefix(keys, offsets), lambda: None, reps=5, warmup=1, device=device
        )
        rows.append({"provider": provider, "op": "match_prefix", "n": n, "us": t * 1e6, "keys_per_s": n / t})
    return rows


def summarize(rows: list[dict], slug: str) -> dict:
    def best(provider: str, op: str, min_n: int) -> list[dict]:
        return [r for r in rows if r["provider"] == provider and r["op"] == op and r["n"] >= min_n]

    out: dict = {}
    look = best("triton", "lookup", 1_000_000)
    if look:
        target = TARGETS["lookup_keys_per_s"].get(slug)
        worst = min(r["keys_per_s"] for r in look)
        out["lookup_1e6plus_min_keys_per_s"] = worst
        out["lookup_target"] = target
        out["lookup_met"] = None if target is None else worst >= target
    ins = best("triton", "insert", 1_000_000)
    if ins:
        worst = min(r["keys_per_s"] for r in ins)
        out["insert_1e6plus_min_keys_per_s"] = worst
        out["insert_met"] = worst >= TARGETS["insert_keys_per_s"]
        rem = best("triton", "remove", 1_000_000)
        out["remove_1e6plus_min_keys_per_s"] = min(r["keys_per_s"] for r in rem)
    mp = best("triton", "match_prefix", 0)
    if mp:
        out["match_prefix_us"] = mp[0]["us"]
        out["match_prefix_met"] = mp[0]["us"] <= TARGETS["match_prefix_us"]
    ratios = {}
    for op in ("insert", "lookup", "remove"):
        for r in best("cpu", op, 10_000):
            d = [x for x in best("dict", op, r["n"]) if x["n"] == r["n"]]
            if d:
                ratios[f"{op}@{r['n']}"] = r["keys_per_s"] / d[0]["keys_per_s"]
    if ratios:
        out["cpu_over_dict_speed"] = ratios
        out["cpu_not_slower_than_dict_1e4plus"] = all(v >= 1.0 for v in ratios.values())
    return out


def plot(rows: list[dict], path, device: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = ["lookup", "insert", "remove"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, op in zip(axes, ops):
        for prov in sorted({r["provider"] for r in rows}):
            pts = sorted((r["n"], r["keys_per_s"]) for r in rows if r["provider"] == prov and r["op"] == op)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op} (load 0.5)")
        ax.set_xlabel("keys per batch")
        ax.set_ylabel("keys / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"PrefixIndex kernels on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--cpu-max", type=float, default=1e6, help="largest N for the CPU providers (cpu, dict)")
    ap.add_argument(
        "--cpu-probe",
        choices=["c", "numpy"],
        default=None,
        help="the CPU table's probe (default: C where a compiler works, else numpy)",
    )
    ap.add_argument("--out", default=None,
                    help="write the result to this JSON file (its chart beside it) instead of appending "
                    "it to bench/results.jsonl")
    args = ap.parse_args(argv)
    env = environment()
    env["cpu_probe"] = CpuTable(16, probe=args.cpu_probe).probe  # how the cpu provider probes
    print(
        f"# {env['command']}\n# device: {env['device']} | torch {env['torch']} | triton {env['triton']}",
        flush=True,
    )
    gpu = torch.cuda.is_available()
    providers = (list(GPU_PROVIDERS) if gpu else []) + ["cpu", "dict"]
    sizes = [int(s) for s in args.sizes]
    jobs = [(p, n) for n in sizes for p in providers if p in GPU_PROVIDERS or n <= args.cpu_max]
    rows: list[dict] = []
    for i, (prov, n) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {prov} n={n:,}", flush=True)
        rows += bench_dict(n) if prov == "dict" else bench_index(prov, n, args.cpu_probe)
    for prov in providers:
        if prov == "dict":
            continue
        print(f"[match_prefix] {prov}", flush=True)
        rows += bench_match_prefix(prov, cpu_probe=args.cpu_probe)
    cols = ["provider", "op", "n", "load", "us", "keys_per_s"]
    print()
    print_table(rows, cols)
    summary = summarize(rows, device_slug())
    print("\nsummary:", summary)
    payload = {"cpu_probe": env["cpu_probe"], "targets": TARGETS, "summary": summary, "rows": rows}
    path = save_run("kernels", payload, args.out)
    png = plot(rows, chart_beside(args.out, "kernels", "index"), env["device"])
    print(f"\nwrote {path}" + (f"\nchart {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
