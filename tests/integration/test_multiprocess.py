"""The connector in vLLM's default multi-process mode (engine core and worker in spawned processes).

The plugin's entry point must register the connector name in every process, and everything the
two halves exchange must cross process boundaries. Run in a subprocess: the engine spawns its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_multiprocess_mode_matches_builtin_caching(runs, model_path):
    # No module path anywhere: the spawned processes find the connector through the entry point.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run([sys.executable, "-m", "tests.support.mp_run", str(model_path)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).parents[2]))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    ref = runs("oracle").outputs["docqa"]
    assert got["cached"] == [[r.num_cached_tokens for r in b] for b in ref]
    assert got["tokens"] == [[r.tokens for r in b] for b in ref]
    for lps, b in zip(got["logprobs"], ref):
        for lp, r in zip(lps, b):
            assert max(abs(x - y) for x, y in zip(lp, r.logprobs)) <= 1e-5
    m = got["metrics"]
    assert m["vllm:external_prefix_cache_hits"] == m["vllm:tpc_host_hit_tokens"] > 0


def test_multiprocess_idle_engine_settles_stores(model_path):
    """Stores outliving their step (reported 3 polls late) hold GPU blocks; an idle multi-process
    engine keeps stepping (has_pending_push_work) until they are reported, so reset_prefix_cache
    succeeds soon after the last request instead of failing on held blocks forever."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    debug = json.dumps({"store_delay_polls": 3})  # the connector's `debug` option, in its config
    proc = subprocess.run([sys.executable, "-m", "tests.support.mp_run", str(model_path), "reset", debug],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).parents[2]))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["reset_ok"], got
