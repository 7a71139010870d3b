"""What a model instance is built with: config, execution mode, compute dtype, held experts."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ds3dist.config import ModelConfig

EXECUTIONS = ("bf16", "fp8")
ATTN_FORMS = ("auto", "absorbed", "naive")  # see ds3dist.model.mla
DEFAULT_ATTN_FORM = "auto"


@dataclass(frozen=True)
class BuildOptions:
    """cfg; execution 'bf16' (weights dequantized once) or 'fp8' (FP8 weights, fp8_linear);
    dtype the compute dtype; expert_ids the routed experts held (every MoE layer alike), or
    layer_experts per MoE layer ((layer id, experts) pairs: a placement)."""

    cfg: ModelConfig
    execution: str = "bf16"
    dtype: torch.dtype = torch.bfloat16
    expert_ids: tuple[int, ...] | None = None  # None: all
    attn_form: str = DEFAULT_ATTN_FORM
    layer_experts: tuple[tuple[int, tuple[int, ...]], ...] | None = None

    def __post_init__(self) -> None:
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.attn_form not in ATTN_FORMS:
            raise ValueError(f"attn_form must be one of {ATTN_FORMS}, got {self.attn_form!r}")

    @property
    def fp8(self) -> bool:
        return self.execution == "fp8"

    def experts(self, layer_id: int) -> tuple[int, ...]:
        """The routed experts held in MoE layer layer_id."""
        if self.layer_experts is not None:
            return dict(self.layer_experts)[layer_id]
        if self.expert_ids is None:
            return tuple(range(self.cfg.n_routed_experts))
        return self.expert_ids


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype when none is set: bfloat16. On a CPU without native bf16 arithmetic
    (no AVX512-BF16 or AMX) the CPU kernels widen bf16 weights in registers and matmul times
    its paths per weight shape; only where the kernels are switched off or their build failed
    is it float32 there (bf16 weights upcast exactly, twice the memory: torch's bf16 matmuls
    run 3-4x below float32's speed per weight on such CPUs)."""
    if torch.device(device).type != "cpu" or native_bf16():
        return torch.bfloat16
    from ds3dist.model import cpu_kernel  # imports this module

    return torch.bfloat16 if cpu_kernel.usable() else torch.float32


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX; not known, not Linux: yes)
    that torch's oneDNN may use (ONEDNN_MAX_CPU_ISA can hold it below them)."""
    flags = cpu_flags()
    has = not flags or "avx512_bf16" in flags or "amx_bf16" in flags
    return has and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo: x86's "flags", ARM's "Features" (empty
    where there is none)."""
    try:
        with open(cpuinfo) as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())
