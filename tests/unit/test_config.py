"""PrefixCacheConfig: defaults, and every bad input fails naming the key and the allowed values."""
import logging

import pytest

from triton_prefix_cache.config import ConfigError, DebugOptions, PrefixCacheConfig
from triton_prefix_cache.index import backend


def test_defaults():
    cfg = PrefixCacheConfig.from_dict({"host_cache_gib": 16})
    assert (cfg.host_cache_gib, cfg.demote, cfg.load, cfg.index_backend, cfg.eviction, cfg.copy_backend) == (
        16,
        "write_through",
        "auto",
        "auto",
        "lru",
        "auto",
    )
    assert cfg.host_cache_bytes == 16 << 30
    assert (cfg.layerwise_ahead, cfg.staging_mib) == (None, 256)
    d = cfg.debug
    assert d == DebugOptions() and d.poll_stores is None
    assert not any((d.record_pages, d.load_delay_polls, d.store_delay_polls, d.step_timing))


def test_all_keys_set():
    raw = {"host_cache_gib": 0.5, "demote": "write_through", "load": "layerwise", "index_backend": "cpu",
           "eviction": "lru", "copy_backend": "staged", "layerwise_ahead": 2, "staging_mib": 64,
           "debug": {"record_pages": True}, "report_timeout_s": 30,
           "remote": "mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:8080/metadata"}
    cfg = PrefixCacheConfig.from_dict(raw)
    assert sorted(raw) == sorted(PrefixCacheConfig.keys())  # every key is exercised here
    assert cfg.host_cache_bytes == 1 << 29
    assert (cfg.copy_backend, cfg.layerwise_ahead, cfg.staging_mib) == ("staged", 2, 64)
    assert (cfg.demote, cfg.load, cfg.index_backend) == ("write_through", "layerwise", "cpu")
    assert cfg.debug.record_pages is True
    assert cfg.remote_url.master == "127.0.0.1:50051"
    assert cfg.report_timeout_s == 30 and PrefixCacheConfig(host_cache_gib=1).report_timeout_s == 120


def test_debug_options():
    raw = {"record_pages": True, "load_delay_polls": 2, "store_delay_polls": 3, "poll_stores": False,
           "step_timing": True}
    cfg = PrefixCacheConfig.from_dict({"host_cache_gib": 1, "debug": raw})
    assert sorted(raw) == sorted(DebugOptions.keys())  # every sub-key is exercised here
    assert cfg.debug == DebugOptions(**raw)
    assert PrefixCacheConfig.from_dict({"host_cache_gib": 1, "debug": None}).debug == DebugOptions()
    assert PrefixCacheConfig.from_dict({"host_cache_gib": 1, "debug": {}}).debug == DebugOptions()
    # the frozen config stays hashable and comparable with its debug options
    assert hash(cfg) == hash(PrefixCacheConfig.from_dict({"host_cache_gib": 1, "debug": dict(raw)}))


@pytest.mark.parametrize("name", ["auto", "triton", "cpu"])
def test_index_backends(name):
    assert PrefixCacheConfig.from_dict({"host_cache_gib": 1, "index_backend": name}).index_backend == name


def test_index_backend_torch_is_a_deprecated_alias_of_cpu(caplog):
    backend._warn_deprecated.cache_clear()  # the warning is logged once per process
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        for _ in range(2):
            cfg = PrefixCacheConfig.from_dict({"host_cache_gib": 1, "index_backend": "torch"})
            assert cfg.index_backend == "cpu"
    warnings = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "'torch'" in warnings[0].getMessage(), caplog.text


def test_frozen():
    cfg = PrefixCacheConfig.from_dict({"host_cache_gib": 1})
    with pytest.raises(AttributeError):
        cfg.demote = "write_through"


