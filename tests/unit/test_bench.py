"""The benchmarks' config grammar, bench.compare's target ratios, argument checks and table, and the
record's helpers (pure functions; no engine runs)."""

import pytest

from bench import compare
from bench import configs as C


def test_parse_config_splits_engine_and_connector_keys():
    assert C.parse_config("ours") == ("ours", {})
    base, extra = C.parse_config("ours:layerwise_ahead=1,load=async,kv_gib=8")
    assert base == "ours" and extra == {"layerwise_ahead": 1, "load": "async", "kv_gib": 8}
    assert C.split_extra(extra) == ({"kv_gib": 8}, {"layerwise_ahead": 1, "load": "async"})
    assert C.parse_config("prefix:kv_gib=16") == ("prefix", {"kv_gib": 16})


@pytest.mark.parametrize(
    "bad", ["bogus", "prefix:load=async", "offload:kv_gib=0", "prefix:kv_gib=abc", "none:kv_gib=true"]
)
def test_parse_config_refuses(bad):
    with pytest.raises(ValueError, match="config"):
        C.parse_config(bad)


def test_engine_keys_go_to_the_engine_not_the_connector():
    engine = {"kv_cache_memory_bytes": 4 << 30, "model": "m"}
    assert C.config_engine("ours:layerwise_ahead=1", engine) is engine
    big = C.config_engine("prefix:kv_gib=16", engine)
    assert big == {"kv_cache_memory_bytes": 16 << 30, "model": "m"}
    assert engine["kv_cache_memory_bytes"] == 4 << 30
    kw = C.engine_kwargs("ours:kv_gib=8,demote=write_through", 2.0)
    connector = kw["kv_transfer_config"]["kv_connector_extra_config"]
    assert connector == {"host_cache_gib": 2.0, "demote": "write_through"}
    assert C.engine_kwargs("prefix:kv_gib=16", 2.0) == {"enable_prefix_caching": True}


def _summary(ttft: float, rps: float) -> dict:
    return {"summary": {"focus_mean_ttft_ms": ttft, "focus_p50_ttft_ms": ttft, "requests_per_s": rps}}


def test_ratios_against_every_baseline_and_the_vram_ideal():
    results = {
        "docqa": {
            "transfer_floor_ms": 20.0,
            "configs": {
                "offload": _summary(50.0, 10.0),
                "ours": _summary(30.0, 20.0),
                "prefix:kv_gib=16": _summary(12.0, 40.0),
                "none": {"error": "failed"},
            },
        }
    }
    r = compare._ratios(results)["docqa"]
    assert r["ttft_ours_over_offload"] == pytest.approx(0.6)
    assert r["throughput_ours_over_offload"] == pytest.approx(2.0)
    assert r["ttft_ours_over_prefix:kv_gib=16"] == pytest.approx(2.5)
    assert r["ttft_ours_minus_prefix:kv_gib=16_ms"] == pytest.approx(18.0)
    assert r["ttft_ours_over_floor"] == pytest.approx(1.5)
    assert not any("none" in k for k in r)


def test_serve_flags_spell_the_engine_kwargs():
    assert C.serve_flags("prefix", 40.0) == ["--enable-prefix-caching"]
    assert C.serve_flags("none", 40.0) == ["--no-enable-prefix-caching"]
    assert C.serve_flags("offload", 40.0) == [
        "--enable-prefix-caching", "--kv-offloading-size", "40", "--kv-offloading-backend", "native"]
    flags = C.serve_flags("ours:load=async", 1.5)
    assert flags[:2] == ["--enable-prefix-caching", "--kv-transfer-config"]
    import json

    assert json.loads(flags[2])["kv_connector_extra_config"] == {"host_cache_gib": 1.5, "load": "async"}


@pytest.mark.parametrize("argv", [
    ["--configs", "nonsense"], ["--configs", "prefix:load=async"], ["--model", "nope"],
    ["--kv-gib", "0"], ["--host-gib", "-1"], ["--doc-tokens", "3"], ["--repeat", "0"],
    ["--workload", "bogus"],
])
def test_compare_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(argv)
    assert e.value.code == 2
    assert "usage: python -m bench.compare" in capsys.readouterr().err


