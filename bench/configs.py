"""The configs every engine benchmark compares, and their grammar.

`ours:load=async,demote=write_through` names this plugin with connector keys; any config takes
`kv_gib=<GiB>`, its own engine KV cache size. `engine_kwargs` gives what distinguishes a config as
`LLM(...)` keyword arguments; `serve_flags` gives the same as `vllm serve` flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIGS = {
    "none": "no prefix caching",
    "prefix": "built-in prefix caching",
    "offload": "built-in CPU offloading (native)",
    "simple": "SimpleCPUOffloadConnector (lazy)",
    "ours": "TritonPrefixCacheConnector",
}
MODEL_CACHE = Path(
    os.environ.get("TPC_MODEL_CACHE", Path.home() / ".cache" / "triton-prefix-cache" / "models")
)


#: Extra keys every config takes (engine settings); every other extra key is ours' connector config.
ENGINE_KEYS = ("kv_gib",)


def parse_config(config: str) -> tuple[str, dict]:
    """'ours' or 'ours:load=layerwise,demote=write_through' -> ('ours', {extra keys}).

    Any config takes `kv_gib=<GiB>`, its own engine KV cache size: `prefix:kv_gib=16` is built-in
    prefix caching with room for the whole working set, every reuse a VRAM hit (the ideal a host
    tier can approach: its TTFT is the engine's own cost of a request whose prefix is cached).
    """
    base, _, extra = config.partition(":")
    if base not in CONFIGS:
        raise ValueError(
            f"config: expected one of {list(CONFIGS)} (ours may take ':key=value,...'), got {config!r}"
        )
    pairs = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
    own = {k: _value(v) for k, v in pairs.items()}
    if base != "ours" and set(own) - set(ENGINE_KEYS):
        raise ValueError(f"config: only 'ours' takes keys other than {list(ENGINE_KEYS)}, got {config!r}")
    kv = own.get("kv_gib")
    if kv is not None and (isinstance(kv, bool) or not isinstance(kv, (int, float)) or kv <= 0):
        raise ValueError(f"config: kv_gib expects a number > 0, got {config!r}")
    return base, own


def unparse_config(base: str, extra: dict) -> str:
    """The config string `parse_config` reads back as (base, extra)."""
    if not extra:
        return base
    pairs = (f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in extra.items())
    return base + ":" + ",".join(pairs)


def _value(text: str):
    """A config value from the command line: JSON where it parses (1, null, true), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def split_extra(extra: dict) -> tuple[dict, dict]:
    """(engine keys, connector keys) of a config's extra keys."""
    return ({k: v for k, v in extra.items() if k in ENGINE_KEYS},
            {k: v for k, v in extra.items() if k not in ENGINE_KEYS})


def config_engine(config: str, engine: dict) -> dict:
    """The shared engine settings with a config's own engine keys applied."""
    own, _ = split_extra(parse_config(config)[1])
    if "kv_gib" in own:
        return dict(engine, kv_cache_memory_bytes=int(own["kv_gib"] * 2**30))
    return engine


def engine_kwargs(config: str, host_gib: float) -> dict:
    """What distinguishes one config from another; everything else is shared."""
    config, extra = parse_config(config)
    _, extra = split_extra(extra)
    if config == "none":
        return {"enable_prefix_caching": False}
    if config == "prefix":
        return {"enable_prefix_caching": True}
    if config == "offload":
        return {
            "enable_prefix_caching": True,
            "kv_offloading_size": host_gib,
            "kv_offloading_backend": "native",
        }
    if config == "simple":
        return {
            "enable_prefix_caching": True,
            "kv_transfer_config": {
                "kv_connector": "SimpleCPUOffloadConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {
                    "cpu_bytes_to_use": int(host_gib * 2**30),
                    "lazy_offload": True,
                },
            },
        }
    if config == "ours":
        return {
            "enable_prefix_caching": True,
            "kv_transfer_config": {
                "kv_connector": "TritonPrefixCacheConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"host_cache_gib": host_gib, **extra},
            },
        }
    raise ValueError(f"config: expected one of {list(CONFIGS)}, got {config!r}")


def serve_flags(config: str, host_gib: float) -> list[str]:
    """`vllm serve` flags of a config: `engine_kwargs` as the command line spells them."""
    flags = []
    for key, value in engine_kwargs(config, host_gib).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def check_args(error, configs: list[str] | None, model: str | None,
               extra_configs: tuple[str, ...] = ()) -> None:
    """Refuse bad --configs / --model values through `error` (argparse's `parser.error`, which
    prints the usage and exits 2): `extra_configs` are names a benchmark adds (bench.serve: roof)."""
    from bench.models import get_model

    for c in configs or ():
        if c in extra_configs:
            continue
        try:
            parse_config(c)
        except ValueError as e:
            error(f"--configs: {e}")
    if model:
        try:
            get_model(model)
        except KeyError as e:
            error(f"--model: {e.args[0]}")
