"""The remote tier against a real Mooncake Store on loopback: a master and a store service started
by `remote.local`, and store clients in separate processes (tests/support/remote_peer.py), as two engines
would be. Skipped only where the Mooncake client cannot be imported (never in CI: setup.sh
installs it)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from triton_prefix_cache.remote.keys import RemoteNamespace
from triton_prefix_cache.remote.local import LocalStore
from triton_prefix_cache.remote.local import main as local_cli
from triton_prefix_cache.remote.store import BlockStatus


def _mooncake_missing() -> str | None:
    try:
        import mooncake.store  # noqa: F401
    except Exception as e:
        return f"the Mooncake client is not importable ({e}); scripts/setup.sh installs it"
    return None


MISSING = _mooncake_missing()
# In CI the client is installed by setup.sh, so a missing one fails there instead of skipping.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))]

ROOT = Path(__file__).resolve().parents[2]
LAYERS, PAGE = 4, 16 << 10  # 64 KiB slots
NS = dict(model="test/model@rev1", dtype="bfloat16", block_size=16, num_layers=LAYERS, page_bytes=PAGE,
          hash_scheme="test:xxh3", layout="NHD")
SLOTS = 256
OK, PRESENT, ABSENT, CORRUPT = (int(BlockStatus.OK), int(BlockStatus.PRESENT), int(BlockStatus.ABSENT),
                                int(BlockStatus.CORRUPT))


def keys_for(seed: int, n: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(-(2**63), 2**63 - 1, (n, 2), dtype=np.int64).tolist()


class PeerProcess:
    """tests/support/remote_peer.py in its own process; `call` fails the test if it answers too late."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"peer-{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.remote_peer"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         cwd=ROOT, text=True, bufsize=1)

    def call(self, op: str, timeout: float = 60, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"peer {self.name}: no answer to {op!r} within {timeout} s (log {self.log})")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"peer {self.name} exited (code {self.proc.wait()}); log tail:\n"
                        + "\n".join(self.log.read_text(errors="replace").splitlines()[-15:]))
        answer = json.loads(line)
        assert "exception" not in answer, f"peer {self.name}: {op}: {answer['exception']}"
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=30)
            finally:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triton_prefix_cache.remote.local", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """The store every sharing test uses, started and stopped with the documented command."""
    run = tmp_path_factory.mktemp("store")
    url = cli("start", "--dir", str(run), "--segment-gib", "0.0625").stdout.strip()
    state = LocalStore.load(run)
    assert state is not None and state.url == url
    yield url, run
    assert local_cli(["stop", "--dir", str(run)]) == 0
    assert not any(state.alive().values())
    assert LocalStore.load(run) is None


@pytest.fixture(scope="module")
def store_url(local_store):
    return local_store[0]


@pytest.fixture(scope="module")
def peers(store_url, tmp_path_factory):
    logs = tmp_path_factory.mktemp("peers")
    a, b = PeerProcess("A", logs), PeerProcess("B", logs)
    try:
        for p in (a, b):
            assert "error" not in p.call("connect", url=store_url, ns=NS, slots=SLOTS)
        yield a, b
    finally:
        a.close()
        b.close()


def test_cli_status_and_start_again(local_store, tmp_path, capsys):
    url, run = local_store
    assert local_cli(["status", "--dir", str(run)]) == 0
    assert local_cli(["start", "--dir", str(run)]) == 0  # already running: the same store
    assert capsys.readouterr().out.split() == [url, url]
    assert local_cli(["status", "--dir", str(tmp_path)]) == 1  # nothing recorded there


def test_what_a_puts_b_reads_byte_for_byte(peers):
    a, b = peers
    keys = keys_for(1, 24)
    written = a.call("fill", slots=list(range(24)), seed=1)["digests"]
    put = a.call("put", keys=keys, slots=list(range(24)))
    assert put["status"] == [OK] * 24 and put["nbytes"] == 24 * (64 + LAYERS * PAGE)
    assert b.call("exists", keys=keys)["found"] == [True] * 24
    got = b.call("get", keys=keys, slots=list(range(100, 124)))
    assert got["status"] == [OK] * 24
    assert got["digests"] == written
    # asked before writing: B's copy of the same blocks is not written again, nor A's
    assert b.call("put", keys=keys, slots=list(range(100, 124)))["status"] == [PRESENT] * 24
    assert a.call("put", keys=keys, slots=list(range(24)))["status"] == [PRESENT] * 24
    sa, sb = a.call("stats")["stats"], b.call("stats")["stats"]
    assert (sa["put_blocks"], sa["put_skipped_present"]) == (24, 24)
    assert (sb["get_blocks"], sb["hit_blocks"], sb["corrupt_blocks"], sb["store_errors"]) == (24, 24, 0, 0)


def test_a_lookup_stops_at_the_first_missing_block(peers):
    a, b = peers
    keys = keys_for(2, 8)
    a.call("fill", slots=list(range(30, 38)), seed=2)
    a.call("put", keys=keys[:5], slots=list(range(30, 35)))
    assert b.call("exists", keys=keys)["found"] == [True] * 5 + [False] * 3
    got = b.call("get", keys=keys, slots=list(range(130, 138)))
    assert got["status"] == [OK] * 5 + [ABSENT] * 3


@pytest.mark.parametrize("change", [dict(model="test/other-model@rev1"), dict(dtype="float16"),
                                    dict(block_size=32), dict(layout="HND"), dict(tp_rank=1, tp_size=2),
                                    dict(hash_scheme="test:sha256")], ids=lambda c: ",".join(c))
def test_another_namespace_never_matches(peers, store_url, change):
    a, b = peers
    keys = keys_for(3, 4)
    a.call("fill", slots=list(range(40, 44)), seed=3)
    a.call("put", keys=keys, slots=list(range(40, 44)))  # once; later parameters find them present
    name = ",".join(change)
    b.call("connect", url=store_url, ns={**NS, **change}, slots=SLOTS, name=name)
    assert b.call("exists", keys=keys, name=name)["found"] == [False] * 4
    assert b.call("get", keys=keys, slots=list(range(140, 144)), name=name)["status"] == [ABSENT] * 4
    assert b.call("exists", keys=keys)["found"] == [True] * 4


def test_another_tenant_never_matches(peers, store_url):
    a, b = peers
    keys = keys_for(4, 2)
    a.call("fill", slots=[50, 51], seed=4)
    a.call("put", keys=keys, slots=[50, 51])
    b.call("connect", url=store_url + "&namespace=other-deployment", ns=NS, slots=SLOTS, name="tenant")
    assert b.call("exists", keys=keys, name="tenant")["found"] == [False, False]
    assert b.call("exists", keys=keys)["found"] == [True, True]


def test_a_corrupt_value_is_a_miss(peers):
    a, b = peers
    keys = keys_for(5, 6)
    written = a.call("fill", slots=list(range(60, 66)), seed=5)["digests"]
    a.call("put", keys=keys, slots=list(range(60, 66)))
    assert a.call("corrupt", keys=keys[1:2], where="payload")["codes"] == [0]
    assert a.call("corrupt", keys=keys[4:5], where="header")["codes"] == [0]
    before = b.call("stats")["stats"]["corrupt_blocks"]
    got = b.call("get", keys=keys, slots=list(range(160, 166)))
    assert got["status"] == [OK, CORRUPT, OK, OK, CORRUPT, OK]
    assert [d for i, d in enumerate(got["digests"]) if i not in (1, 4)] == [
        d for i, d in enumerate(written) if i not in (1, 4)]
    assert b.call("stats")["stats"]["corrupt_blocks"] == before + 2
    # a value that fails its check is removed, so the next writer replaces it
    assert b.call("exists", keys=keys)["found"] == [True, False, True, True, False, True]
    rewritten = a.call("put", keys=keys, slots=list(range(60, 66)))["status"]
    assert rewritten == [PRESENT, OK, PRESENT, PRESENT, OK, PRESENT]
    assert b.call("get", keys=keys, slots=list(range(160, 166)))["status"] == [OK] * 6


def test_a_full_store_drops_writes_and_counts_them(tmp_path):
    # 16 MiB, the smallest segment: room for about 250 values of 64 KiB; 320 are written
    with LocalStore.start(segment_gib=1 / 64, run_dir=tmp_path / "small") as small:
        a = PeerProcess("full", tmp_path)
        try:
            assert "error" not in a.call("connect", url=small.url, ns=NS, slots=SLOTS)
            a.call("fill", slots=list(range(SLOTS)), seed=6)
            keys = keys_for(6, 320)
            slots = [i % SLOTS for i in range(320)]
            status = a.call("put", keys=keys, slots=slots)["status"]
            written, dropped = status.count(OK), status.count(int(BlockStatus.DROPPED_FULL))
            assert written + dropped == 320 and 200 < written < 256 and dropped > 64, (written, dropped)
            st = a.call("stats")
            assert st["stats"]["write_drops"] == dropped and not st["degraded"]
            assert st["stats"]["store_errors"] == 0
            # the store still serves what it holds
            found = a.call("exists", keys=keys)["found"]
            assert found == [s == OK for s in status]
        finally:
            a.close()


def test_a_store_that_dies_degrades_once_and_never_hangs(tmp_path):
    timeout_ms, lookup_ms = 1000, 200
    with LocalStore.start(segment_gib=1 / 64, run_dir=tmp_path / "doomed") as doomed:
        a = PeerProcess("doomed", tmp_path)
        try:
            url = f"{doomed.url}&timeout_ms={timeout_ms}&lookup_timeout_ms={lookup_ms}&retry_s=1"
            assert "error" not in a.call("connect", url=url, ns=NS, slots=SLOTS)
            keys = keys_for(7, 8)
            a.call("fill", slots=list(range(8)), seed=7)
            assert a.call("put", keys=keys, slots=list(range(8)))["status"] == [OK] * 8
            doomed.kill()
            calls = a.call("timed", keys=keys, slots=list(range(8, 16)), rounds=3, timeout=120)["calls"]
            for c in calls:  # each answered within its timeout (plus the poll step), none served
                limit = (lookup_ms if c["op"] == "exists" else timeout_ms) / 1000 + 0.5
                assert c["seconds"] < limit, c
                if c["op"] == "exists":
                    assert c["result"] == [False] * 8
                else:
                    assert OK not in c["result"] and PRESENT not in c["result"]
            st = a.call("stats")
            assert st["degraded"] and st["stats"]["degradations"] == 1
            assert len(st["warnings"]) == 1 and "local tiers" in st["warnings"][0], st["warnings"]
            time.sleep(1.2)  # a probe of the dead store is due: it fails quietly
            a.call("exists", keys=keys)
            assert len(a.call("stats")["warnings"]) == 1
            t = time.monotonic()
            a.close()
            assert time.monotonic() - t < 20
        finally:
            a.close()


def test_connect_errors_name_the_key(tmp_path):
    """An unreachable master fails at once, naming `remote`, instead of the client's long retries."""
    from triton_prefix_cache.host_pool import HostPool, HostPoolConfig
    from triton_prefix_cache.remote.local import _free_ports
    from triton_prefix_cache.remote.store import RemoteStore, RemoteStoreError

    port, meta = _free_ports(2)
    ns = RemoteNamespace(**NS)
    with HostPool(HostPoolConfig(size_bytes=ns.slot_bytes, num_layers=LAYERS, page_bytes=PAGE,
                                 device="cpu")) as pool:
        t = time.monotonic()
        with pytest.raises(RemoteStoreError, match=r"config key 'remote': cannot reach the Mooncake master"):
            RemoteStore.connect(f"mooncake://127.0.0.1:{port}?metadata=http://127.0.0.1:{meta}/metadata",
                                ns, pool)
        assert time.monotonic() - t < 5


def test_a_missing_client_library_names_the_key(monkeypatch):
    from triton_prefix_cache.host_pool import HostPool, HostPoolConfig
    from triton_prefix_cache.remote.store import RemoteStore, RemoteStoreError

    monkeypatch.setitem(sys.modules, "mooncake.store", None)  # import mooncake.store now fails
    ns = RemoteNamespace(**NS)
    with HostPool(HostPoolConfig(size_bytes=ns.slot_bytes, num_layers=LAYERS, page_bytes=PAGE,
                                 device="cpu")) as pool:
        with pytest.raises(RemoteStoreError, match=r"config key 'remote'.*triton-prefix-cache\[remote\]"):
            RemoteStore.connect("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/metadata", ns, pool)
