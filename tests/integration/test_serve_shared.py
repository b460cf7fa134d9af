"""bench.serve's shared workload end to end on the tiny CPU model: a Mooncake Store on loopback,
replica A reading every document into it, a fresh replica B served from it, against B without the
store; every server and the store stopped afterwards, their ports free.

Skipped only where the Mooncake client cannot be imported; in CI (scripts/setup.sh installs it) a
missing client fails instead.
"""

import json
import os
import subprocess

import pytest

from bench import serve as S
from tests.integration.test_remote import MISSING

pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))]

PROMPTS = 8
BLOCK = 32  # the CPU scale's --block-size


def _prompts(client_command: str) -> str:
    """A client command without what names its server and its result file: what it asks."""
    words = client_command.split()
    for flag in ("--base-url", "--result-filename"):
        i = words.index(flag)
        del words[i:i + 2]
    return " ".join(words)


def test_replica_b_serves_from_the_store_what_replica_a_read(tmp_path):
    record, chart = tmp_path / "results.jsonl", tmp_path / "serve-shared.png"
    argv = ["--workload", "shared", "--configs", "ours", "ours:remote=local", "--concurrency", "2",
            "--num-prompts", str(PROMPTS), "--repeat", "1", "--record", str(record), "--chart", str(chart),
            "--raw-dir", str(tmp_path / "raw")]
    assert S.main(argv) == 0
    (line,) = record.read_text().splitlines()
    rec = json.loads(line)
    assert rec["workload"] == "shared" and chart.stat().st_size > 0
    base, shared = rec["configs"]["ours"], rec["configs"]["ours:remote=local"]
    writer = shared["writer"]
    runs = {}
    for name, entry in (("base", base), ("A", writer), ("B", shared)):
        assert "error" not in entry and entry["port_released"], (name, entry)
        (run,) = entry["runs"]
        assert run["completed"] == PROMPTS and run["failed"] == 0, (name, run)
        runs[name] = run
    # The baseline has no store and no replica A; B recomputes every document (each asked once).
    assert "writer" not in base and "store" not in base and '"remote"' not in base["server_command"]
    assert S.remote_hit_tokens(runs["base"]) == 0 and S.host_hit_tokens(runs["base"]) == 0
    # A and B: the same flags, the same store (the URL in both commands), the same prompts.
    url = shared["store"]["url"]
    assert url in writer["server_command"] and url in shared["server_command"]
    assert writer["server_command"].split(" --port ")[0] == shared["server_command"].split(" --port ")[0]
    assert _prompts(runs["A"]["client_command"]) == _prompts(runs["B"]["client_command"])
    assert "--seed 0" in runs["B"]["client_command"]
    # A found the store empty and wrote its blocks; B hit in the store every full block A read, all
    # but the block each prompt must compute its last token in; every hit of B's came from the store.
    a, b = runs["A"]["metrics"], runs["B"]["metrics"]
    assert S.remote_hit_tokens(runs["A"]) == 0 and a["vllm:tpc_remote_put_bytes_total"] > 0
    raw = json.loads((next((tmp_path / "raw").iterdir()) / "ours_remote_local.c2.json").read_text())
    tokens = raw["total_input_tokens"]
    assert tokens - PROMPTS * BLOCK <= S.remote_hit_tokens(runs["B"]) < tokens
    assert S.host_hit_tokens(runs["B"]) == S.remote_hit_tokens(runs["B"])
    assert b["vllm:tpc_remote_get_bytes_total"] > 0 and not b.get("vllm:tpc_remote_store_errors_total")
    assert rec["ratios"]["baseline"] == "ours" and rec["ratios"]["ours:remote=local@2"]["ttft_p50"] > 0
    # Nothing left: the store's processes and ports, and every server's.
    store = shared["store"]
    assert store["stopped"] is True
    rpc = int(url.split("mooncake://127.0.0.1:")[1].split("?")[0])
    meta = int(url.split("metadata=http://127.0.0.1:")[1].split("/")[0])
    assert not S.port_in_use(rpc) and not S.port_in_use(meta)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [p for p in ps if f"-rpc_port={rpc}" in p or str(tmp_path) in p]
    for entry in (base, writer, shared):
        port = entry["server_command"].split("--port ")[1].split()[0]
        assert not [p for p in ps if "cli serve" in p and f"--port {port}" in p]
