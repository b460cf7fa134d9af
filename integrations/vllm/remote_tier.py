"""The remote tier in the vLLM adapter: when an engine may share a store, and under which namespace.

Two engines may serve each other's blocks only if equal keys mean equal KV. A block key is the
first 16 bytes of vLLM's block hash, chained over the whole prefix (token ids and extra keys:
LoRA, multimodal inputs, cache salt), so it means the same tokens in two engines only if both
hash alike: same algorithm, same seed (`compat.block_hash_seed`). An engine whose seed is drawn at
random per process is refused at startup rather than run with a store no other engine can hit.
The namespace (`RemoteNamespace`) then separates everything else that makes KV for the same
tokens differ: the model, the KV dtype, the block size, the slot geometry and page layout, the
hash scheme and vLLM's version (its block hashing may change between versions).

The worker builds the namespace (it alone sees the KV tensors' layout) and reports it; the
scheduler's lookups use exactly that namespace, and none are made before it arrives.

Tensor parallelism: one store value per block holds the whole slot of one rank's pool; with N
ranks every rank would need its own keys for its shard, which is not done yet: `remote` is
refused at tensor_parallel_size > 1.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from triton_prefix_cache.config import ConfigError, PrefixCacheConfig
from triton_prefix_cache.remote.keys import RemoteNamespace

from . import compat


def check_remote(vllm_config: Any, kv_cache_config: Any = None) -> str:
    """Refuse, naming the key `remote`, an engine that cannot share a store; else its hash scheme
    (the block keys' derivation, seed included, for the namespace)."""
    if compat.attention_window(kv_cache_config) is not None:
        raise ConfigError(
            "config key 'remote': the remote tier does not serve models with a sliding window on every "
            "layer in this version (their host tier holds windows, not whole prefixes, and a fetch would "
            "need the window's lookup); leave 'remote' out to serve with the host tier")
    tp = compat.tensor_parallel_size(vllm_config)
    if tp > 1:
        raise ConfigError(
            f"config key 'remote': the remote tier supports tensor_parallel_size=1 only in this version, "
            f"got {tp} (each rank holds a shard of every block and would need its own keys); leave "
            "'remote' out to serve with the host tier")
    if getattr(vllm_config.cache_config, "calculate_kv_scales", False):
        raise ConfigError(
            "config key 'remote': calculate_kv_scales computes each engine's FP8 KV scales at run time, "
            "so another engine's KV would be read with the wrong scales; turn one of them off")
    algo, seed = compat.block_hash_seed(vllm_config)
    if seed is None:
        raise ConfigError(
            f"config key 'remote': vLLM seeds its block hashes ({algo}) at random in each process, so no "
            "other engine could find this engine's blocks in the store; set PYTHONHASHSEED to the same "
            "value for every engine sharing the store, or use --prefix-caching-hash-algo sha256 "
            "(vLLM >= 0.32 seeds sha256 alike in every process)")
    major, minor = compat.VLLM_VERSION[:2]
    digest = hashlib.sha256(seed.encode()).hexdigest()[:16]
    return f"vllm{major}.{minor}:{algo}:seed-sha256={digest}"


def model_identity(vllm_config: Any) -> str:
    """What names the weights: the model (name or path), revision, quantization, weight dtype and
    the overrides of its config and quantization given to vLLM. Two different checkpoints under
    one local path look alike here: give such deployments their own `remote.namespace`."""
    mc = vllm_config.model_config
    ident: dict[str, Any] = {"model": str(mc.model), "revision": getattr(mc, "revision", None),
                             "quantization": getattr(mc, "quantization", None),
                             "dtype": str(getattr(mc, "dtype", ""))}
    for name in ("hf_overrides", "quantization_config"):  # what the command line may override
        value = getattr(mc, name, None)
        if value:
            ident[name] = value if isinstance(value, dict) else repr(value)
    return json.dumps(ident, sort_keys=True, default=str)


def kv_dtype(vllm_config: Any, tensors: list[torch.Tensor]) -> str:
    """The KV cache dtype as configured (`auto`, `fp8_e4m3`, ...) and as stored."""
    cc = vllm_config.cache_config
    stored = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
    out = f"{cc.cache_dtype}:{stored}"
    skipped = getattr(cc, "kv_cache_dtype_skip_layers", None)
    return f"{out}:skip={','.join(map(str, skipped))}" if skipped else out


def kv_layout(tensor: torch.Tensor, num_blocks: int | None, spec: Any) -> str:
    """The page layout of one layer's KV tensor: its shape with the blocks' dimension as N, the
    order of its dimensions in memory (outermost first) and the KV cache spec's kind, so that two
    layouts of equal size never match."""
    # The blocks' dimension is the first, or the second after K and V (as `worker.page_views`
    # reads it); its size differs between engines, the rest of the shape must not.
    apart = num_blocks not in (None, 2) and tensor.dim() > 1 and tensor.shape[:2] == (2, num_blocks)
    shape = [str(d) for d in tensor.shape]
    shape[1 if apart else 0] = "N"
    order = sorted(range(tensor.dim()), key=lambda i: -tensor.stride(i))
    return f"{type(spec).__name__}:{'x'.join(shape)}:{','.join(map(str, order))}"


def worker_namespace(cfg: PrefixCacheConfig, vllm_config: Any, kv_cache_config: Any,
                     tensors: list[torch.Tensor], num_layers: int, page_bytes: int) -> RemoteNamespace:
    """The namespace of this engine's blocks in the store, from the worker's view of its KV cache
    (`tensors`: one per layer; `num_layers` x `page_bytes`: the host slot)."""
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    url = cfg.remote_url
    return RemoteNamespace(
        model=model_identity(vllm_config), dtype=kv_dtype(vllm_config, tensors),
        block_size=int(spec.block_size), num_layers=num_layers, page_bytes=page_bytes,
        hash_scheme=check_remote(vllm_config),
        layout=kv_layout(tensors[0], getattr(kv_cache_config, "num_blocks", None), spec),
        tenant=url.namespace if url is not None else "")


def namespace_fields(ns: RemoteNamespace) -> dict:
    """A namespace as plain data for the worker metadata (`RemoteNamespace(**fields)` rebuilds it)."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(ns) if f.init}


def placeholder_namespace(vllm_config: Any, kv_cache_config: Any) -> RemoteNamespace:
    """The scheduler's client needs a namespace to exist; its lookups wait for the worker's."""
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    return RemoteNamespace(model="(until the worker reports its namespace)", dtype="-",
                           block_size=int(spec.block_size), num_layers=1, page_bytes=1,
                           hash_scheme="-")
