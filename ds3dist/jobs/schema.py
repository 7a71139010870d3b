"""The typed schema of the launch configuration, and its resolution into project objects.

The dataclasses below are registered with Hydra's ConfigStore as `ds3dist_schema`, the first
entry of `conf/config.yaml`'s defaults list, so a key that does not exist (`parallel.epp=2`) or
a value of the wrong type (`parallel.ep=two`) fails while the config is composed, with an error
naming the key. Values that are well-typed but impossible for the model (`parallel.ep=3` with
256 experts) are caught by `validate(cfg)`, which plans the layout against the model config
(the preset, or the `config.json` in `model.path`) and raises `LaunchConfigError` naming the
field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from ds3dist.config import PRESETS, ConfigError, ModelConfig, cache_root, preset
from ds3dist.jobs.memory_plan import Holding
from ds3dist.model.options import default_dtype
from ds3dist.parallel.layout import LayoutError, ParallelLayout, RankPlan
from ds3dist.runtime.offload import OffloadOptions, deepspeed_missing
from ds3dist.core.options import CONTROLS, ServingOptions
from ds3dist.core.options import (DRAFT_HEADS, MAX_DRAFTS, METHODS, SpeculativeConfig,
                                         num_drafts)

SCHEMA_NAME = "ds3dist_schema"
DTYPES = ("float32", "bfloat16", "float16")


class LaunchConfigError(ValueError):
    """A launch setting is impossible; the message starts with the setting's full key."""


# ---- schema ------------------------------------------------------------------------------
@dataclass
class ModelConf:
    preset: Optional[str] = "tiny"  # tiny | small | deepseek_v3 (null: model.path required)
    path: Optional[str] = None  # checkpoint dir; null: synthesize `preset` into the cache
    seed: int = 0  # weights seed when synthesizing into the cache
    verify: bool = False  # before starting: stream every shard (checksums, NaN/Inf, scales)


@dataclass
class ParallelConf:
    pp: int = 1
    ep: int = 1
    stage_boundaries: Optional[List[int]] = None
    expert_map: Optional[List[int]] = None
    device: str = "cpu"  # cpu | cuda
    backend: Optional[str] = None  # gloo | nccl (null: by device)


class ExecutionMode(Enum):
    fp8 = "fp8"
    bf16 = "bf16"


@dataclass
class OffloadConf:
    backend: Optional[str] = None  # deepspeed: ZeRO-Inference weight offload; null: off
    device: str = "cpu"  # cpu (host memory) | nvme (files under nvme_path)
    nvme_path: Optional[str] = None
    params: str = "layers"  # layers (every decoder layer) | experts (routed experts only)
    prefetch_layers: int = 1  # offloaded units fetched ahead of the one computing
    pin_memory: bool = True  # page-locked host buffers (GPU only)


@dataclass
class ExecutionConf:
    mode: ExecutionMode = ExecutionMode.bf16
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 (null: model.options.default_dtype)
    offload: OffloadConf = field(default_factory=OffloadConf)


@dataclass
class SpeculativeConf:
    method: Optional[str] = None  # mtp: draft with the MTP layer; null: off
    num_tokens: int = 1  # drafts per request and step (1..3)
    draft_head: str = "auto"  # the drafts' logits: auto | exact | int8 (an int8 copy of the head)


@dataclass
class SamplingConf:
    max_new_tokens: int = 64
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    seed: int = 0
    stop: Optional[List[str]] = None
    speculative: SpeculativeConf = field(default_factory=SpeculativeConf)


class JobFormat(Enum):
    auto = "auto"
    native = "native"
    openai = "openai"


@dataclass
class JobConf:
    input: Optional[str] = None
    output: Optional[str] = None
    errors: Optional[str] = None
    summary: Optional[str] = None
    plot: Optional[str] = None
    max_prompt_tokens: Optional[int] = None
    format: JobFormat = JobFormat.auto
    progress: bool = True
    dry_run: bool = False


