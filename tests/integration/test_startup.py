"""Startup: plugin registration, every bad config and every out-of-scope engine fails naming the problem."""
from __future__ import annotations

import json
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

from tests.support import harness as H
from triton_prefix_cache.config import ConfigError

pytestmark = pytest.mark.vllm


def test_entry_point_registers_the_connector_name():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "triton_prefix_cache"]
    assert eps and eps[0].value == "triton_prefix_cache_vllm:register"
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    eps[0].load()()
    eps[0].load()()  # idempotent: vLLM may load plugins more than once per process
    from triton_prefix_cache_vllm.connector import TritonPrefixCacheConnector

    assert KVConnectorFactory.get_connector_class_by_name(H.CONNECTOR) is TritonPrefixCacheConnector


@pytest.fixture(scope="module")
def vllm_config(model_path):
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(model=str(model_path), skip_tokenizer_init=True, block_size=H.BLOCK, dtype="float32",
                    enforce_eager=True, max_model_len=H.MAX_MODEL_LEN, kv_transfer_config=H.tpc_config())
    return ea.create_engine_config()


def _kv_cache_config(*specs):
    groups = [SimpleNamespace(kv_cache_spec=s, layer_names=[f"model.layers.{i}.self_attn.attn"])
              for i, s in enumerate(specs)]
    return SimpleNamespace(kv_cache_groups=groups, num_blocks=100)


def _spec(cls_name: str = "FullAttentionSpec", **kw):
    from vllm.v1 import kv_cache_interface as kci

    cls = getattr(kci, cls_name)
    return cls(block_size=H.BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32, **kw)


def _make(vllm_config, extra, kv_cache_config=None, role="SCHEDULER"):
    from triton_prefix_cache_vllm.connector import TritonPrefixCacheConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    old = vllm_config.kv_transfer_config.kv_connector_extra_config
    vllm_config.kv_transfer_config.kv_connector_extra_config = extra
    try:
        return TritonPrefixCacheConnector(vllm_config, getattr(KVConnectorRole, role), kv_cache_config)
    finally:
        vllm_config.kv_transfer_config.kv_connector_extra_config = old


BAD = [
    ({}, ["host_cache_gib", "required"]),
    ({"host_cache_gib": 0}, ["host_cache_gib", "> 0"]),
    ({"host_cache_gib": -2}, ["host_cache_gib", "> 0"]),
    ({"host_cache_gib": "16"}, ["host_cache_gib"]),
    ({"host_cache_gib": 1, "demote": "eager"}, ["demote", "'lazy'", "'write_through'"]),
    ({"host_cache_gib": 1, "load": "sync"}, ["load", "'async'", "'layerwise'"]),
    ({"host_cache_gib": 1, "index_backend": "gpu"},
     ["index_backend", "'auto'", "'triton'", "'cpu'", "'torch'"]),
    ({"host_cache_gib": 1, "eviction": "fifo"}, ["eviction", "'lru'"]),
    ({"host_cache_gib": 1, "cpu_bytes_to_use": 1}, ["cpu_bytes_to_use", "allowed keys"]),
    ({"host_cache_gib": 1e6}, ["host_cache_gib", "physical memory"]),  # a million GiB: no such machine
    ({"host_cache_gib": 1, "remote": "mooncake://127.0.0.1:50051"}, ["remote.metadata", "required"]),
]


@pytest.mark.parametrize("extra, words", BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_bad_config_fails_naming_key_and_values(vllm_config, extra, words, role):
    with pytest.raises(ConfigError) as e:
        _make(vllm_config, extra, _kv_cache_config(_spec()), role)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_config_fails_before_cuda_graph_setup():
    """On GPU, vLLM asks the class about CUDA graphs while building its config: validate there too."""
    from triton_prefix_cache_vllm.connector import TritonPrefixCacheConnector

    with pytest.raises(ConfigError, match="load"):
        TritonPrefixCacheConnector.requires_piecewise_for_cudagraph({"host_cache_gib": 1, "load": "x"})
    # Neither load mode gives up full CUDA graphs: a layer-wise load in a full-graph step is
    # waited for whole (test_units, test_engine tail1).
    assert not TritonPrefixCacheConnector.requires_piecewise_for_cudagraph({"host_cache_gib": 1})
    async_ = {"host_cache_gib": 1, "load": "async"}
    assert not TritonPrefixCacheConnector.requires_piecewise_for_cudagraph(async_)


def test_host_cache_smaller_than_a_block_fails(vllm_config):
    with pytest.raises(ValueError, match="host_cache_gib"):
        _make(vllm_config, {"host_cache_gib": 1e-9}, _kv_cache_config(_spec()))


def test_good_config_builds_both_roles(vllm_config):
    c = _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(_spec()))
    assert (c.cfg.demote, c.cfg.load) == ("write_through", "auto") and c._sched is not None
    w = _make(vllm_config, {"host_cache_gib": 0.01, "load": "layerwise"}, _kv_cache_config(_spec()), "WORKER")
    assert w._worker is not None and w.cfg.load == "layerwise"


