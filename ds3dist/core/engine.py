"""The engine boundary: what every engine offers (ServingEngine: one process's LocalEngine,
the Ray Engine, and the ReplicaSet of Ray engines) and the figures they report, as typed
plain data. The batch job's summary and the launch's closing lines read these by attribute;
`as_dict()` gives the summary file's JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

from ds3dist.core.request import Request
from ds3dist.core.scheduler import Scheduler, SchedulerStats


@dataclass
class ExpertLoad:
    """Token copies routed to each global expert, per MoE layer (summed over ranks)."""
    per_layer: dict[int, list[int]] = field(default_factory=dict)

    def add(self, layer: int, counts: Sequence[int]) -> None:
        row = self.per_layer.setdefault(int(layer), [0] * len(counts))
        self.per_layer[int(layer)] = [a + int(b) for a, b in zip(row, counts)]

    def merge(self, other: ExpertLoad) -> None:
        for layer, counts in other.per_layer.items():
            self.add(layer, counts)

    def as_dict(self) -> dict[str, list[int]]:
        return {str(k): list(v) for k, v in sorted(self.per_layer.items())}


@dataclass
class OffloadStats:
    """What a rank offloaded (execution.offload): bytes, the fetch window, units."""
    offloaded_bytes: int
    window_bytes: int
    units: int


@dataclass
class LoadInfo:
    """What loading a rank's model part took and left."""
    bytes_read: int
    load_seconds: float
    rss_bytes: int
    dtype: str  # the compute dtype, e.g. "torch.bfloat16"
    cuda_free_bytes: int | None  # free device memory after loading (GPU ranks)
    offload: OffloadStats | None = None


@dataclass
class RankStats:
    """One rank's figures (StageWorker.stats)."""
    rank: int
    stage: int
    ep_rank: int
    node_ip: str
    hostname: str
    pid: int
    load: LoadInfo
    net: dict[str, Any]  # rendezvous address and the socket interfaces set
    rss_bytes: int
    peak_rss_bytes: int
    busy_seconds: float
    steps: int
    dispatch: dict[int, dict[str, list[int]]]  # MoE layer -> sent/received per expert
    replica: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Flat, as the summary file records it (the load figures beside the others)."""
        d = asdict(self)
        load = d.pop("load")
        return {**load, **d}


@dataclass
class Restart:
    replica: int
    cause: str  # the failure, first line
    at_s: float  # seconds into the stream
    lost_s: float  # from the failure to a replacement ready to run
    rerun: int  # requests run again from their prompts


@dataclass
class ReplicaStats:
    replica: int
    requests: int = 0  # ended here (finished, rejected or failed on their own)
    completion_tokens: int = 0
    restarts: int = 0
    seconds: float = 0.0  # from the stream's start to this replica's end
    gave_up: str | None = None  # why it was not rebuilt again

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "completion_tokens_per_second":
                round(self.completion_tokens / self.seconds, 4) if self.seconds else None}


@dataclass
class RecoveryStats:
    restarts: list[Restart] = field(default_factory=list)

    @property
    def lost_seconds(self) -> float:
        return round(sum(r.lost_s for r in self.restarts), 3)

    def as_dict(self) -> dict[str, Any]:
        return {"restarts": len(self.restarts), "lost_seconds": self.lost_seconds,
                "events": [asdict(r) for r in self.restarts]}


@dataclass
class EngineStats:
    """An engine's figures: per rank, routed tokens per expert, busy seconds per pipeline
    stage (the busiest rank of each), the scheduler's counters; replicas and recovery for a
    ReplicaSet."""
    ranks: list[RankStats] = field(default_factory=list)
    expert_load: ExpertLoad = field(default_factory=ExpertLoad)
    stage_seconds: list[float] = field(default_factory=list)
    scheduler: SchedulerStats = field(default_factory=SchedulerStats)
    speculating: bool = False
    replicas: list[ReplicaStats] | None = None
    recovery: RecoveryStats | None = None

    @property
    def speculative(self) -> dict[str, Any] | None:
        """Acceptance per draft position and tokens per step (None: not speculating)."""
        return self.scheduler.speculative() if self.speculating else None


class ServingEngine(Protocol):
    """What the batch job and generate() drive: LocalEngine, Engine, ReplicaSet."""

    scheduler: Scheduler | None  # of the stream running now (the progress bar's counters)

    def stream(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Run requests to their end; yield each as it ends."""
        ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
