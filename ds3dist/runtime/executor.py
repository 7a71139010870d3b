"""Running step plans on the StageWorker actors: compiled graph or classic actor calls.

`CompiledExecutor` (default) compiles one Ray graph of every rank's `step`: the plan goes in
once, stage s rank r hands its payload to stage s+1 rank r through a channel (shared memory
on one node; never through the driver), and the last stage's (sampled, failed) come back.
Up to pp plans are in flight, so every stage works. `ClassicExecutor` submits the same chain
as ordinary actor calls (pp x ep calls a step, payloads passed as object refs from actor to
actor); it is the fallback where compiled graphs are unavailable.

Both report a failure through `on_failure(what, cause, calls)`, which the engine turns into
an EngineError naming every rank's part.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import ray
from ray.dag import InputNode, MultiOutputNode

from ds3dist.parallel.layout import ParallelLayout
from ds3dist.serving.plan import StepPlan, StepResult

OnFailure = Callable[..., BaseException]


def merge(step_id: int, outs: list) -> StepResult:
    """The last stage's (sampled, failed) of every column -> one StepResult."""
    res = StepResult(step_id)
    for sampled, failed in outs:
        res.sampled.update(sampled)
        res.failed.update(failed)
    return res


class ClassicExecutor:
    def __init__(self, actors: list, layout: ParallelLayout, on_failure: OnFailure):
        self.actors, self.layout, self.on_failure = actors, layout, on_failure
        self.max_in_flight = layout.pp
        self._pending: deque[tuple[int, list, dict]] = deque()

    def submit(self, plan: StepPlan) -> None:
        lay = self.layout
        plan_ref = ray.put(plan)
        last, calls = [], {}
        for r in range(lay.ep):
            ref = None
            for s in range(lay.pp):
                rank = lay.rank_of(s, r)
                ref = self.actors[rank].step.remote(plan_ref, ref)
                calls[ref] = (rank, f"step {plan.step_id}")
            last.append(ref)
        self._pending.append((plan.step_id, last, calls))

    def result(self, timeout_s: float | None = None) -> StepResult:
        step_id, last, calls = self._pending.popleft()
        ready, _ = ray.wait(last, num_returns=len(last), timeout=timeout_s)
        if len(ready) < len(last):
            raise self.on_failure(f"step {step_id} did not finish within {timeout_s:.0f} s",
                                  None, self._calls(calls))
        try:
            outs = ray.get(last)
        except Exception as e:  # a rank raised or died
            raise self.on_failure(f"step {step_id} failed", e, self._calls(calls)) from e
        return merge(step_id, outs)

    def _calls(self, first: dict) -> dict:
        out = dict(first)
        for _, _, calls in self._pending:
            out.update(calls)
        return out

    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._pending.clear()


class CompiledExecutor:
    def __init__(self, actors: list, layout: ParallelLayout, on_failure: OnFailure):
        self.layout, self.on_failure = layout, on_failure
        self.actors = actors
        self.max_in_flight = layout.pp
        with InputNode() as plan:
            last = []
            for r in range(layout.ep):
                node = actors[layout.rank_of(0, r)].step.bind(plan)
                for s in range(1, layout.pp):
                    node = actors[layout.rank_of(s, r)].step.bind(plan, node)
                last.append(node)
            dag = MultiOutputNode(last)
        self.dag = dag.experimental_compile(_max_inflight_executions=layout.pp)
        self._pending: deque[tuple[int, object]] = deque()

    def submit(self, plan: StepPlan) -> None:
        self._pending.append((plan.step_id, self.dag.execute(plan)))

    def result(self, timeout_s: float | None = None) -> StepResult:
        step_id, ref = self._pending.popleft()
        t0 = time.monotonic()
        try:
            outs = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayChannelTimeoutError:
            self.close()
            raise self.on_failure(f"step {step_id} did not finish within "
                                  f"{time.monotonic() - t0:.0f} s", None, {}) from None
        except Exception as e:  # a rank raised or died
            self.close()
            raise self.on_failure(f"step {step_id} failed", e, {}) from e
        return merge(step_id, outs)

    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._pending.clear()
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception:  # already torn down by a failure
                pass
            self.dag = None
