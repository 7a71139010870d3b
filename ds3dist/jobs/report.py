"""What a batch job reports besides its records: the summary JSON and the expert-load heatmap.

`engine_stats` asks the engine for its optional `stats()` (stage timings, tokens routed per
expert, per-rank figures); `plot_expert_load` draws the routed-token counts as a heatmap;
`write_summary` writes the job's summary atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ds3dist.jobs.records import write_atomic
from ds3dist.runtime.cluster import call_within

log = logging.getLogger(__name__)


def engine_stats(engine: Any, timeout_s: float | None = None) -> dict:
    """engine.stats(), or {} when the engine has none, it fails or it does not answer within
    timeout_s (logged; a run that failed asks with a bound: its cluster may be gone)."""
    fn = getattr(engine, "stats", None)
    if fn is None:
        return {}
    if timeout_s is not None:
        return call_within(fn, timeout_s, "engine.stats()", {}) or {}
    try:
        s = fn() or {}
    except Exception as e:  # stats are a report, not the job
        log.warning("engine.stats() failed: %s", e)
        return {}
    return s


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


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n", "job.summary")