@pytest.mark.parametrize(
    "raw, must_mention",
    [
        ({}, ["host_cache_gib", "required"]),
        (None, ["host_cache_gib", "required"]),
        ({"host_cache_gib": 0}, ["host_cache_gib", "> 0"]),
        ({"host_cache_gib": -1.5}, ["host_cache_gib", "> 0"]),
        ({"host_cache_gib": "16"}, ["host_cache_gib", "'16'"]),
        ({"host_cache_gib": True}, ["host_cache_gib"]),
        ({"host_cache_gib": float("nan")}, ["host_cache_gib"]),
        ({"host_cache_gib": float("inf")}, ["host_cache_gib"]),
        ({"host_cache_gib": 1, "demote": "eager"}, ["demote", "lazy", "write_through", "eager"]),
        ({"host_cache_gib": 1, "load": "sync"}, ["load", "async", "layerwise"]),
        (
            {"host_cache_gib": 1, "copy_backend": "cuda"},
            ["copy_backend", "auto", "staged", "dma", "triton", "torch"],
        ),
        (
            {"host_cache_gib": 1, "index_backend": "cuda"},
            ["index_backend", "'auto'", "'triton'", "'cpu'", "'torch'", "deprecated", "'cuda'"],
        ),
        ({"host_cache_gib": 1, "index_backend": None}, ["index_backend", "'cpu'", "None"]),
        ({"host_cache_gib": 1, "eviction": "arc"}, ["eviction", "lru", "arc"]),
        ({"host_cache_gib": 1, "layerwise_ahead": -1}, ["layerwise_ahead", "null", "-1"]),
        ({"host_cache_gib": 1, "layerwise_ahead": "1"}, ["layerwise_ahead", "'1'"]),
        ({"host_cache_gib": 1, "layerwise_ahead": True}, ["layerwise_ahead"]),
        ({"host_cache_gib": 1, "staging_mib": 4}, ["staging_mib", "8 to 16384", "4"]),
        ({"host_cache_gib": 1, "staging_mib": 64.0}, ["staging_mib", "64.0"]),
        ({"host_cache_gib": 1, "staging_mib": False}, ["staging_mib"]),
        ({"host_cache_gib": 1, "report_timeout_s": 0}, ["report_timeout_s", "> 0", "seconds"]),
        ({"host_cache_gib": 1, "report_timeout_s": "60"}, ["report_timeout_s", "'60'"]),
        ({"host_cache_gib": 1, "report_timeout_s": float("inf")}, ["report_timeout_s", "inf"]),
        ({"host_cache_gib": 1, "demote": None}, ["demote", "lazy"]),
        ({"host_cache_gib": 1, "cpu_bytes_to_use": 5},
         ["cpu_bytes_to_use", "host_cache_gib", "allowed keys"]),
        ("host_cache_gib=1", ["dict"]),
        ({"host_cache_gib": 1, "hots_cache": 1}, ["'hots_cache'", "did you mean 'host_cache_gib'"]),
        ({"host_cache_gib": 1, "debug": True}, ["'debug'", "dict", "record_pages"]),
        ({"host_cache_gib": 1, "debug": {"record_page": True}},
         ["'debug.record_page'", "did you mean 'debug.record_pages'", "debug.step_timing"]),
        ({"host_cache_gib": 1, "debug": {"record_pages": 1}}, ["'debug.record_pages'", "true or false"]),
        ({"host_cache_gib": 1, "debug": {"step_timing": "yes"}}, ["'debug.step_timing'", "'yes'"]),
        ({"host_cache_gib": 1, "debug": {"load_delay_polls": -1}}, ["'debug.load_delay_polls'", "int", "-1"]),
        ({"host_cache_gib": 1, "debug": {"store_delay_polls": 1.5}}, ["'debug.store_delay_polls'", "1.5"]),
        ({"host_cache_gib": 1, "debug": {"load_delay_polls": True}}, ["'debug.load_delay_polls'"]),
        ({"host_cache_gib": 1, "debug": {"poll_stores": "1"}}, ["'debug.poll_stores'", "null", "'1'"]),
    ],
)
def test_bad_config(raw, must_mention):
    with pytest.raises(ConfigError) as e:
        PrefixCacheConfig.from_dict(raw)
    msg = str(e.value)
    for word in must_mention:
        assert word in msg, (word, msg)
    assert "\n" not in msg  # one line: it is what `vllm serve` prints last


def test_config_error_is_value_error():
    # vLLM surfaces ValueError at config time; keep ours one.
    assert issubclass(ConfigError, ValueError)


def test_every_key_is_documented_in_the_readme():
    """The README's table of `kv_connector_extra_config` keys names every key, and no other."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### Configuration keys", 1)[1].split("\n\n", 2)[1]  # the table
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert sorted(documented) == sorted(PrefixCacheConfig.keys())


def test_host_cache_is_checked_against_the_cgroup_limit_and_warned_above_physical(monkeypatch, caplog):
    """A cgroup memory limit is a hard bound; the physical memory the kernel reports is one only
    far beyond it (some virtual machines grow it on demand): above it, a warning."""
    import logging
    import os

    from triton_prefix_cache import config as C

    real = C.cgroup_memory_limit()  # this machine's: none, or a positive number of bytes
    assert real is None or real > 0
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(C.os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else (8 << 30) // page)
    monkeypatch.setattr(C, "cgroup_memory_limit", lambda: None)
    with caplog.at_level(logging.WARNING, logger=C.log.name):
        PrefixCacheConfig.validated({"host_cache_gib": 40})  # 5x the 8 GiB reported: goes on
    assert any("host_cache_gib" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"host_cache_gib.*physical memory"):
        PrefixCacheConfig.validated({"host_cache_gib": 8 * 65})
    monkeypatch.setattr(C, "cgroup_memory_limit", lambda: 16 << 30)
    with pytest.raises(ConfigError, match=r"host_cache_gib.*memory limit"):
        PrefixCacheConfig.validated({"host_cache_gib": 20})
    PrefixCacheConfig.validated({"host_cache_gib": 12})
