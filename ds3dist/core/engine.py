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


EXPERT_LOAD_FORMAT = "ds3dist.expert_load/1"


@dataclass
class ExpertLoad:
    """Token copies routed to each logical expert, per MoE layer (summed over ranks): over
    the whole run and over the ranks' windows of about the last `window_steps` steps."""
    per_layer: dict[int, list[int]] = field(default_factory=dict)
    window: dict[int, list[int]] = field(default_factory=dict)
    window_steps: int = 0
    layout: dict[str, Any] = field(default_factory=dict)  # pp, ep, placement it ran with

    def add(self, layer: int, counts: Sequence[int], window: Sequence[int] | None = None
            ) -> None:
        _add(self.per_layer, layer, counts)
        if window is not None:
            _add(self.window, layer, window)

    def merge(self, other: ExpertLoad) -> None:
        for layer, counts in other.per_layer.items():
            self.add(layer, counts, other.window.get(layer))
        self.window_steps = max(self.window_steps, other.window_steps)
        self.layout = self.layout or other.layout

    def as_dict(self) -> dict[str, list[int]]:
        return {str(k): list(v) for k, v in sorted(self.per_layer.items())}

    def file(self) -> dict[str, Any]:
        """The `<output>.expert_load.json` record, which `ds3dist.balance` reads."""
        n = len(next(iter(self.per_layer.values()), []))
        return {"format": EXPERT_LOAD_FORMAT, "n_routed_experts": n,
                "total": self.as_dict(),
                "window": {str(k): list(v) for k, v in sorted(self.window.items())},
                "window_steps": self.window_steps, "layout": self.layout}


def _add(rows: dict[int, list[int]], layer: int, counts: Sequence[int]) -> None:
    row = rows.setdefault(int(layer), [0] * len(counts))
    rows[int(layer)] = [a + int(b) for a, b in zip(row, counts)]


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
    window_load: dict[int, list[int]] = field(default_factory=dict)  # received, last window
    window_steps: int = 0
    held_experts: dict[int, list[int]] = field(default_factory=dict)  # per MoE layer

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
class Rebalance:
    """One rebalance of the experts during a job (parallel.eplb): at which step, how long
    the engine paused, the window's predicted max/mean rank load (summed over layers) under
    the old and the new placement, the steps the window covered, what the ranks read from
    the checkpoint or received from each other (transfer), the slowest rank's move."""
    step: int
    pause_s: float
    before: float
    after: float
    window_steps: int
    experts_read: int
    bytes_read: int
    experts_received: int
    transfer: str
    move_s: float


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
    rebalances: list[Rebalance] = field(default_factory=list)

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