@dataclass
class RuntimeConf:
    address: Optional[str] = None  # Ray address; null: $RAY_ADDRESS, else a new local cluster
    num_cpus: Optional[int] = None  # logical CPUs of a new local cluster
    connect_timeout_s: float = 30.0  # reaching an existing Ray cluster
    cpus_per_rank: Optional[int] = None  # CPUs (= torch threads) per rank; null: by layout
    rendezvous_port: Optional[int] = None  # torch.distributed port on rank 0 (null: free)
    collective_timeout_s: float = 120.0
    startup_timeout_s: float = 600.0  # placement, process groups and weight loading
    control: str = "auto"  # auto (compiled on GPU, classic on CPU) | compiled | classic | local
    cache_gb: Optional[float] = None  # paged cache per rank (null: 4 on CPU, 90% free on GPU)
    page_size: int = 64  # tokens per cache page
    max_tokens_per_step: int = 2048  # token budget of one step, per expert-parallel column
    max_seqs: int = 64  # running requests per expert-parallel column
    prefill_chunk: Optional[int] = None  # tokens one request may take per step (null: half)
    replicas: int = 1  # independent engines (pp x ep ranks each) fed from the one input
    max_restarts: int = 3  # rebuilds of each replica after a lost rank, node or hung step
    drain_timeout_s: float = 20.0  # after SIGTERM/SIGINT: how long requests in flight may finish


@dataclass
class LaunchConf:
    model: ModelConf = field(default_factory=ModelConf)
    parallel: ParallelConf = field(default_factory=ParallelConf)
    execution: ExecutionConf = field(default_factory=ExecutionConf)
    sampling: SamplingConf = field(default_factory=SamplingConf)
    job: JobConf = field(default_factory=JobConf)
    runtime: RuntimeConf = field(default_factory=RuntimeConf)


def register() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=LaunchConf)


register()


# ---- resolution --------------------------------------------------------------------------
def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _section(cfg: Any, dotted: str) -> Callable[[str], Any]:
    """A getter of the keys of one section (`get("pp")` for `parallel.pp`)."""
    node = _get(cfg, dotted)
    if isinstance(node, dict):
        return lambda key: node[key]
    return lambda key: getattr(node, key)


