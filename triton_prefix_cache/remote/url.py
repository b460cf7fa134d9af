"""The config key `remote`: one URL naming the store and its settings, parsed and checked at start-up.

    mooncake://HOST:PORT?metadata=http://HOST:PORT/metadata&protocol=tcp&segment_gib=0

HOST:PORT is the Mooncake master's RPC address. Every error names `remote` or `remote.<param>`
and what is allowed. Parsing touches no network and no Mooncake library.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

SCHEMES = ("mooncake",)
PROTOCOLS = ("tcp", "rdma")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class RemoteURLError(ValueError):
    """The `remote` URL is malformed or one of its parameters is out of range (message names it)."""


@dataclass(frozen=True)
class RemoteURL:
    """A parsed `remote` URL.

    host, port: the Mooncake master's RPC address.
    metadata: the transfer engine's metadata server: `http://host:port/path` (the master's
        embedded HTTP server, or a standalone one), `etcd://host:port`, or `P2PHANDSHAKE`.
    protocol: the transfer protocol, "tcp" (default) or "rdma".
    device: RDMA device names (e.g. "mlx5_0"), empty for auto-detection or TCP.
    segment_gib: host memory this process contributes to the store (default 0: none; a store
        service owns the memory, so objects outlive the engines that wrote them).
    local_hostname: the address other store members reach this process at; empty (default): the
        local address that routes to the master (127.0.0.1 for a master on loopback).
    namespace: an extra word in every key (tenants or deployments sharing one store never match).
    timeout_ms: the most a put or get may take before the store is treated as gone.
    lookup_timeout_ms: the most an existence check (on the scheduler's path) may take.
    retry_s: seconds after a degradation before the store is probed again (0: never).
    """

    host: str
    port: int
    metadata: str
    protocol: str = "tcp"
    device: str = ""
    segment_gib: float = 0.0
    local_hostname: str = ""
    namespace: str = ""
    timeout_ms: int = 5000
    lookup_timeout_ms: int = 50
    retry_s: float = 30.0

    @property
    def master(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"

    @property
    def segment_bytes(self) -> int:
        return int(self.segment_gib * (1 << 30))


#: Query parameters with their checkers; `metadata` is required.
def _check_metadata(v: str) -> str:
    if v == "P2PHANDSHAKE":
        return v
    parts = urlsplit(v)
    if parts.scheme not in ("http", "etcd") or not parts.hostname:
        raise RemoteURLError(
            "config key 'remote.metadata' must be http://HOST:PORT/PATH, etcd://HOST:PORT or "
            f"P2PHANDSHAKE, got {v!r}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise RemoteURLError(f"config key 'remote.metadata' needs a port (1-65535), got {v!r}")
    return v


def _choice(key: str, allowed: tuple[str, ...]):
    def check(v: str) -> str:
        if v not in allowed:
            raise RemoteURLError(f"config key 'remote.{key}' must be one of {list(allowed)}, got {v!r}")
        return v
    return check


def _number(key: str, lo: float, hi: float, integer: bool, unit: str):
    def check(v: str) -> float | int:
        try:
            x = int(v) if integer else float(v)
        except ValueError:
            x = None
        if x is None or not math.isfinite(x) or not lo <= x <= hi:
            kind = "an int" if integer else "a number"
            raise RemoteURLError(
                f"config key 'remote.{key}' must be {kind} from {lo:g} to {hi:g} ({unit}), got {v!r}")
        return x
    return check


def _pattern(key: str, regex: re.Pattern, what: str):
    def check(v: str) -> str:
        if not regex.match(v):
            raise RemoteURLError(f"config key 'remote.{key}' must be {what}, got {v!r}")
        return v
    return check


PARAMS: dict[str, Any] = {
    "metadata": _check_metadata,
    "protocol": _choice("protocol", PROTOCOLS),
    "device": _pattern("device", re.compile(r"^[A-Za-z0-9_,:-]{0,256}$"),
                       "RDMA device names (e.g. mlx5_0,mlx5_1)"),
    "segment_gib": _number("segment_gib", 0, 1024, False, "GiB"),
    "local_hostname": _pattern("local_hostname", _HOST_RE, "a host name or IP address"),
    "namespace": _pattern("namespace", _NAMESPACE_RE, "up to 64 letters, digits, '.', '_' or '-'"),
    "timeout_ms": _number("timeout_ms", 1, 600_000, True, "milliseconds"),
    "lookup_timeout_ms": _number("lookup_timeout_ms", 1, 60_000, True, "milliseconds"),
    "retry_s": _number("retry_s", 0, 86_400, False, "seconds; 0: never"),
}


def parse_remote_url(url: Any) -> RemoteURL:
    """Parse and check a `remote` URL; RemoteURLError names the part that is wrong."""
    if not isinstance(url, str) or not url:
        raise RemoteURLError(
            "config key 'remote' must be null (off) or a URL such as "
            f"'mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:8080/metadata', got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise RemoteURLError(f"config key 'remote' must use the scheme {list(SCHEMES)}, got {url!r}")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.fragment:
        raise RemoteURLError(
            f"config key 'remote' takes only mooncake://HOST:PORT?PARAMS (no user, path or fragment), "
            f"got {url!r}")
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        port = None
    if not host or not _valid_host(host):
        raise RemoteURLError(f"config key 'remote' needs the master's host, got {url!r}")
    if port is None or port == 0:
        raise RemoteURLError(f"config key 'remote' needs the master's port (1-65535), got {url!r}")
    values: dict[str, Any] = {}
    for key, vals in parse_qs(parts.query, keep_blank_values=True, strict_parsing=False).items():
        if key not in PARAMS:
            raise RemoteURLError(
                f"unknown config key 'remote.{key}'; allowed: {', '.join('remote.' + k for k in PARAMS)}")
        if len(vals) != 1:
            raise RemoteURLError(f"config key 'remote.{key}' is given {len(vals)} times")
        values[key] = PARAMS[key](vals[0])
    if "metadata" not in values:
        raise RemoteURLError(
            "config key 'remote.metadata' is required: the metadata server, e.g. "
            "metadata=http://127.0.0.1:8080/metadata (the master's embedded HTTP server)")
    if "lookup_timeout_ms" in values and values["lookup_timeout_ms"] > values.get("timeout_ms", 5000):
        raise RemoteURLError("config key 'remote.lookup_timeout_ms' must not exceed 'remote.timeout_ms'")
    return RemoteURL(host=host, port=port, **values)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host))


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
