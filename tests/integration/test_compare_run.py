"""bench.compare end to end on the tiny CPU model, in both engine modes: the configs run, the JSON
says what was measured and how, and the comparison shows what the workload is built to show."""

import json

import pytest

from bench import compare as C

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_compare_runs_both_configs_and_records_the_engine_mode(tmp_path, engine_process):
    out = tmp_path / "compare.json"
    argv = ["--workload", "docqa", "--configs", "prefix", "ours", "--repeat", "1", "--out", str(out)]
    assert C.main(argv + (["--engine-process"] if engine_process else [])) == 0
    d = json.loads(out.read_text())
    assert d["engine_process"] is engine_process and d["partial"] is False
    ours = d["workloads"]["docqa"]["configs"]["ours"]["summary"]
    prefix = d["workloads"]["docqa"]["configs"]["prefix"]["summary"]
    assert ours["prompt_tokens"] == prefix["prompt_tokens"] > 0
    # A working set 3x the KV cache in tile order: built-in caching has evicted every document before
    # its next question; the host tier serves rounds 2-3 (whole blocks of each document).
    assert prefix["cached_tokens"] == 0
    params = d["workloads"]["docqa"]["params"]
    assert ours["cached_tokens"] >= 0.9 * 2 * params["num_docs"] * params["doc_tokens"]
    assert set(d["ratios"]["docqa"]) >= {"ttft_ours_over_prefix", "throughput_ours_over_prefix"}
    # The adapter's scheduler hooks can be timed only with the engine core in this process.
    assert bool(ours["connector_hook_ms_per_request"]) is not engine_process
