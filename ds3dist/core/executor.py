"""The executor protocol: what the serving loop (ds3dist.core.loop) drives, not knowing which.

An executor takes plans with `submit(plan)` (up to `max_in_flight` at once) and hands back
their results in submission order with `result(timeout_s)`. `ds3dist.local.LocalExecutor`
runs the whole model in this process; the Ray engine's executors run the pipeline stages x
expert-parallel ranks (ds3dist.runtime.control). Both have each rank run its column's share
of a plan with ds3dist.rank.column.run_column.
"""

from __future__ import annotations

from typing import Protocol

from ds3dist.core.plan import StepPlan, StepResult


class Executor(Protocol):
    max_in_flight: int
    overlap: bool  # plans may decode ahead of their tokens (SchedulerConfig.overlap)

    def submit(self, plan: StepPlan) -> None: ...

    def result(self, timeout_s: float | None = None) -> StepResult: ...