@pytest.mark.parametrize(
    "what, words",
    [
        ("tp2", ["tensor_parallel_size=2", "distributed_executor_backend", "'uni'"]),  # in-process workers
        ("pp2", ["pipeline_parallel_size=1", "2"]),
        ("no_prefix_caching", ["prefix caching"]),
        ("two_groups", ["one KV cache group", "2 groups", "FullAttentionSpec", "SlidingWindowSpec"]),
        ("two_groups_hybrid_manager_on", ["hybrid KV cache manager", "is on", "2 groups",
                                          "--no-disable-hybrid-kv-cache-manager"]),
        ("mla", ["dense full attention", "MLAAttentionSpec"]),
        ("chunked_local", ["sliding-window attention", "ChunkedLocalAttentionSpec"]),
        ("mamba_hybrid", ["NemotronHForCausalLM", "hybrid", "Mamba", "SupportsHMA"]),
        ("attention_free", ["Mamba2ForCausalLM", "attention-free"]),
    ],
)
def test_out_of_scope_engines_are_refused(vllm_config, monkeypatch, what, words):
    from triton_prefix_cache_vllm.compat import ScopeError

    kvc = _kv_cache_config(_spec())
    par = vllm_config.parallel_config
    cache = vllm_config.cache_config
    saved = (par.tensor_parallel_size, par.pipeline_parallel_size, cache.enable_prefix_caching)
    sched = vllm_config.scheduler_config
    try:
        if what == "tp2":
            par.tensor_parallel_size = 2
        elif what == "pp2":
            par.pipeline_parallel_size = 2
        elif what == "no_prefix_caching":
            vllm_config.cache_config.enable_prefix_caching = False
        elif what.startswith("two_groups"):
            kvc = _kv_cache_config(_spec(), _spec("SlidingWindowSpec", sliding_window=64))
            if what == "two_groups_hybrid_manager_on":
                monkeypatch.setattr(sched, "disable_hybrid_kv_cache_manager", False)
        elif what == "chunked_local":
            kvc = _kv_cache_config(_spec("ChunkedLocalAttentionSpec", attention_chunk_size=64))
        elif what in ("mamba_hybrid", "attention_free"):
            # what vLLM's model config says of such a model (its KV cache specs never get this far)
            arch = "NemotronHForCausalLM" if what == "mamba_hybrid" else "Mamba2ForCausalLM"
            hybrid = what == "mamba_hybrid"
            monkeypatch.setattr(vllm_config, "model_config", SimpleNamespace(
                architecture=arch, is_hybrid=hybrid, is_attention_free=not hybrid))
        elif what == "mla":
            from vllm.v1.kv_cache_interface import MLAAttentionSpec

            kvc = _kv_cache_config(MLAAttentionSpec(block_size=H.BLOCK, num_kv_heads=1, head_size=64,
                                                    dtype=torch.float32))
        with pytest.raises(ScopeError) as e:
            _make(vllm_config, {"host_cache_gib": 1}, kvc)
    finally:
        par.tensor_parallel_size, par.pipeline_parallel_size, cache.enable_prefix_caching = saved
    for w in words:
        assert w in str(e.value), (w, str(e.value))