def _enum_value(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def cached_checkpoint_dir(preset_name: str, seed: int = 0) -> Path:
    return cache_root() / f"{preset_name}-seed{seed}"


def model_config(cfg: Any) -> ModelConfig:
    """The model's ModelConfig: `model.path`'s config.json when it exists, else the preset."""
    path = _get(cfg, "model.path")
    name = _get(cfg, "model.preset")
    if name is not None and name not in PRESETS:
        raise LaunchConfigError(
            f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        )
    if path is not None:
        p = Path(str(path)).expanduser()
        if (p / "config.json").is_file():
            try:
                return ModelConfig.from_json(p)
            except ConfigError as e:
                raise LaunchConfigError(f"model.path: {e}") from None
        if name is None:
            raise LaunchConfigError(f"model.path: no config.json in {p}")
    if name is None:
        raise LaunchConfigError("model.path: needed when model.preset is null")
    return preset(name)


def parallel_layout(cfg: Any) -> ParallelLayout:
    get = _section(cfg, "parallel")
    try:
        return ParallelLayout(
            pp=get("pp"),
            ep=get("ep"),
            stage_boundaries=None if get("stage_boundaries") is None
            else [int(x) for x in get("stage_boundaries")],
            expert_map=None if get("expert_map") is None else [int(x) for x in get("expert_map")],
            device=get("device"),
            backend=get("backend"),
        )
    except LayoutError as e:
        raise LaunchConfigError(str(e)) from None


def _check_range(problems: list[str], key: str, v: Any, lo: float | None, hi: float | None,
                 lo_open: bool = False) -> None:
    if v is None:
        return
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        problems.append(f"{key}: must be {' and '.join(s for s in (lo_s, hi_s) if s)}, got {v!r}")


def _offload_problems(cfg: Any) -> list[str]:
    opt = offload_options(cfg)
    if opt is None:
        return []
    problems = opt.problems()
    if _get(cfg, "runtime.control") == "local":
        problems.append("execution.offload: runtime.control=local runs the model without "
                        "process groups; offload needs the Ray engine (control auto, compiled "
                        "or classic)")
    missing = deepspeed_missing() if opt.backend == "deepspeed" else None
    if missing:
        problems.append(f"execution.offload.backend: {missing}")
    return problems


def offload_options(cfg: Any) -> OffloadOptions | None:
    """execution.offload as OffloadOptions, or None when off (backend null)."""
    get = _section(cfg, "execution.offload")
    if get("backend") is None:
        return None
    return OffloadOptions(backend=str(get("backend")), device=str(get("device")),
                          nvme_path=None if get("nvme_path") is None else str(get("nvme_path")),
                          params=str(get("params")), prefetch_layers=int(get("prefetch_layers")),
                          pin_memory=bool(get("pin_memory")))


@dataclass
class Resolved:
    model: ModelConfig
    layout: ParallelLayout
    plans: list[RankPlan]


def validate(cfg: Any) -> Resolved:
    """Check every setting that the schema's types cannot; plan the layout for the model.

    Raises LaunchConfigError whose message names the key(s) at fault.
    """
    problems: list[str] = []
    _check_range(problems, "sampling.max_new_tokens", _get(cfg, "sampling.max_new_tokens"), 1, None)
    _check_range(problems, "sampling.temperature", _get(cfg, "sampling.temperature"), 0, None)
    _check_range(problems, "sampling.top_p", _get(cfg, "sampling.top_p"), 0, 1, lo_open=True)
    _check_range(problems, "sampling.top_k", _get(cfg, "sampling.top_k"), 0, None)
    if _get(cfg, "sampling.speculative.method") not in (None, *METHODS):
        problems.append(f"sampling.speculative.method: must be null (off) or one of {METHODS}, "
                        f"got {_get(cfg, 'sampling.speculative.method')!r}")
    _check_range(problems, "sampling.speculative.num_tokens",
                 _get(cfg, "sampling.speculative.num_tokens"), 1, MAX_DRAFTS)
    if _get(cfg, "sampling.speculative.draft_head") not in DRAFT_HEADS:
        problems.append(f"sampling.speculative.draft_head: must be one of {DRAFT_HEADS}, "
                        f"got {_get(cfg, 'sampling.speculative.draft_head')!r}")
    _check_range(problems, "job.max_prompt_tokens", _get(cfg, "job.max_prompt_tokens"), 1, None)
    _check_range(problems, "runtime.collective_timeout_s",
                 _get(cfg, "runtime.collective_timeout_s"), 0, None, lo_open=True)
    _check_range(problems, "runtime.connect_timeout_s",
                 _get(cfg, "runtime.connect_timeout_s"), 0, None, lo_open=True)
    _check_range(problems, "runtime.startup_timeout_s",
                 _get(cfg, "runtime.startup_timeout_s"), 0, None, lo_open=True)
    _check_range(problems, "runtime.rendezvous_port", _get(cfg, "runtime.rendezvous_port"), 1, 65535)
    _check_range(problems, "runtime.num_cpus", _get(cfg, "runtime.num_cpus"), 1, None)
    _check_range(problems, "runtime.max_restarts", _get(cfg, "runtime.max_restarts"), 0, None)
    _check_range(problems, "runtime.drain_timeout_s", _get(cfg, "runtime.drain_timeout_s"), 0,
                 None)
    for key in ("cpus_per_rank", "page_size", "max_tokens_per_step", "max_seqs",
                "prefill_chunk", "replicas"):
        _check_range(problems, f"runtime.{key}", _get(cfg, f"runtime.{key}"), 1, None)
    _check_range(problems, "runtime.cache_gb", _get(cfg, "runtime.cache_gb"), 0, None,
                 lo_open=True)
    control = _get(cfg, "runtime.control")
    if control not in CONTROLS:
        problems.append(f"runtime.control: must be one of {list(CONTROLS)}, got {control!r}")
    elif control == "local" and (_get(cfg, "parallel.pp"), _get(cfg, "parallel.ep")) != (1, 1):
        problems.append(f"runtime.control: local runs the whole model in the launch's process; "
                        f"it needs parallel.pp=1 and parallel.ep=1, got pp="
                        f"{_get(cfg, 'parallel.pp')} ep={_get(cfg, 'parallel.ep')}")
    if control == "local" and _get(cfg, "runtime.replicas") != 1:
        problems.append(f"runtime.replicas: runtime.control=local runs one copy of the model in "
                        f"the launch's process; got replicas={_get(cfg, 'runtime.replicas')}")
    dtype = _get(cfg, "execution.dtype")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"execution.dtype: must be one of {list(DTYPES)} or null, got {dtype!r}")
    problems += _offload_problems(cfg)
    if problems:
        raise LaunchConfigError("\n".join(problems))

    mcfg = model_config(cfg)
    layout = parallel_layout(cfg)
    try:
        plans = layout.plan(mcfg)
    except LayoutError as e:
        raise LaunchConfigError(str(e)) from None
    mpt = _get(cfg, "job.max_prompt_tokens")
    if mpt is not None and mpt > mcfg.max_position_embeddings:
        raise LaunchConfigError(
            f"job.max_prompt_tokens: {mpt} exceeds the model's max_position_embeddings "
            f"({mcfg.max_position_embeddings})"
        )
    return Resolved(model=mcfg, layout=layout, plans=plans)


