"""The typed schema of the launch configuration, and its resolution into project objects.

The dataclasses below are registered with Hydra's ConfigStore as `ds3dist_schema`, the first
entry of `conf/config.yaml`'s defaults list, so a key that does not exist (`parallel.epp=2`) or
a value of the wrong type (`parallel.ep=two`) fails while the config is composed, with an error
naming the key. Values that are well-typed but impossible (`parallel.ep=3` with 256 experts,
`sampling.top_p=2`) are caught by `validate(cfg)`, which plans the layout against the model
config (the preset, or the `config.json` in `model.path`), builds every options object the
launch hands on, once (`Resolved`), and raises `LaunchConfigError` naming each field at fault.
Defaults are those of the options classes (ServingOptions, RuntimeOptions, OffloadOptions,
SpeculativeConfig, the job's DEFAULT_SAMPLING): written there once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ds3dist.config import PRESETS, ConfigError, ModelConfig, cache_root, preset
from ds3dist.core.options import BalanceOptions, ServingOptions, SpeculativeConfig
from ds3dist.core.params import Sampling, SamplingError
from ds3dist.jobs.requests import DEFAULT_SAMPLING
from ds3dist.parallel.placement import Placement
from ds3dist.parallel.layout import LayoutError, ParallelLayout, RankPlan
from ds3dist.plan.cluster import ClusterSpec, WorkloadSpec
from ds3dist.runtime.options import OffloadOptions, RuntimeOptions, deepspeed_missing

SCHEMA_NAME = "ds3dist_schema"
DTYPES = ("float32", "bfloat16", "float16")


class LaunchConfigError(ValueError):
    """A launch setting is impossible; the message starts with the setting's full key."""


# ---- schema ------------------------------------------------------------------------------
_OFF, _SPEC, _SAMPLE = OffloadOptions(), SpeculativeConfig(), DEFAULT_SAMPLING
_RUN, _SERVE, _BAL = RuntimeOptions(), ServingOptions(), BalanceOptions()
_CLUSTER, _WORK = ClusterSpec(), WorkloadSpec()


@dataclass
class ModelConf:
    preset: Optional[str] = "tiny"  # tiny | small | deepseek_v3 (null: model.path required)
    path: Optional[str] = None  # checkpoint dir; null: synthesize `preset` into the cache
    seed: int = 0  # weights seed when synthesizing into the cache
    verify: bool = False  # before starting: stream every shard (checksums, NaN/Inf, scales)


@dataclass
class EplbConf:
    step_interval: Optional[int] = _BAL.step_interval  # rebalance every N steps (null: off)
    window: int = _BAL.window  # steps of expert load each rank keeps (the rebalance's input)
    transfer: str = _BAL.transfer  # checkpoint | peers: how a rank gets the experts it gains


@dataclass
class ParallelConf:
    pp: int = 1
    ep: int = 1
    stage_boundaries: Optional[List[int]] = None
    expert_map: Optional[List[int]] = None
    device: str = "cpu"  # cpu | cuda
    backend: Optional[str] = None  # gloo | nccl (null: by device)
    # expert load balancing (ds3dist.balance, ds3dist.parallel.placement)
    placement: Optional[str] = None  # placement file: each rank's experts per MoE layer
    redundant_experts: int = _BAL.redundant_experts  # copies beyond one per expert (balancer)
    ranks_per_node: Optional[int] = _BAL.ranks_per_node  # the balancer's nodes (null: one)
    eplb: EplbConf = field(default_factory=EplbConf)


class ExecutionMode(Enum):
    fp8 = "fp8"
    bf16 = "bf16"




@dataclass
class OffloadConf:
    backend: Optional[str] = None  # deepspeed: ZeRO-Inference weight offload; null: off
    device: str = _OFF.device  # cpu (host memory) | nvme (files under nvme_path)
    nvme_path: Optional[str] = _OFF.nvme_path
    params: str = _OFF.params  # layers (every decoder layer) | experts (routed experts only)
    prefetch_layers: int = _OFF.prefetch_layers  # units fetched ahead of the one computing
    pin_memory: bool = _OFF.pin_memory  # page-locked host buffers (GPU only)


