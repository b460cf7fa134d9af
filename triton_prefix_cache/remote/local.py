"""A Mooncake Store on this machine: a master (with its HTTP metadata server) and a store service
that owns the store's memory, on free loopback ports, for users trying the remote tier and for tests.

    python -m triton_prefix_cache.remote.local start [--segment-gib 4] [--dir DIR]   # prints the URL
    python -m triton_prefix_cache.remote.local status [--dir DIR]
    python -m triton_prefix_cache.remote.local stop [--dir DIR]

The printed URL is the value of the config key `remote`. State (PIDs, ports, logs) lives in DIR
(default: /tmp/tpc-mooncake-<uid>); `stop` ends the two processes by PID. In Python:

    with LocalStore.start(segment_gib=1, run_dir=tmp) as store:
        ... store.url ...
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
STATE = "state.json"
#: the smallest segment the store service accepts (Mooncake's allocator minimum)
MIN_SEGMENT_GIB = 1 / 64
READY_LINE = "Mooncake Store Service is running"


def default_run_dir() -> Path:
    return Path(f"/tmp/tpc-mooncake-{os.getuid()}")


def master_binary() -> Path:
    """The `mooncake_master` executable shipped inside the `mooncake` package."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Mooncake package is not installed: pip install 'triton-prefix-cache[remote]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "mooncake_master"
    if not path.exists():
        raise RuntimeError(f"the Mooncake package has no mooncake_master binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


@dataclass
class LocalStore:
    """A running master and store service. `url` is the `remote` config value that reaches them."""

    run_dir: str
    master_pid: int
    service_pid: int
    rpc_port: int
    metadata_port: int
    metrics_port: int
    service_port: int
    segment_gib: float

    @property
    def url(self) -> str:
        return (f"mooncake://{HOST}:{self.rpc_port}?metadata=http://{HOST}:{self.metadata_port}/metadata"
                f"&protocol=tcp")

    # ---- start ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, segment_gib: float = 1.0, run_dir: str | Path | None = None, timeout: float = 60.0,
              tie_to_parent: bool = True) -> LocalStore:
        """Start both processes and wait until the service has mounted its segment.

        tie_to_parent: the processes die with this process (Linux PR_SET_PDEATHSIG), so a test
        that crashes leaves nothing running; the CLI starts them detached instead.
        """
        if not MIN_SEGMENT_GIB <= segment_gib <= 1024:
            raise ValueError(f"segment_gib: expected {MIN_SEGMENT_GIB:g} (16 MiB) to 1024, "
                             f"got {segment_gib!r}")
        run = Path(run_dir) if run_dir is not None else default_run_dir()
        run.mkdir(parents=True, exist_ok=True)
        rpc, meta, metrics, service = _free_ports(4)
        preexec = _die_with_parent if tie_to_parent else None
        master = _spawn(
            [str(master_binary()), f"-rpc_port={rpc}", f"-rpc_address={HOST}",
             "-enable_http_metadata_server=true", f"-http_metadata_server_host={HOST}",
             f"-http_metadata_server_port={meta}", f"-metrics_host={HOST}", f"-metrics_port={metrics}",
             "-enable_metric_reporting=false"], run / "master.log", preexec)
        store = cls(str(run), master.pid, 0, rpc, meta, metrics, service, segment_gib)
        try:
            deadline = time.monotonic() + timeout
            _wait_for_port(rpc, master, run / "master.log", deadline)
            _wait_for_port(meta, master, run / "master.log", deadline)
            config = {"local_hostname": HOST, "metadata_server": f"http://{HOST}:{meta}/metadata",
                      "master_server_address": f"{HOST}:{rpc}", "protocol": "tcp", "device_name": "",
                      "global_segment_size": int(segment_gib * (1 << 30)), "local_buffer_size": 0}
            (run / "service.json").write_text(json.dumps(config))
            svc = _spawn(
                [sys.executable, "-m", "mooncake.mooncake_store_service",
                 "--config", str(run / "service.json"),
                 "--port", str(service), "--max-wait-time", str(max(1.0, deadline - time.monotonic()))],
                run / "service.log", preexec)
            store.service_pid = svc.pid
            store._save()
            _wait_for_line(svc, run / "service.log", READY_LINE, deadline)
        except BaseException:
            store.stop()
            raise
        return store

    def _save(self) -> None:
        (Path(self.run_dir) / STATE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, run_dir: str | Path | None = None) -> LocalStore | None:
        """The store recorded in `run_dir`, or None if there is none."""
        path = (Path(run_dir) if run_dir is not None else default_run_dir()) / STATE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    # ---- state and stop ------------------------------------------------------------------------
    def alive(self) -> dict[str, bool]:
        return {"master": _is_ours(self.master_pid, "mooncake_master"),
                "service": _is_ours(self.service_pid, "mooncake_store_service")}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the service (it unmounts its segment), then the master; SIGKILL what is left
        after `timeout`. Only PIDs whose command line is still the process started here."""
        for pid, name in ((self.service_pid, "mooncake_store_service"), (self.master_pid, "mooncake_master")):
            _terminate(pid, name, timeout)
        try:
            (Path(self.run_dir) / STATE).unlink()
        except OSError:
            pass

    def kill(self) -> None:
        """SIGKILL both at once: the store dies without notice (tests of a store that goes away)."""
        for pid, name in ((self.master_pid, "mooncake_master"), (self.service_pid, "mooncake_store_service")):
            if _is_ours(pid, name):
                os.kill(pid, signal.SIGKILL)
        for pid in (self.master_pid, self.service_pid):
            _reap(pid, 5.0)

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _spawn(cmd: list[str], log: Path, preexec) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=preexec)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mooncake_master exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mooncake_master did not listen on port {port}:\n{_tail(log)}")
        time.sleep(0.05)


def _wait_for_line(proc: subprocess.Popen, log: Path, line: str, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the store service exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            if line in log.read_text(errors="replace"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the store service did not start:\n{_tail(log)}")
        time.sleep(0.05)


def _is_ours(pid: int, name: str) -> bool:
    """Whether `pid` is alive and still runs `name` (not a PID reused by another program)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return name.encode() in cmdline and state != "Z"


