"""What a batch job reports besides its records: its summary (JobSummary, written as JSON)
and the expert-load heatmap.

`engine_stats` asks the engine for its figures within a bound; `plot_expert_load` draws the
routed-token counts as a heatmap; `write_summary` writes the job's summary atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ds3dist.core.engine import EngineStats
from ds3dist.jobs.records import write_atomic
from ds3dist.runtime.cluster import call_within

log = logging.getLogger(__name__)


@dataclass
class Counts:
    lines: int  # non-blank input lines
    valid: int
    errors: int  # malformed lines
    failed: int  # requests the engine rejected or that failed on their own
    already_done: int  # in the output before this run
    generated: int
    not_run: int  # left for a rerun (a stop, or a failure)
    output_records: int
    finish_reason: dict[str, int]
    drained: int = 0  # of generated and failed: ended after a stop was asked for (the drain)


@dataclass
class Throughput:
    generate_seconds: float
    wall_seconds: float
    sequences_per_second: float | None
    completion_tokens_per_second: float | None
    total_tokens_per_second: float | None


@dataclass
class JobSummary:
    """What a run of a batch job did; `as_dict()` is the summary file's JSON."""
    input: str
    output: str
    errors_file: str
    plot: str | None
    format: str
    input_encoding: str
    counts: Counts
    prompt_tokens: int
    completion_tokens: int
    throughput: Throughput
    engine: EngineStats
    stopped: str | None = None  # the signal that stopped the run
    error: str | None = None  # why the run failed
    meta: dict[str, Any] | None = None
    summary: str | None = None  # where it was written

    def as_dict(self) -> dict[str, Any]:
        e = self.engine
        return {
            "input": self.input, "output": self.output, "errors_file": self.errors_file,
            "plot": self.plot, "format": self.format, "input_encoding": self.input_encoding,
            "counts": asdict(self.counts),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "total": self.prompt_tokens + self.completion_tokens},
            "throughput": asdict(self.throughput),
            "scheduler": asdict(e.scheduler), "speculative": e.speculative,
            "replicas": None if e.replicas is None else [r.as_dict() for r in e.replicas],
            "recovery": None if e.recovery is None else e.recovery.as_dict(),
            "stage_seconds": list(e.stage_seconds), "expert_load": e.expert_load.as_dict(),
            "rebalances": [asdict(r) for r in e.rebalances],
            "ranks": [r.as_dict() for r in e.ranks], "stopped": self.stopped,
            **({"error": self.error} if self.error is not None else {}),
            **({"meta": self.meta} if self.meta is not None else {}),
        }


def engine_stats(engine: Any, timeout_s: float | None = None) -> EngineStats:
    """engine.stats(), or empty figures when it fails or does not answer within timeout_s
    (logged; a run that failed asks with a bound: its cluster may be gone)."""
    if timeout_s is not None:
        return call_within(engine.stats, timeout_s, "engine.stats()", None) or EngineStats()
    try:
        return engine.stats()
    except Exception as e:  # stats are a report, not the job
        log.warning("engine.stats() failed: %s", e)
        return EngineStats()


def plot_expert_load(expert_load: dict[Any, Sequence[float]], path: Path,
                     title: str = "expert load", mtp_layers: Sequence[int] = ()) -> Path | None:
    """Heatmap (MoE layers x global experts) of tokens routed; None when there is no data."""
    rows = sorted(((int(k), list(v)) for k, v in expert_load.items() if len(v)),
                  key=lambda kv: kv[0])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(v) for _, v in rows)
    grid = np.zeros((len(rows), width))
    for r, (_, v) in enumerate(rows):
        grid[r, : len(v)] = v
    fig_w = min(4 + width / 12, 24)
    fig_h = min(2 + len(rows) / 4, 18)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert (global id)")
    ax.set_ylabel("layer")
    step = max(1, len(rows) // 20)
    ax.set_yticks(range(0, len(rows), step))
    mtp = {int(x) for x in mtp_layers}
    ax.set_yticklabels([f"{rows[i][0]} (MTP)" if rows[i][0] in mtp else str(rows[i][0])
                        for i in range(0, len(rows), step)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="tokens routed")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as e:  # the plot is a report: the job's records are already safe
        log.warning("job.plot: cannot write %s: %s; no plot", path, e.strerror)
        return None
    finally:
        plt.close(fig)
    return path


def write_summary(path: Path, summary: JobSummary) -> None:
    write_atomic(path, json.dumps(summary.as_dict(), indent=2, ensure_ascii=False) + "\n",
                 "job.summary")