REMOTE = "mooncake://127.0.0.1:{port}?metadata=http://127.0.0.1:{port}/metadata"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_remote_with_tensor_parallelism_is_refused_naming_the_key(vllm_config, role):
    par = vllm_config.parallel_config
    saved = par.tensor_parallel_size, par.distributed_executor_backend
    par.tensor_parallel_size, par.distributed_executor_backend = 2, "mp"
    try:
        with pytest.raises(ConfigError) as e:
            _make(vllm_config, {"host_cache_gib": 1, "remote": REMOTE.format(port=1)},
                  _kv_cache_config(_spec()), role)
    finally:
        par.tensor_parallel_size, par.distributed_executor_backend = saved
    assert "'remote'" in str(e.value) and "tensor_parallel_size=1" in str(e.value)


@pytest.mark.parametrize("algo", ["sha256", "xxhash"])
def test_remote_is_refused_where_block_hashes_are_seeded_at_random(vllm_config, monkeypatch, algo):
    """Block keys are vLLM's block hashes: two engines share blocks only if both seed them alike.
    vLLM 0.32 seeds sha256 alike everywhere and xxhash at random unless PYTHONHASHSEED is set;
    vLLM 0.26 seeds every algorithm at random unless it is set."""
    import vllm
    from triton_prefix_cache_vllm.remote_tier import check_remote

    pytest.importorskip("xxhash")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(vllm_config.cache_config, "prefix_caching_hash_algo", algo)
    extra = {"host_cache_gib": 1, "remote": REMOTE.format(port=1)}
    if algo == "sha256" and not vllm.__version__.startswith("0.26."):
        assert check_remote(vllm_config).endswith(":sha256:seed-sha256=" + __import__("hashlib").sha256(
            b"vllm-none-hash").hexdigest()[:16])
    else:
        with pytest.raises(ConfigError) as e:
            _make(vllm_config, extra, _kv_cache_config(_spec()))
        for w in ("'remote'", "random", "PYTHONHASHSEED", "sha256"):
            assert w in str(e.value), (w, str(e.value))
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    scheme = check_remote(vllm_config)  # one seed for every engine: shareable
    assert algo in scheme and scheme.endswith(__import__("hashlib").sha256(b"7").hexdigest()[:16])


def test_the_namespace_separates_what_makes_kv_differ(vllm_config, monkeypatch):
    """Two engines get one namespace exactly when their KV for the same tokens is the same: the
    KV cache's size does not matter; the model, the KV dtype, the block size, the page layout and
    the URL's `namespace` do."""
    from triton_prefix_cache_vllm.remote_tier import worker_namespace
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from triton_prefix_cache.config import PrefixCacheConfig

    url = REMOTE.format(port=1)

    def digest(blocks=100, block_size=H.BLOCK, order=(0, 1, 2, 3), params="") -> bytes:
        cfg = PrefixCacheConfig.from_dict({"host_cache_gib": 1, "remote": url + params})
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=32, dtype=torch.float32)
        kvc = _kv_cache_config(spec)
        kvc.num_blocks = blocks
        shape = (blocks, 2, 32, 64)
        # the same logical shape, its dimensions laid out in memory in `order` (outermost first)
        t = torch.zeros([shape[i] for i in order]).permute(*[order.index(i) for i in range(4)])
        return worker_namespace(cfg, vllm_config, kvc, [t], 1, 2 * 32 * 64 * 4).digest

    base = digest()
    assert digest(blocks=50) == base
    assert digest(order=(0, 2, 1, 3)) != base
    assert digest(block_size=64) != base
    assert digest(params="&namespace=tenant") != base
    monkeypatch.setattr(vllm_config.cache_config, "cache_dtype", "fp8")
    assert digest() != base
    monkeypatch.undo()
    monkeypatch.setattr(vllm_config.model_config, "model", "another/model")
    assert digest() != base


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_remote_with_a_window_on_every_layer_is_refused_naming_the_key(vllm_config, role):
    kvc = _kv_cache_config(_spec("SlidingWindowSpec", sliding_window=64))
    with pytest.raises(ConfigError) as e:
        _make(vllm_config, {"host_cache_gib": 1, "remote": REMOTE.format(port=1)}, kvc, role)
    assert "'remote'" in str(e.value) and "sliding window" in str(e.value)


