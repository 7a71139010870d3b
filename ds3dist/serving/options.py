"""How an engine serves: cache pool and scheduler limits (the launch's runtime.* keys)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CPU_CACHE_GB = 4.0  # runtime.cache_gb when null on CPU
CONTROLS = ("auto", "compiled", "classic", "local")  # local: one process, no Ray (launch only)


@dataclass(frozen=True)
class ServingOptions:
    """How the engine serves: the cache pool and the scheduler's limits (runtime.* keys)."""
    cache_gb: float | None = None  # per rank; None: 4 GB on CPU, 90% of free memory on GPU
    page_size: int = 64
    max_tokens_per_step: int = 2048  # per expert-parallel column
    max_seqs: int = 64  # running sequences per column
    prefill_chunk: int | None = None
    # auto: compiled on GPU, classic on CPU (Ray 2.60's compiled-graph actors spin a core each,
    # which on a CPU layout costs the ranks more than the cheaper calls save); compiled (Ray
    # compiled graph) | classic (actor calls) | local (launch only)
    control: str = "auto"
    # torch threads per rank; None: $DS3DIST_TORCH_THREADS, else the CPUs a rank was given
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"runtime.control: must be one of {CONTROLS}, got {self.control!r}")
