"""Test-wide settings.

Without a GPU, Triton kernels run in its CPU interpreter, which must be switched on before any
module that defines a `@triton.jit` kernel is imported: hence this runs first. vLLM runs in the
test process (no engine subprocesses) so tests can look at connector state directly. Without
vLLM installed, the modules of the folders that need it are skipped at collection, never imported.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The float32 test model's attention runs in vLLM's Triton backend on a GPU (FlashAttention and
    # FlashInfer take no float32), whose tl.dot rounds float32 inputs to TF32 unless told otherwise:
    # IEEE dots keep that rounding out of the logprob comparisons, which look for wrong KV.
    # (A cache-invalidating Triton variable; TRITON_F32_DEFAULT=tf32 restores the default.)
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

#: Devices the kernel tests run on: the CPU (Triton interpreted) here and in CI, the GPU (compiled)
#: on the GPU host. The GPU variants carry the `gpu` mark so `-m gpu` selects exactly them.
KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else ["cpu"]

#: Folders under tests/ whose every module needs vLLM.
VLLM_FOLDERS = {"integration", "soak"}
HAS_VLLM = importlib.util.find_spec("vllm") is not None


class _NeedsVllm(pytest.Module):
    """A module of a vLLM folder where vLLM is not installed: reported skipped, never imported."""

    def collect(self):
        pytest.skip("needs vLLM, which is not installed here")


def pytest_pycollect_makemodule(module_path: Path, parent):
    if HAS_VLLM or module_path.relative_to(Path(__file__).parent).parts[0] not in VLLM_FOLDERS:
        return None
    return _NeedsVllm.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request) -> str:
    """Where Triton kernels run in this test session: 'cuda' compiled, or 'cpu' interpreted."""
    return request.param


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    """The tiny test model, made once per session (the engine tests and the soak share it)."""
    from bench.models import get_model

    return get_model("tiny-llama").materialize(tmp_path_factory.mktemp("models"))