def test_an_unreachable_store_fails_at_startup_naming_the_key(vllm_config):
    from triton_prefix_cache.remote.store import RemoteStoreError

    port = _closed_port()
    with pytest.raises(RemoteStoreError) as e:
        _make(vllm_config, {"host_cache_gib": 0.01, "remote": REMOTE.format(port=port)},
              _kv_cache_config(_spec()))
    assert "'remote'" in str(e.value), str(e.value)


@pytest.mark.parametrize("spec_kw", [
    {},  # dense
    {"sliding_window": 64},  # sliding-window layers beside full ones, folded into full attention
    {"attention_chunk_size": 64},  # chunked-local layers beside full ones, likewise
    {"cls_name": "SlidingWindowSpec", "sliding_window": 64},  # a window on every layer
])
def test_what_vllm_makes_of_local_attention_is_in_scope(vllm_config, spec_kw):
    """With the hybrid KV cache manager off (vLLM's choice for this connector), local attention
    beside full attention arrives as one FullAttentionSpec group that keeps every token's KV, and a
    window on every layer as one SlidingWindowSpec group."""
    kw = dict(spec_kw)
    spec = _spec(kw.pop("cls_name", "FullAttentionSpec"), **kw)
    c = _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(spec))
    assert c._sched is not None
    assert c._sched.window == (64 if spec_kw.get("cls_name") == "SlidingWindowSpec" else None)


def test_the_model_is_checked_when_vllm_asks_for_the_layout(vllm_config, monkeypatch):
    """vLLM asks the class for a KV cache layout, with its config, before it groups the KV cache
    (0.32: in the engine core right after loading the model): a Mamba hybrid stops there."""
    from triton_prefix_cache_vllm.compat import ScopeError
    from triton_prefix_cache_vllm.connector import TritonPrefixCacheConnector as C

    assert C.get_required_kvcache_layout(vllm_config) is None  # any layout
    monkeypatch.setattr(vllm_config, "model_config", SimpleNamespace(
        architecture="JambaForCausalLM", is_hybrid=True, is_attention_free=False))
    with pytest.raises(ScopeError, match="JambaForCausalLM"):
        C.get_required_kvcache_layout(vllm_config)


def test_window_lookup_takes_the_longest_hit_whose_window_is_in_the_host_tier():
    """A group of sliding-window layers only: a hit needs host copies of its blocks inside the
    window of the request's next token; vLLM puts its null block in place of the earlier ones."""
    from triton_prefix_cache_vllm import compat
    from triton_prefix_cache_vllm.scheduler import SchedulerSide

    from triton_prefix_cache.config import PrefixCacheConfig

    bs, window = 32, 80  # a hit of e blocks needs blocks [e - 3, e)
    firsts = [int(compat.first_block_in_window(e * bs, window, bs)) for e in (1, 2, 3, 4, 10)]
    assert firsts == [0, 0, 0, 1, 7]
    kvc = _kv_cache_config(_spec("SlidingWindowSpec", sliding_window=window))
    vc = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=1),
                         scheduler_config=SimpleNamespace(max_num_batched_tokens=256, max_num_seqs=4))
    side = SchedulerSide(PrefixCacheConfig.validated({"host_cache_gib": 0.01}), vc, kvc)
    keys = torch.arange(40, dtype=torch.int64).reshape(20, 2) + 1000

    def hold(*blocks):
        side.tier.clear()
        k = keys[list(blocks)]
        slots, _, _ = side.tier.begin_store(k)
        side.tier.end_store([int(x) for x in slots], True)

    hold(3, 4, 5, 9, 10)
    assert side._window_hit(keys, 0, 20) == 6  # blocks 3..5: the last window fully held
    assert side._window_hit(keys, 0, 5) == 0  # ends at block 5: needs 2..4, 2 is missing
    assert side._window_hit(keys, 10, 20) == 1  # from block 10 (a GPU hit): needs 10 only
    assert side._window_hit(keys, 9, 20) == 2  # needs 9, 10
    hold(0, 1)
    assert side._window_hit(keys, 0, 20) == 2  # a leading run shorter than the window
    hold()
    assert side._window_hit(keys, 0, 20) == 0
    assert (side._first_loaded(0, 6), side._first_loaded(10, 1)) == (3, 10)