@dataclass
class ExecutionConf:
    mode: ExecutionMode = ExecutionMode.bf16
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 (null: model.options.default_dtype)
    offload: OffloadConf = field(default_factory=OffloadConf)
    cuda_graphs: bool = _SERVE.cuda_graphs  # decode steps as CUDA graphs on GPU (false: eager)


@dataclass
class SpeculativeConf:
    method: Optional[str] = None  # mtp: draft with the MTP layer; null: off
    num_tokens: int = _SPEC.num_tokens  # drafts per request and step (1..3)
    draft_head: str = _SPEC.draft_head  # the drafts' logits: auto | exact | int8 (int8 head copy)


@dataclass
class SamplingConf:
    max_new_tokens: int = _SAMPLE.max_new_tokens
    temperature: float = _SAMPLE.params.temperature  # 0: greedy
    top_p: float = _SAMPLE.params.top_p
    top_k: int = _SAMPLE.params.top_k  # 0: off
    seed: int = _SAMPLE.params.seed
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
    address: Optional[str] = _RUN.address  # Ray address; null: $RAY_ADDRESS, else a new cluster
    num_cpus: Optional[int] = _RUN.num_cpus  # logical CPUs of a new local cluster
    connect_timeout_s: float = _RUN.connect_timeout_s  # reaching an existing Ray cluster
    cpus_per_rank: Optional[int] = _RUN.cpus_per_rank  # CPUs (= torch threads); null: by layout
    rendezvous_port: Optional[int] = _RUN.rendezvous_port  # on rank 0 (null: a free port)
    collective_timeout_s: float = _RUN.collective_timeout_s
    startup_timeout_s: float = _RUN.startup_timeout_s  # placement, groups, weight loading
    control: str = _SERVE.control  # auto (compiled on GPU, classic on CPU) | compiled | classic | local
    cache_gb: Optional[float] = _SERVE.cache_gb  # cache per rank (null: 4 on CPU, 90% free GPU)
    page_size: int = _SERVE.page_size  # tokens per cache page
    max_tokens_per_step: int = _SERVE.max_tokens_per_step  # per expert-parallel column
    max_seqs: int = _SERVE.max_seqs  # running requests per expert-parallel column
    prefill_chunk: Optional[int] = _SERVE.prefill_chunk  # tokens a request takes a step (null: half)
    replicas: int = _RUN.replicas  # independent engines (pp x ep ranks each), one input
    max_restarts: int = _RUN.max_restarts  # rebuilds of a replica after a lost rank or hung step
    drain_timeout_s: float = _RUN.drain_timeout_s  # after SIGTERM/SIGINT: requests may finish


@dataclass
class ClusterConf:
    """What the planner sizes layouts for (python -m ds3dist.plan, the dry run); the launch
    itself ignores it."""
    gpu: str = _CLUSTER.gpu  # h100 | h200 | h800 | a100 | b200 | mi300x | cpu (this machine)
    gpus_per_node: int = _CLUSTER.gpus_per_node  # devices (CPU: ranks) per node
    nodes: int = _CLUSTER.nodes
    # overrides of the accelerator's figures: memory_gb, hbm_tbps, bf16_tflops, fp8_tflops,
    # intra_gbps, inter_gbps, host_gbps
    figures: Dict[str, float] = field(default_factory=lambda: dict(_CLUSTER.figures))


@dataclass
class WorkloadConf:
    """The planner's workload (mean lengths); the launch ignores it."""
    prompt_tokens: Optional[float] = _WORK.prompt_tokens  # null: the input's mean, else the planner's default
    output_tokens: Optional[float] = _WORK.output_tokens  # null: the input's, else max_new_tokens
    input: Optional[str] = _WORK.input  # JSONL to read the lengths from (null: job.input)


