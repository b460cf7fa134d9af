"""bench.serve end to end on the tiny CPU model: two `vllm serve` processes in turn, driven by
`vllm bench serve`, each stopped with nothing left behind, and a record that says what ran."""

import json

import pytest

from bench import serve as S

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_serve_runs_both_configs_and_leaves_nothing_behind(tmp_path):
    record, chart = tmp_path / "results.jsonl", tmp_path / "serve-prefix.png"
    argv = ["--workload", "prefix", "--configs", "prefix", "ours", "--concurrency", "2",
            "--num-prompts", "32", "--repeat", "2", "--record", str(record), "--chart", str(chart),
            "--raw-dir", str(tmp_path / "raw")]
    assert S.main(argv) == 0
    lines = record.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["workload"] == "prefix" and rec["device"] and rec["versions"]["vllm"]
    assert chart.stat().st_size > 0
    for name in ("prefix", "ours"):
        entry = rec["configs"][name]
        assert "error" not in entry and entry["port_released"], entry
        assert "--enable-prefix-caching" in entry["server_command"]
        (run,) = entry["runs"]
        assert run["completed"] == 32 and run["failed"] == 0
        # two runs of the concurrency (their own prompts): the median one, and the range of both
        assert run["repeats"] == 2 and rec["repeat"] == 2
        lo, hi = run["range"]["request_throughput"]
        assert lo <= run["request_throughput"] <= hi
        assert " bench serve " in run["client_command"] and "--max-concurrency 2" in run["client_command"]
    ours = rec["configs"]["ours"]["runs"][0]["metrics"]
    # 16 prefixes asked twice each, their KV 4x the engine's: the second asks hit the host tier.
    assert ours["vllm:tpc_host_hit_tokens_total"] > 0
    assert ours["vllm:external_prefix_cache_hits_total"] == ours["vllm:tpc_host_hit_tokens_total"]
    assert "TritonPrefixCacheConnector" in rec["configs"]["ours"]["server_command"]
    assert rec["ratios"]["baseline"] == "prefix" and rec["ratios"]["ours@2"]["throughput"] > 0
    # The raw folder keeps the record too; --from-raw appends it (a run cut off appends it that way).
    (raw,) = (tmp_path / "raw").iterdir()
    assert json.loads((raw / "record.json").read_text())["partial"] is False
    assert S.main(["--from-raw", str(raw), "--record", str(record), "--chart", str(chart)]) == 0
    again = [json.loads(x) for x in record.read_text().splitlines()]
    assert len(again) == 2 and again[1]["configs"].keys() == rec["configs"].keys()
    # No server left: no process runs either server's command line (each names its own port).
    import subprocess

    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for entry in rec["configs"].values():
        port = entry["server_command"].split("--port ")[1].split()[0]
        assert not [line for line in ps.splitlines() if "cli serve" in line and f"--port {port}" in line]


def test_metrics_parse_and_delta():
    text = "\n".join([
        "# HELP vllm:tpc_host_hit_tokens_total x",
        'vllm:tpc_host_hit_tokens_total{engine="0",model_name="m"} 96.0',
        'vllm:tpc_host_hit_tokens_created{engine="0",model_name="m"} 1.7e9',
        'vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="host"} 32.0',
        'vllm:tpc_host_used_slots{engine="0",model_name="m"} 7.0',
        'vllm:num_requests_running{engine="0",model_name="m"} 1.0',
    ])
    m = S.parse_metrics(text)
    assert m == {"vllm:tpc_host_hit_tokens_total": 96.0,
                 'vllm:prompt_tokens_cached_by_source_total{source="host"}': 32.0,
                 "vllm:tpc_host_used_slots": 7.0}
    after = dict(m, **{"vllm:tpc_host_hit_tokens_total": 160.0, "vllm:tpc_host_used_slots": 9.0})
    d = S.metric_delta(m, after)
    assert d == {"vllm:tpc_host_hit_tokens_total": 64.0, "vllm:tpc_host_used_slots": 9.0}


def test_histogram_quantiles_from_bucket_deltas():
    # Observations into Prometheus-style cumulative buckets, before and after an interval; the
    # interval's p50/p99 must land within the bucket holding numpy's quantile of the new samples.
    import numpy as np

    bounds = [10 ** (k / 4) for k in range(-20, 1)] + [float("inf")]
    rng = np.random.default_rng(0)
    old, new = rng.lognormal(-7, 1, 500), rng.lognormal(-5, 1.5, 2000)

    def snapshot(samples):
        out = {}
        for b in bounds:
            le = "+Inf" if b == float("inf") else repr(b)
            out[f'vllm:tpc_x_seconds_bucket{{le="{le}"}}'] = float((samples <= b).sum())
        out["vllm:tpc_x_seconds_count"] = float(len(samples))
        return out

    d = S.metric_delta(snapshot(old), snapshot(np.concatenate([old, new])))
    assert d["vllm:tpc_x_seconds_count"] == 2000
    for q in (0.5, 0.99):
        exact = float(np.quantile(new, q))
        hi = min(b for b in bounds if b >= exact)
        lo = max([b for b in bounds if b < exact], default=0.0)
        assert lo <= d[f"vllm:tpc_x_seconds_p{round(q * 100)}"] <= hi
    # two label sets of one histogram stay apart
    h = "vllm:tpc_x_seconds_bucket"
    two = {f'{h}{{kind="a",le="1.0"}}': 4.0, f'{h}{{kind="a",le="+Inf"}}': 4.0,
           f'{h}{{kind="b",le="1.0"}}': 0.0, f'{h}{{kind="b",le="+Inf"}}': 2.0}
    d2 = S.metric_delta({}, two)
    assert d2['vllm:tpc_x_seconds_p50{kind="a"}'] == 0.5 and d2['vllm:tpc_x_seconds_p50{kind="b"}'] == 1.0
    assert S.histogram_quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert S.histogram_quantile([(1.0, 0.0), (float("inf"), 3.0)], 0.5) == 1.0  # only +Inf: its bound


def test_ratios_against_offloading_first():
    def entry(*runs):
        return {"runs": [{"concurrency": c, "request_throughput": t, "median_ttft_ms": p50,
                          "p99_ttft_ms": p99} for c, t, p50, p99 in runs]}

    configs = {"prefix": entry((4, 5.0, 900, 2000)), "offload": entry((4, 10.0, 200, 400)),
               "ours": entry((4, 12.0, 150, 300))}
    r = S.ratios(configs)
    assert r["baseline"] == "offload"
    assert r["ours@4"] == {"throughput": 1.2, "ttft_p50": 0.75, "ttft_p99": 0.75}
    assert r["prefix@4"]["throughput"] == 0.5
    assert S.ratios({"ours": entry((1, 1.0, 1, 1))}) == {}


def test_bad_arguments_are_usage_errors(capsys):
    for argv in (["--configs", "nonsense"], ["--concurrency", "0"], ["--model", "nope"],
                 ["--workload", "docqa"]):
        with pytest.raises(SystemExit) as e:
            S.parse_args(argv)
        assert e.value.code == 2
    assert "--model" in capsys.readouterr().err