def test_compare_keeps_the_median_run_and_the_range():
    runs = [({"focus_mean_ttft_ms": t, "focus_p50_ttft_ms": t, "requests_per_s": r}, {"run": i})
            for i, (t, r) in enumerate([(30.0, 5.0), (10.0, 9.0), (20.0, 7.0)])]
    (summary, res), spread = compare.median_run("docqa", runs)
    assert res == {"run": 2} and summary["focus_mean_ttft_ms"] == 20.0
    assert spread["focus_mean_ttft_ms"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    assert spread["requests_per_s"] == {"median": 7.0, "min": 5.0, "max": 9.0}
    assert compare._with_range(spread, "focus_mean_ttft_ms", 20.0, 3) == "20 (10-30)"
    assert compare._with_range(spread, "focus_mean_ttft_ms", 20.0, 1) == "20"


def test_numbers_print_with_three_significant_digits_and_binary_units():
    from bench.common import sig3, size

    assert [sig3(v) for v in (1234.5, 0.65123, 35.61, 7.0, 2e10)] == ["1,230", "0.651", "35.6", "7", "2e+10"]
    assert [size(b) for b in (8 << 20, 4 << 30, 2**30 / 128, 512)] == ["8 MiB", "4 GiB", "8 MiB", "512 B"]


def test_records_append_one_line_each_and_charts_of_cpu_runs_are_named_apart(tmp_path):
    from bench import common

    path = tmp_path / "results.jsonl"
    first = common.append_record("demo", {"numbers": [1, 2]}, path)
    common.append_record("demo", {"numbers": [3], "date": "2000-01-01T00:00:00+00:00"}, path)
    lines = common.read_record(path)
    assert len(lines) == 2 and lines[0] == first
    assert {"kind", "date", "command", "device", "hostname", "versions"} <= set(first)
    assert lines[1]["date"].startswith("2000") and lines[1]["numbers"] == [3]
    assert common.chart_path("serve", "prefix", "NVIDIA H200").name == "serve-prefix.png"
    assert common.chart_path("serve", "prefix", "cpu (x86_64)").name == "serve-prefix-cpu.png"
    out = common.save_run("demo", {"n": 1}, tmp_path / "one.json")
    assert out == tmp_path / "one.json" and len(common.read_record(path)) == 2


def test_median_run_keeps_the_median_repeat_and_the_range_of_all():
    from bench.serve import median_run

    tries = [{"concurrency": 4, "request_throughput": t, "median_ttft_ms": f, "p99_ttft_ms": 2 * f,
              "median_tpot_ms": 5.0, "metrics": {"m": t}}
             for t, f in ((3.0, 90.0), (1.0, 200.0), (2.0, 100.0))]
    run = median_run(tries)
    assert run["request_throughput"] == 2.0 and run["metrics"] == {"m": 2.0}  # the median run, whole
    assert run["repeats"] == 3
    assert run["range"] == {"request_throughput": [1.0, 3.0], "median_ttft_ms": [90.0, 200.0],
                            "p99_ttft_ms": [180.0, 400.0], "median_tpot_ms": [5.0, 5.0]}
    assert median_run(tries[:2])["request_throughput"] == 1.0  # even count: the lower middle
    assert median_run(tries[:1]) is tries[0] and "range" not in tries[0]  # one run: as it is


def test_config_strings_round_trip():
    for config in ("ours", "ours:load=async,layerwise_ahead=1,kv_gib=8",
                   "ours:remote=mooncake://127.0.0.1:5/x?metadata=http://127.0.0.1:6/metadata&protocol=tcp"):
        assert C.parse_config(C.unparse_config(*C.parse_config(config))) == C.parse_config(config)
    assert C.unparse_config("ours", {"layerwise_ahead": None, "debug": True}) == (
        "ours:layerwise_ahead=null,debug=true")


def test_shared_workload_asks_each_document_once_and_sizes_its_store():
    from bench import serve as S
    from bench.models import get_model

    w = S.make_workload("shared", S.CPU, None)
    flags = dict(zip(w.dataset[::2], w.dataset[1::2]))
    assert w.num_prompts == S.CPU.shared.docs == int(flags["--prefix-repetition-num-prefixes"])
    assert w.working_set_tokens == w.num_prompts * (S.CPU.prefix_len + S.CPU.suffix_len)
    assert S.make_workload("shared", S.GPU, 8).num_prompts == 8
    # GPU: 32 documents of 8,064 tokens, 128 KiB of KV each, for two runs, +25%, in 1/64 GiB
    gpu = S.store_gib(S.make_workload("shared", S.GPU, None), get_model("llama-3.1-8b"), runs=2)
    assert gpu == pytest.approx(32 * 8064 * 131072 * 2 * 1.25 / 2**30, abs=1 / 64) and gpu * 64 % 1 == 0
    assert S.store_gib(w, get_model("tiny-llama"), runs=1) == S.MIN_SEGMENT_GIB  # 10 MiB: the minimum
    assert S.uses_local_store("ours:remote=local") and not S.uses_local_store("ours")
    assert not S.uses_local_store("ours:remote=mooncake://h:1?metadata=P2PHANDSHAKE")
    assert not S.uses_local_store("roof") and not S.uses_local_store("prefix")


def test_shared_ratios_take_the_plugin_without_a_store_as_baseline():
    from bench import serve as S

    def entry(tput, p50):
        return {"runs": [{"concurrency": 1, "request_throughput": tput, "median_ttft_ms": p50,
                          "p99_ttft_ms": p50}]}

    configs = {"prefix": entry(1.0, 400), "ours": entry(2.0, 200), "ours:remote=local": entry(3.0, 100)}
    r = S.ratios(configs, S.SHARED_BASELINES)
    assert r["baseline"] == "ours" and r["ours:remote=local@1"]["ttft_p50"] == 0.5
    assert S.ratios(configs)["baseline"] == "prefix"