@dataclass
class LaunchConf:
    model: ModelConf = field(default_factory=ModelConf)
    parallel: ParallelConf = field(default_factory=ParallelConf)
    execution: ExecutionConf = field(default_factory=ExecutionConf)
    sampling: SamplingConf = field(default_factory=SamplingConf)
    job: JobConf = field(default_factory=JobConf)
    runtime: RuntimeConf = field(default_factory=RuntimeConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)  # the planner's (launch: unused)
    workload: WorkloadConf = field(default_factory=WorkloadConf)  # the planner's (launch: unused)


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
            placement=None if get("placement") is None else Placement.load(get("placement")),
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


def _offload(cfg: Any, problems: list[str]) -> OffloadOptions | None:
    """execution.offload as OffloadOptions, or None when off (backend null)."""
    get = _section(cfg, "execution.offload")
    if get("backend") is None:
        return None
    opt = OffloadOptions(backend=str(get("backend")), device=str(get("device")),
                         nvme_path=None if get("nvme_path") is None else str(get("nvme_path")),
                         params=str(get("params")), prefetch_layers=int(get("prefetch_layers")),
                         pin_memory=bool(get("pin_memory")))
    problems += opt.problems()
    if _get(cfg, "runtime.control") == "local":
        problems.append("execution.offload: runtime.control=local runs the model without "
                        "process groups; offload needs the Ray engine (control auto, compiled "
                        "or classic)")
    missing = deepspeed_missing() if opt.backend == "deepspeed" else None
    if missing:
        problems.append(f"execution.offload.backend: {missing}")
    return opt