def _reap(pid: int, timeout: float) -> bool:
    """Wait for `pid` to go (reaping it if it is our child); True when it is gone."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        except ChildProcessError:  # not our child: watch /proc instead
            if not Path(f"/proc/{pid}").exists():
                return True
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
            except OSError:
                return True
        time.sleep(0.05)
    return False


def _terminate(pid: int, name: str, timeout: float) -> None:
    if not _is_ours(pid, name):
        _reap(pid, 0.1)
        return
    os.kill(pid, signal.SIGTERM)
    if not _reap(pid, timeout) and _is_ours(pid, name):
        os.kill(pid, signal.SIGKILL)
        _reap(pid, 5.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triton_prefix_cache.remote.local",
                                 description="Start, inspect or stop a Mooncake Store on loopback.")
    ap.add_argument("command", choices=("start", "status", "stop"))
    ap.add_argument("--dir", default=None, help=f"state and logs (default {default_run_dir()})")
    ap.add_argument("--segment-gib", type=float, default=4.0, help="memory the store service owns (start)")
    args = ap.parse_args(argv)
    current = LocalStore.load(args.dir)
    running = current is not None and all(current.alive().values())
    if args.command == "start":
        if running:
            print(current.url)
            print(f"already running (master {current.master_pid}, service {current.service_pid})",
                  file=sys.stderr)
            return 0
        if current is not None:
            current.stop()
        if not MIN_SEGMENT_GIB <= args.segment_gib <= 1024:
            ap.error(f"--segment-gib must be from {MIN_SEGMENT_GIB:g} (16 MiB) to 1024")
        store = LocalStore.start(args.segment_gib, args.dir, tie_to_parent=False)
        print(store.url)
        print(f"master {store.master_pid}, service {store.service_pid}, logs in {store.run_dir}",
              file=sys.stderr)
        return 0
    if args.command == "status":
        if current is None:
            print("not running", file=sys.stderr)
            return 1
        print(current.url)
        print(", ".join(f"{k} {'up' if v else 'down'}" for k, v in current.alive().items()), file=sys.stderr)
        return 0 if running else 1
    if current is not None:
        current.stop()
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
