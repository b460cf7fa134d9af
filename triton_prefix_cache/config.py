"""The prefix cache's typed configuration, validated once at startup.

Engine-agnostic: an adapter hands over the plain dict it got from its engine (for vLLM, the
`kv_connector_extra_config`), and every bad key or value fails here with a message that names the
key and what is allowed, before any memory is allocated.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .index.backend import ALIASES, BACKENDS, canonical_backend
from .remote.url import RemoteURL, RemoteURLError, parse_remote_url

log = logging.getLogger(__name__)

DEMOTE_MODES = ("lazy", "write_through")
LOAD_MODES = ("auto", "layerwise", "async")
COPY_BACKENDS = ("auto", "staged", "dma", "triton", "torch")
EVICTION_POLICIES = ("lru",)


class ConfigError(ValueError):
    """A configuration key is unknown, missing, or has a value outside its allowed set."""


#: Largest report delay of `DebugOptions`, in polls (a test holding loads "in flight" for good).
MAX_DELAY_POLLS = 1_000_000


@dataclass(frozen=True)
class DebugOptions:
    """Knobs for tests and diagnosis (config key `debug`, a dict of these); all off by default.

    record_pages: keep a copy of every page a store wrote and check that every load restores
        exactly those bytes (a device-to-host copy of every page moved: tests only).
    load_delay_polls: report each async load this many completion polls after it is done, as a
        slow copy would be (exercises waiting requests and aborts where copies are instant).
    store_delay_polls: report each store this many polls late (a store outliving its step).
    poll_stores: None: an engine whose idle loop keeps stepping for pending work (vLLM's
        multi-process engine core) polls its stores, one that stops stepping with its last
        request waits for them at the end of their step; True or False forces polled or waited.
    step_timing: time the steps that load on the device (CUDA events) and per phase on the host,
        readable in-process through the connector's diagnostics.
    """

    record_pages: bool = False
    load_delay_polls: int = 0
    store_delay_polls: int = 0
    poll_stores: bool | None = None
    step_timing: bool = False

    def __post_init__(self) -> None:
        for key in ("record_pages", "step_timing"):
            v = getattr(self, key)
            if not isinstance(v, bool):
                raise ConfigError(f"config key 'debug.{key}' must be true or false, got {v!r}")
        if self.poll_stores is not None and not isinstance(self.poll_stores, bool):
            raise ConfigError(
                f"config key 'debug.poll_stores' must be null, true or false, got {self.poll_stores!r}")
        for key in ("load_delay_polls", "store_delay_polls"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_DELAY_POLLS:
                raise ConfigError(
                    f"config key 'debug.{key}' must be an int from 0 to {MAX_DELAY_POLLS} (polls), got {v!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, raw: Any) -> DebugOptions:
        """Build from the `debug` value: a dict of the fields above, or null (everything off)."""
        if raw is None:
            return cls()
        if isinstance(raw, DebugOptions):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config key 'debug' must be a dict with keys {list(cls.keys())}, "
                              f"got {type(raw).__name__}")
        _check_known(raw, cls.keys(), "debug.")
        return cls(**dict(raw))


@dataclass(frozen=True)
class PrefixCacheConfig:
    """What the host tier is and how blocks move between it and the engine's KV cache.

    host_cache_gib: size of the pinned host pool in GiB (float > 0). Required.
    demote: "write_through" (default) copies every new full block once its KV has been written,
        so every block vLLM evicts later already has its host copy, at any load; "lazy" copies
        only the cached blocks next in line for eviction, which saves copies of blocks that never
        leave VRAM but falls behind when one step allocates more blocks than it looked ahead
        (requests admitted with long host hits allocate their whole prefix at once).
    load: "layerwise" loads inside the request's own step, each layer's attention waiting for
        that layer's copy, so the step (with every other request in it) waits for the copy;
        "async" lets the request wait while its blocks load and the other requests keep stepping;
        "auto" (default) loads layer-wise when no other request runs and async otherwise.
    index_backend: which PrefixIndex backend serves host-tier lookups: "cpu" keeps the
        scheduler's table in host memory (C probe loops), "triton" puts it on the engine's GPU,
        and "auto" (default) is "cpu": the scheduler asks about one request at a time, and behind
        `vllm serve` on an H200 the device table's launches and waits cost 1.5-2.8x the CPU
        table's scheduler time per request (docs/design.md, "The index"). "torch" is a
        deprecated alias of "cpu" (stored as "cpu", with one warning in the log).
    copy_backend: how pages move between the KV cache and the host pool: "staged" (one batched DMA
        descriptor per slot through a device staging buffer, the Triton kernel between that buffer
        and the pages), "dma" (one descriptor per page), "triton" (the gather/scatter kernel over
        pinned memory), "torch" (per-layer index ops over a device view of the pinned pool), or
        "auto": in an engine, "staged" where the driver offers batched DMA, else "torch"; a
        CopyEngine used on its own measures the available backends at start. Staged copies cross
        PCIe on the copy engines with one descriptor per slot; "triton" and "torch" copies are SM
        kernels that slow the forward they overlap.
    eviction: the host tier's eviction policy.
    layerwise_ahead: None (default): a layer-wise load's layer groups are all submitted before the
        step's forward starts; an int k >= 0: only the first k + 1 are, and the forward's wait for
        each layer submits the groups up to k past it (the forward then starts after one group's
        submission). Off by default: the later groups of a long load are then submitted only as
        the forward reaches them, so its copy waits for the forward.
    staging_mib: GPU memory of the "staged" copy backend's staging buffer, per direction (two
        buffers), outside the engine's KV budget. Each half of a buffer is one DMA step: 256 holds
        a layer group (1/8 of the layers) of a 512-block load of an 8B model in one step.
    report_timeout_s: seconds the engine waits for every worker (one per tensor parallel rank) to
        report a copy handed to them. A copy some worker never reports would leave its request
        waiting and its blocks held for good; past this the engine stops with an error naming the
        copy and the ranks that did not report it. Keep it far above the time of any copy.
    debug: tests and diagnosis only (`DebugOptions`, given as a dict): page checks, late reports,
        forced store polling, step timing. Everything off by default.
    remote: None (default, off) or a URL naming a shared store under the host tier and its
        settings, e.g. "mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:8080/metadata"
        (parameters: `remote.url.RemoteURL`). Checked here; reached when the store connects.
    """

    host_cache_gib: float
    demote: str = "write_through"
    load: str = "auto"
    index_backend: str = "auto"
    eviction: str = "lru"
    copy_backend: str = "auto"
    layerwise_ahead: int | None = None
    staging_mib: int = 256
    report_timeout_s: float = 120.0
    debug: DebugOptions = field(default_factory=DebugOptions)
    remote: str | None = None

    def __post_init__(self) -> None:
        _check_gib(self.host_cache_gib)
        _check_choice("demote", self.demote, DEMOTE_MODES)
        _check_choice("load", self.load, LOAD_MODES)
        _check_index_backend(self)
        _check_choice("eviction", self.eviction, EVICTION_POLICIES)
        _check_choice("copy_backend", self.copy_backend, COPY_BACKENDS)
        v = self.layerwise_ahead
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 64):
            raise ConfigError(f"config key 'layerwise_ahead' must be null or an int from 0 to 64, got {v!r}")
        v = self.staging_mib
        if not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= 16384:
            raise ConfigError(f"config key 'staging_mib' must be an int from 8 to 16384 (MiB), got {v!r}")
        v = self.report_timeout_s
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
            raise ConfigError(f"config key 'report_timeout_s' must be a number > 0 (seconds), got {v!r}")
        object.__setattr__(self, "debug", DebugOptions.from_dict(self.debug))
        if self.remote is not None:
            self.remote_url  # noqa: B018 (parses and checks it)

    @property
    def remote_url(self) -> RemoteURL | None:
        """The parsed `remote` URL, or None when the remote tier is off."""
        if self.remote is None:
            return None
        try:
            return parse_remote_url(self.remote)
        except RemoteURLError as e:
            raise ConfigError(str(e)) from None

    @property
    def host_cache_bytes(self) -> int:
        return int(self.host_cache_gib * (1 << 30))

    def check_fits_host(self) -> None:
        """Raise ConfigError if the host pool cannot fit this machine's memory: more than the
        memory limit of this process's cgroup (the kernel would kill the engine), or far more than
        the physical memory the kernel reports (a typo such as 16000 for 16). Some virtual machines
        report a small MemTotal that grows as memory is used: a pool between that and the bound
        only logs a warning (pinning that fails part way shrinks the pool, with a warning)."""
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            physical = None
        gib = 1 << 30
        if physical is not None and self.host_cache_bytes > TYPO_FACTOR * physical:
            raise ConfigError(
                f"config key 'host_cache_gib' = {self.host_cache_gib} is more than {TYPO_FACTOR}x this "
                f"machine's physical memory ({physical / gib:.1f} GiB); give the host pool a part of it")
        limit = cgroup_memory_limit()
        if limit is not None and self.host_cache_bytes > limit:
            raise ConfigError(
                f"config key 'host_cache_gib' = {self.host_cache_gib} is more than this process's memory "
                f"limit ({limit / gib:.1f} GiB, its cgroup's); give the host pool a part of it")
        if physical is None or self.host_cache_bytes <= physical:
            return
        log.warning("config key 'host_cache_gib' = %s is more than the physical memory this machine reports "
                    "now (%.1f GiB); going on (some virtual machines grow it on demand; a pool that cannot "
                    "be pinned whole shrinks, with a warning)", self.host_cache_gib, physical / gib)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> PrefixCacheConfig:
        """Build from a dict. Unknown keys, a missing `host_cache_gib` or bad values raise ConfigError."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"the prefix cache config must be a dict, got {type(raw).__name__}")
        _check_known(raw, cls.keys())
        if "host_cache_gib" not in raw:
            raise ConfigError(
                "config key 'host_cache_gib' is required: the host pool size in GiB (a number > 0)"
            )
        return cls(**dict(raw))

    @classmethod
    def validated(cls, raw: Mapping[str, Any] | None) -> PrefixCacheConfig:
        """What an engine starts with: `from_dict`, then `check_fits_host`. Cheap (no allocation, no
        device), so an adapter can call it wherever its engine first shows it the config."""
        cfg = cls.from_dict(raw)
        cfg.check_fits_host()
        return cfg