def _sampling(cfg: Any, problems: list[str]) -> Sampling:
    get = _section(cfg, "sampling")
    stop = get("stop")
    values = {k: get(k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    values["stop"] = None if stop is None else [str(x) for x in stop]
    try:
        return DEFAULT_SAMPLING.overridden(values)
    except SamplingError as e:
        problems.append(f"sampling.{e}")
        return DEFAULT_SAMPLING


def _speculative(cfg: Any, problems: list[str]) -> SpeculativeConfig | None:
    get = _section(cfg, "sampling.speculative")
    if get("method") is None:
        return None
    try:
        return SpeculativeConfig(str(get("method")), get("num_tokens"), str(get("draft_head")))
    except ValueError as e:  # its message names the key
        problems.append(str(e))
        return None


def _serving(cfg: Any, problems: list[str]) -> ServingOptions:
    get = _section(cfg, "runtime")
    keys = [f.name for f in fields(ServingOptions) if f.name not in ("threads", "cuda_graphs")]
    try:
        return ServingOptions(**{k: get(k) for k in keys},
                              cuda_graphs=bool(_get(cfg, "execution.cuda_graphs")))
    except ValueError as e:  # its message names the key
        problems.append(str(e))
        return ServingOptions()


def _balance(cfg: Any, problems: list[str]) -> BalanceOptions:
    get = _section(cfg, "parallel.eplb")
    try:
        out = BalanceOptions(get("step_interval"), get("window"),
                             _get(cfg, "parallel.redundant_experts"),
                             _get(cfg, "parallel.ranks_per_node"), get("transfer"))
    except ValueError as e:  # its message names the key
        problems.append(str(e))
        return BalanceOptions()
    ep, rpn = _get(cfg, "parallel.ep"), out.ranks_per_node
    if rpn is not None and (rpn < 1 or (rpn < ep and ep % rpn)):
        problems.append(f"parallel.ranks_per_node: {rpn} must divide parallel.ep={ep} (or be "
                        f"at least it: one node)")
    if out.step_interval is not None and _get(cfg, "execution.offload.backend") is not None:
        problems.append("parallel.eplb.step_interval: rebalancing moves experts that weight "
                        "offload holds; turn one of them off (execution.offload.backend=null)")
    if out.step_interval is not None and ep == 1:
        problems.append("parallel.eplb.step_interval: rebalancing moves experts between "
                        "expert-parallel ranks; it needs parallel.ep > 1")
    return out


def _runtime(cfg: Any) -> RuntimeOptions:
    get = _section(cfg, "runtime")
    return RuntimeOptions(**{f.name: get(f.name) for f in fields(RuntimeOptions)})


@dataclass(frozen=True)
class Resolved:
    """The launch config, checked and turned once into what the launch hands on."""
    model: ModelConfig
    layout: ParallelLayout
    plans: list[RankPlan]
    execution: str  # fp8 | bf16
    dtype: str | None  # float32 | bfloat16 | float16; None: by device (model.options)
    serving: ServingOptions
    runtime: RuntimeOptions
    speculative: SpeculativeConfig | None
    offload: OffloadOptions | None
    balance: BalanceOptions  # parallel.eplb
    sampling: Sampling  # the job's defaults; each line may override them
    job: JobConf
    source: ModelConf  # where the checkpoint is (or which preset to synthesize)


# (key, lowest, highest, lowest excluded) of the numeric settings that have bounds
_RANGES = (
    ("job.max_prompt_tokens", 1, None, False),
    ("runtime.collective_timeout_s", 0, None, True),
    ("runtime.connect_timeout_s", 0, None, True),
    ("runtime.startup_timeout_s", 0, None, True),
    ("runtime.rendezvous_port", 1, 65535, False),
    ("runtime.num_cpus", 1, None, False),
    ("runtime.max_restarts", 0, None, False),
    ("runtime.drain_timeout_s", 0, None, False),
    *((f"runtime.{key}", 1, None, False) for key in (
        "cpus_per_rank", "page_size", "max_tokens_per_step", "max_seqs", "prefill_chunk",
        "replicas")),
    ("runtime.cache_gb", 0, None, True),
)


def _check_control(cfg: Any, problems: list[str]) -> None:
    """runtime.control=local: one copy of the whole model in the launch's process."""
    if _get(cfg, "runtime.control") != "local":
        return
    if (_get(cfg, "parallel.pp"), _get(cfg, "parallel.ep")) != (1, 1):
        problems.append(f"runtime.control: local runs the whole model in the launch's process; "
                        f"it needs parallel.pp=1 and parallel.ep=1, got pp="
                        f"{_get(cfg, 'parallel.pp')} ep={_get(cfg, 'parallel.ep')}")
    if _get(cfg, "runtime.replicas") != 1:
        problems.append(f"runtime.replicas: runtime.control=local runs one copy of the model in "
                        f"the launch's process; got replicas={_get(cfg, 'runtime.replicas')}")


def validate(cfg: Any) -> Resolved:
    """Check every setting that the schema's types cannot, plan the layout for the model and
    build the options. Raises LaunchConfigError naming every key at fault."""
    problems: list[str] = []
    for key, lo, hi, lo_open in _RANGES:
        _check_range(problems, key, _get(cfg, key), lo, hi, lo_open)
    sampling = _sampling(cfg, problems)
    speculative = _speculative(cfg, problems)
    serving = _serving(cfg, problems)
    _check_control(cfg, problems)
    dtype = _get(cfg, "execution.dtype")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"execution.dtype: must be one of {list(DTYPES)} or null, got {dtype!r}")
    offload = _offload(cfg, problems)
    balance = _balance(cfg, problems)
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
    job = _section(cfg, "job")
    model = _section(cfg, "model")
    return Resolved(
        model=mcfg, layout=layout, plans=plans,
        execution=str(_enum_value(_get(cfg, "execution.mode"))), dtype=dtype,
        serving=serving, runtime=_runtime(cfg), speculative=speculative, offload=offload,
        sampling=sampling, balance=balance,
        job=JobConf(**{f.name: _enum_value(job(f.name)) if f.name != "format"
                       else str(_enum_value(job(f.name))) for f in fields(JobConf)}),
        source=ModelConf(**{f.name: model(f.name) for f in fields(ModelConf)}))
