"""The config key `remote`: a mooncake:// URL parsed and checked at start-up, every bad part named."""

import pytest

from triton_prefix_cache.config import ConfigError, PrefixCacheConfig
from triton_prefix_cache.remote.url import PARAMS, RemoteURL, parse_remote_url

BASE = "mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:8080/metadata"


def cfg(remote):
    return PrefixCacheConfig.from_dict({"host_cache_gib": 1, "remote": remote})


def test_off_by_default():
    c = PrefixCacheConfig.from_dict({"host_cache_gib": 1})
    assert c.remote is None and c.remote_url is None


def test_the_issue_example_and_defaults():
    u = cfg(BASE + "&protocol=tcp&segment_gib=4").remote_url
    assert u == RemoteURL(host="127.0.0.1", port=50051, metadata="http://127.0.0.1:8080/metadata",
                          protocol="tcp", segment_gib=4.0)
    assert (u.master, u.segment_bytes, u.timeout_ms, u.lookup_timeout_ms, u.retry_s) == (
        "127.0.0.1:50051", 4 << 30, 5000, 50, 30.0)


def test_every_parameter():
    url = (BASE.replace("127.0.0.1:50051", "store.example:7000")
           + "&protocol=rdma&device=mlx5_0,mlx5_1&segment_gib=0.5&local_hostname=10.0.0.5"
           "&namespace=prod-a&timeout_ms=2000&lookup_timeout_ms=20&retry_s=0")
    u = parse_remote_url(url)
    assert (u.host, u.port, u.protocol, u.device, u.segment_gib, u.local_hostname, u.namespace,
            u.timeout_ms, u.lookup_timeout_ms, u.retry_s) == (
        "store.example", 7000, "rdma", "mlx5_0,mlx5_1", 0.5, "10.0.0.5", "prod-a", 2000, 20, 0.0)
    assert set(PARAMS) == {"metadata", "protocol", "device", "segment_gib", "local_hostname", "namespace",
                           "timeout_ms", "lookup_timeout_ms", "retry_s"}


@pytest.mark.parametrize("metadata", ["P2PHANDSHAKE", "etcd://10.0.0.1:2379", "http://meta:8080/metadata"])
def test_metadata_forms(metadata):
    assert parse_remote_url(f"mooncake://h:1?metadata={metadata}").metadata == metadata


def test_ipv6_master():
    assert parse_remote_url("mooncake://[::1]:50051?metadata=P2PHANDSHAKE").master == "[::1]:50051"


@pytest.mark.parametrize("value,named", [
    (3, "'remote' must be null"),
    ("", "'remote' must be null"),
    ("redis://127.0.0.1:1?metadata=P2PHANDSHAKE", "scheme"),
    ("mooncake://127.0.0.1?metadata=P2PHANDSHAKE", "master's port"),
    ("mooncake://127.0.0.1:0?metadata=P2PHANDSHAKE", "master's port"),
    ("mooncake://127.0.0.1:99999?metadata=P2PHANDSHAKE", "master's port"),
    ("mooncake://:1?metadata=P2PHANDSHAKE", "master's host"),
    ("mooncake://bad_host:1?metadata=P2PHANDSHAKE", "master's host"),
    ("mooncake://u:p@h:1?metadata=P2PHANDSHAKE", "no user, path or fragment"),
    ("mooncake://h:1/store?metadata=P2PHANDSHAKE", "no user, path or fragment"),
    ("mooncake://h:1", "'remote.metadata' is required"),
    ("mooncake://h:1?metadata=ftp://m:1/x", "'remote.metadata'"),
    ("mooncake://h:1?metadata=http://m/x", "'remote.metadata' needs a port"),
    (BASE + "&protocol=udp", "'remote.protocol' must be one of ['tcp', 'rdma']"),
    (BASE + "&segment_gib=-1", "'remote.segment_gib'"),
    (BASE + "&segment_gib=lots", "'remote.segment_gib'"),
    (BASE + "&segment_gib=nan", "'remote.segment_gib'"),
    (BASE + "&timeout_ms=0", "'remote.timeout_ms'"),
    (BASE + "&timeout_ms=1.5", "'remote.timeout_ms' must be an int"),
    (BASE + "&lookup_timeout_ms=6000", "'remote.lookup_timeout_ms' must not exceed"),
    (BASE + "&retry_s=-1", "'remote.retry_s'"),
    (BASE + "&namespace=a/b", "'remote.namespace'"),
    (BASE + "&device=mlx5 0", "'remote.device'"),
    (BASE + "&local_hostname=-x", "'remote.local_hostname'"),
    (BASE + "&protocl=tcp", "unknown config key 'remote.protocl'"),
    (BASE + "&protocol=tcp&protocol=rdma", "'remote.protocol' is given 2 times"),
])
def test_bad_values_fail_naming_the_key(value, named):
    with pytest.raises(ConfigError, match="config key") as e:
        cfg(value)
    assert named in str(e.value)