def _check_known(raw: Mapping[str, Any], allowed: tuple[str, ...], prefix: str = "") -> None:
    """ConfigError naming the first unknown key (and the allowed key it is closest to), on one line."""
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if not unknown:
        return
    names = [prefix + k for k in allowed]
    first = prefix + unknown[0]
    close = difflib.get_close_matches(first, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = f"unknown config key {first!r}" if len(unknown) == 1 else (
        f"unknown config keys {[prefix + k for k in unknown]}")
    raise ConfigError(f"{what}{hint}; allowed keys: {', '.join(names)}")


def _check_gib(value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(
            f"config key 'host_cache_gib' must be a number > 0 (GiB of host memory), got {value!r}"
        )


def _check_index_backend(cfg: PrefixCacheConfig) -> None:
    """Validate `index_backend` and store its canonical name (the frozen dataclass is set through
    object.__setattr__): the deprecated alias never reaches the code that builds the index."""
    try:
        name = canonical_backend(cfg.index_backend)
    except ValueError:
        aliases = ", ".join(f"{a!r}: a deprecated alias of {c!r}" for a, c in ALIASES.items())
        raise ConfigError(
            f"config key 'index_backend' must be one of {list(BACKENDS)} ({aliases}), "
            f"got {cfg.index_backend!r}"
        ) from None
    object.__setattr__(cfg, "index_backend", name)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"config key {key!r} must be one of {list(allowed)}, got {value!r}")


#: A pool this many times the physical memory the kernel reports is a typo (16000 for 16), never a
#: virtual machine that grows its memory on demand.
TYPO_FACTOR = 64


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (cgroup v2 `memory.max`, v1
    `memory.limit_in_bytes`), or None where there is none or it cannot be read."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            candidates = [f"/sys/fs/cgroup{path}/memory.max", "/sys/fs/cgroup/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        else:
            continue
        for name in candidates:
            try:
                with open(name) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text == "max":
                return None
            try:
                value = int(text)
            except ValueError:
                return None
            return value if value < (1 << 60) else None  # v1 writes "unlimited" as a huge number
    return None
