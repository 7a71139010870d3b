"""How an engine serves: the cache pool, the scheduler's limits and the control plane
(runtime.* keys), and speculative decoding (sampling.speculative). Plain data."""

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
    # torch threads per rank; None: RuntimeOptions.rank_threads ($DS3DIST_TORCH_THREADS, else
    # the CPUs a rank is given)
    threads: int | None = None
    # execution.cuda_graphs: decode steps as CUDA graphs where a rank can (ds3dist.rank.graphs)
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"runtime.control: must be one of {CONTROLS}, got {self.control!r}")

    def cache_bytes(self, free_device_bytes: int | None = None) -> float:
        """Bytes of paged cache per rank: cache_gb; else 90% of a GPU's free memory (given),
        else DEFAULT_CPU_CACHE_GB."""
        if self.cache_gb is not None:
            return self.cache_gb * 1e9
        if free_device_bytes is not None:
            return 0.9 * free_device_bytes
        return DEFAULT_CPU_CACHE_GB * 1e9


METHODS = ("mtp",)
MAX_DRAFTS = 3
DRAFT_HEADS = ("auto", "exact", "int8")  # ds3dist.model.draft_head


@dataclass(frozen=True)
class SpeculativeConfig:
    """sampling.speculative: {method: mtp, num_tokens: k, draft_head}; k drafts per request
    and step, chaining the one MTP module k times; the drafts' logits from the exact head or
    an int8 copy (auto: int8 where the CPU kernel runs it)."""
    method: str = "mtp"
    num_tokens: int = 1
    draft_head: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sampling.speculative.method: must be one of {METHODS}, "
                             f"got {self.method!r}")
        k = self.num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFTS:
            raise ValueError(f"sampling.speculative.num_tokens: must be an integer in "
                             f"1..{MAX_DRAFTS}, got {k!r}")
        if self.draft_head not in DRAFT_HEADS:
            raise ValueError(f"sampling.speculative.draft_head: must be one of {DRAFT_HEADS}, "
                             f"got {self.draft_head!r}")


def num_drafts(spec: SpeculativeConfig | None) -> int:
    """Drafts per request and step: 0 when speculation is off."""
    return spec.num_tokens if spec is not None else 0


TRANSFERS = ("checkpoint", "peers")


@dataclass(frozen=True)
class BalanceOptions:
    """parallel.eplb: the expert load window (steps) each rank keeps, and every how many
    steps the engine rebalances its experts from it (None: never); a rebalance places
    redundant_experts extra copies (parallel.redundant_experts) over nodes of ranks_per_node
    ranks (parallel.ranks_per_node; None: one node), as ds3dist.balance does."""
    step_interval: int | None = None
    window: int = 1000
    redundant_experts: int = 0
    ranks_per_node: int | None = None
    # how a rank gets the experts it gains: read from the checkpoint, or sent by a rank of
    # its stage that holds them ("peers", over the expert-parallel group)
    transfer: str = "checkpoint"

    def __post_init__(self) -> None:
        if self.transfer not in TRANSFERS:
            raise ValueError(f"parallel.eplb.transfer: must be one of {TRANSFERS}, got "
                             f"{self.transfer!r}")
        k = self.step_interval
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"parallel.eplb.step_interval: must be an integer >= 1 or null, "
                             f"got {k!r}")
        r = self.redundant_experts
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"parallel.redundant_experts: must be an integer >= 0, got {r!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"parallel.eplb.window: must be an integer >= 1, got "
                             f"{self.window!r}")
