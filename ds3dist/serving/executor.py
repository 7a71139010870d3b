"""Executors run step plans; the serving loop (ds3dist.serving.loop) does not know which.

An executor takes plans with `submit(plan)` (up to `max_in_flight` at once) and hands back
their results in submission order with `result(timeout_s)`. `LocalExecutor` runs the whole
model in this process (what `ds3dist.generate` uses); the Ray engine's executor runs the
pipeline stages x expert-parallel ranks (ds3dist.runtime.executor).

`run_column` is what every rank does with its column's share of a plan: drop freed requests,
leave out requests that fail on their own, embed (first stage), run the held layers, sample
(last stage).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

from ds3dist.serving.plan import SeqStep, StepPlan, StepResult
from ds3dist.serving.runner import StepRunner
from ds3dist.serving.speculative import SpeculativeConfig


class Executor(Protocol):
    max_in_flight: int
    overlap: bool  # plans may decode ahead of their tokens (SchedulerConfig.overlap)

    def submit(self, plan: StepPlan) -> None: ...

    def result(self, timeout_s: float | None = None) -> StepResult: ...

    def in_flight(self) -> int: ...


def run_column(runner: StepRunner, plan: StepPlan, seqs: list[SeqStep], first: bool, last: bool,
               payload: tuple[dict[str, str], torch.Tensor] | None = None):
    """One rank's part of a step. payload: (requests failed so far -> reason, hidden states)
    from the previous stage. Returns the next stage's payload, or on the last stage the
    column's StepResult."""
    if first:
        failed, h_td = runner.failing(seqs), None
    else:
        failed, h_td = payload
    seqs = [s for s in seqs if s.req_id not in failed]
    tb = runner.begin(plan.freed, seqs)
    h_td = runner.layers(seqs, tb, h_td)
    if not last:
        return failed, h_td
    res = runner.sample(plan.step_id, seqs, tb, h_td)
    res.failed.update(failed)
    return res


class LocalExecutor:
    """The whole model in this process, one column: plans run as they are submitted."""

    max_in_flight, overlap = 1, False

    def __init__(self, model, num_pages: int, page_size: int,
                 speculative: SpeculativeConfig | None = None):
        self.runner = StepRunner(model, num_pages, page_size, speculative)
        self._done: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        if len(plan.columns) != 1:
            raise ValueError(f"one process runs one column, the plan has {len(plan.columns)}")
        self._done.append(run_column(self.runner, plan, plan.columns[0], True, True))

    def result(self, timeout_s: float | None = None) -> StepResult:
        return self._done.popleft()

    def in_flight(self) -> int:
        return len(self._done)