def sampling_defaults(cfg: Any) -> dict[str, Any]:
    get = _section(cfg, "sampling")
    stop = get("stop")
    return {
        "max_new_tokens": int(get("max_new_tokens")),
        "temperature": float(get("temperature")),
        "top_p": float(get("top_p")),
        "top_k": int(get("top_k")),
        "seed": int(get("seed")),
        "stop": None if stop is None else [str(x) for x in stop],
    }


def execution_mode(cfg: Any) -> str:
    return str(_enum_value(_get(cfg, "execution.mode")))


def job_format(cfg: Any) -> str:
    return str(_enum_value(_get(cfg, "job.format")))


def runtime_options(cfg: Any, world_size: int) -> dict[str, Any]:
    """Keyword arguments of the Engine taken from `runtime.*`."""
    get = _section(cfg, "runtime")
    return {
        "ray_address": get("address"),
        "num_cpus": get("num_cpus"),
        "connect_timeout_s": float(get("connect_timeout_s")),
        "cpus_per_rank": get("cpus_per_rank") or default_cpus_per_rank(get("address"), world_size),
        "rendezvous_port": get("rendezvous_port"),
        "collective_timeout_s": float(get("collective_timeout_s")),
        "startup_timeout_s": float(get("startup_timeout_s")),
        "serving": ServingOptions(
            cache_gb=get("cache_gb"), page_size=int(get("page_size")),
            max_tokens_per_step=int(get("max_tokens_per_step")), max_seqs=int(get("max_seqs")),
            prefill_chunk=get("prefill_chunk"), control=str(get("control"))),
        "speculative": speculative(cfg),
        "offload": offload_options(cfg),
    }


def holding(cfg: Any, layout: ParallelLayout) -> Holding:
    """How the ranks will hold weights (the dry run's memory plan)."""
    dtype = _get(cfg, "execution.dtype")
    cache_gb = _get(cfg, "runtime.cache_gb")
    return Holding(execution=execution_mode(cfg),
                   dtype=getattr(torch, dtype) if dtype else default_dtype(layout.device),
                   mtp_passes=num_drafts(speculative(cfg)), offload=offload_options(cfg),
                   cache_bytes=None if cache_gb is None else float(cache_gb) * 1e9)


def speculative(cfg: Any) -> SpeculativeConfig | None:
    """sampling.speculative as a SpeculativeConfig, or None when off."""
    method = _get(cfg, "sampling.speculative.method")
    if method is None:
        return None
    return SpeculativeConfig(str(method), int(_get(cfg, "sampling.speculative.num_tokens")),
                             str(_get(cfg, "sampling.speculative.draft_head")))


def default_cpus_per_rank(address: str | None, world_size: int) -> int:
    """A new local cluster shares this machine's cores between its ranks; on an existing
    cluster each rank gets one CPU unless runtime.cpus_per_rank says more."""
    if address or os.environ.get("RAY_ADDRESS"):
        return 1
    return max(1, (os.cpu_count() or 1) // world_size)