@pytest.mark.slow
def test_engine_start_fails_on_bad_config(model_path):
    """Through the real engine: an unknown key stops vllm.LLM at startup, naming the key."""
    with pytest.raises(Exception) as e:
        H.make_llm(model_path, kv_blocks=80, kv_transfer_config=H.tpc_config(bogus=1))
    assert "bogus" in str(e.value) and "host_cache_gib" in str(e.value)


def test_command_line_check_names_the_bad_key():
    from triton_prefix_cache_vllm.cli import check_command_line

    bad = json.dumps({"kv_connector": H.CONNECTOR, "kv_role": "kv_both",
                      "kv_connector_extra_config": {"host_cache_gib": 0.01, "hots_cache": 1}})
    for argv in (["serve", "m", "--kv-transfer-config", bad], ["serve", "m", f"--kv-transfer-config={bad}"]):
        err = check_command_line(argv)
        assert err is not None and "'hots_cache'" in err and "host_cache_gib" in err and "\n" not in err
    good = bad.replace("hots_cache", "demote").replace(": 1}", ': "lazy"}')
    assert check_command_line(["serve", "m", "--kv-transfer-config", good]) is None
    other = json.dumps({"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"x": 1}})
    assert check_command_line(["serve", "m", "--kv-transfer-config", other]) is None  # not ours
    assert check_command_line(["serve", "m"]) is None
    remote = good.replace('"demote": "lazy"', '"remote": "mooncake://127.0.0.1:1?metadata=http://127.0.0.1:2/m"')
    assert check_command_line(["serve", "m", "--kv-transfer-config", remote]) is None
    bad_remote = remote.replace("metadata=", "metdata=")
    err = check_command_line(["serve", "m", "--kv-transfer-config", bad_remote])
    assert "'remote.metdata'" in (err or "")


def test_only_the_last_kv_transfer_config_counts_and_library_use_is_left_alone(monkeypatch):
    """vLLM uses the last --kv-transfer-config; a program using vLLM as a library (this test
    process) keeps its own arguments: registering the plugin there never exits."""
    import triton_prefix_cache_vllm as plugin
    from triton_prefix_cache_vllm.cli import check_command_line

    bad = json.dumps({"kv_connector": H.CONNECTOR,
                      "kv_connector_extra_config": {"host_cache_gib": 0.01, "x": 1}})
    other = json.dumps({"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {}})
    flag = "--kv-transfer-config"
    assert check_command_line(["serve", "m", flag, bad, flag, other]) is None
    assert "'x'" in check_command_line(["serve", "m", flag, other, flag, bad])
    monkeypatch.setattr("sys.argv", ["my_script.py", "--kv-transfer-config", bad])
    assert plugin._vllm_command_line() is None
    plugin.register()  # no SystemExit


#: A CPU `vllm serve` of the tiny model takes 25-40 s to start here; refusing the config must take
#: a fraction of that.
FAST_FAIL_S = 20


def _run_refused(cmd: list[str]):
    """(process, its non-blank stderr lines, seconds) of a command line expected to be refused."""
    import os
    import subprocess
    import time

    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="1"), capture_output=True,
                          text=True, timeout=300)
    return proc, [ln for ln in proc.stderr.splitlines() if ln.strip()], time.monotonic() - t0


def _assert_refused_fast(proc, lines: list[str], took: float) -> None:
    """The misspelt key named on the last stderr line, no engine started, quickly."""
    assert "hots_cache" in lines[-1] and "host_cache_gib" in lines[-1], lines[-5:]
    assert "EngineCore" not in proc.stdout + proc.stderr, "an engine was started"
    assert took < FAST_FAIL_S, f"took {took:.1f} s"


@pytest.mark.slow
def test_serve_with_a_misspelt_key_fails_fast_naming_it(model_path):
    """`vllm serve` (through this package's CLI, as vllm-cpu needs) with a misspelt key exits at once,
    before any engine process starts, its last stderr line naming the key."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kvt = {"kv_connector": H.CONNECTOR, "kv_role": "kv_both",
           "kv_connector_extra_config": {"host_cache_gib": 0.01, "hots_cache": 1}}
    cmd = [sys.executable, "-m", "triton_prefix_cache_vllm.cli", "serve", str(model_path),
           "--max-model-len", "1024", "--block-size", "32", "--kv-cache-memory-bytes", "2097152",
           "--enforce-eager", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--kv-transfer-config", json.dumps(kvt)]
    proc, lines, took = _run_refused(cmd)
    assert proc.returncode != 0 and lines, (proc.returncode, proc.stderr[-3000:])
    _assert_refused_fast(proc, lines, took)


@pytest.mark.slow
def test_plain_vllm_server_with_a_misspelt_key_fails_before_the_engine(model_path):
    """vLLM's own server entry point (no help from this package's CLI) with a misspelt key exits
    while vLLM builds its parser (the plugin's registration checks the command line), before any
    engine process starts, its last stderr line naming the key."""
    import sys

    kvt = {"kv_connector": H.CONNECTOR, "kv_role": "kv_both",
           "kv_connector_extra_config": {"host_cache_gib": 0.01, "hots_cache": 1}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
           "--max-model-len", "1024", "--block-size", "32", "--enforce-eager", "--port", "0",
           "--kv-transfer-config", json.dumps(kvt)]
    proc, lines, took = _run_refused(cmd)
    assert proc.returncode == 2 and lines, (proc.returncode, proc.stderr[-3000:])
    _assert_refused_fast(proc, lines, took)


def test_failure_policy_is_set_by_the_scheduler_side_and_said_once(vllm_config, monkeypatch, caplog):
    """vLLM's default kv_load_failure_policy ('fail') becomes 'recompute' quietly (debug), by the
    scheduler-side connector only (the scheduler is its only reader); a policy someone chose (one
    other than vLLM's default) is replaced with an info line."""
    import logging

    from triton_prefix_cache_vllm import LOGGER_NAME, compat

    kvt = vllm_config.kv_transfer_config
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    H.capture_adapter_log(monkeypatch, caplog)
    monkeypatch.setattr(kvt, "kv_load_failure_policy", "fail")

    def said():
        recs = [r for r in caplog.records if "kv_load_failure_policy" in r.getMessage()]
        caplog.clear()
        return [r.levelno for r in recs]

    _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(_spec()), "WORKER")
    assert kvt.kv_load_failure_policy == "fail" and said() == []
    _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(_spec()))
    assert kvt.kv_load_failure_policy == "recompute" and said() == [logging.DEBUG]
    _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(_spec()))
    assert said() == []  # 'recompute' already: nothing to say
    kvt.kv_load_failure_policy = "fail"
    monkeypatch.setattr(compat, "default_load_failure_policy", lambda _: "recompute")
    _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(_spec()))
    assert kvt.kv_load_failure_policy == "recompute" and said() == [logging.INFO]


def test_a_sliding_window_model_fails_a_request_whose_load_failed(vllm_config, monkeypatch, caplog):
    """vLLM recomputes a failed load from its first failed block; in a group of sliding-window
    layers only, that block's window reaches into blocks vLLM already freed. There the policy stays
    'fail' (a failed copy ends its request), and a 'recompute' someone chose is replaced, with a
    warning."""
    import logging

    from triton_prefix_cache_vllm import LOGGER_NAME

    kvt = vllm_config.kv_transfer_config
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    H.capture_adapter_log(monkeypatch, caplog)
    swa = _kv_cache_config(_spec("SlidingWindowSpec", sliding_window=64))
    monkeypatch.setattr(kvt, "kv_load_failure_policy", "fail")
    _make(vllm_config, {"host_cache_gib": 0.01}, swa)
    assert kvt.kv_load_failure_policy == "fail"
    assert not [r for r in caplog.records if "kv_load_failure_policy" in r.getMessage()]
    kvt.kv_load_failure_policy = "recompute"
    _make(vllm_config, {"host_cache_gib": 0.01}, swa)
    assert kvt.kv_load_failure_policy == "fail"
    said = [r.levelno for r in caplog.records if "kv_load_failure_policy" in r.getMessage()]
    assert said == [logging.WARNING]
    # folded into full attention, every token's KV is kept: recomputed as for dense models
    _make(vllm_config, {"host_cache_gib": 0.01}, _kv_cache_config(_spec(sliding_window=64)))
    assert kvt.kv_load_failure_policy == "recompute"
