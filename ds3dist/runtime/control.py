"""Running step plans on the StageWorker actors: compiled graph or classic actor calls.

`CompiledExecutor` (the default on GPU) compiles one Ray graph of every rank's `step`: the
plan goes in once, stage s rank r hands its payload to stage s+1 rank r through a channel
(shared memory on one node; never through the driver), and the last stage's results
come back. `ClassicExecutor` (the default on CPU, where a compiled-graph actor keeps
a core spinning) submits the same chain as ordinary actor calls: pp x ep calls a step, the
plan inlined in each, payloads passed as object refs from actor to actor.

Up to pp plans are in flight, so every stage works; with one stage two, the second's decode
tokens filled in on the rank (the scheduler's `overlap`), so the rank never waits for the
driver.

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
from ds3dist.core.plan import StepPlan, StepResult

OnFailure = Callable[..., BaseException]


def cause_text(e: BaseException) -> str:
    """The exception raised on a rank, type and message whole (Ray's wrapper removed)."""
    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    if isinstance(e, ray.exceptions.RayActorError):
        return "died (its actor is gone)"
    return f"{type(e).__name__}: {e}".rstrip()


def plans_in_flight(pp: int) -> tuple[bool, int]:
    """(overlap, plans in flight): one plan per stage; with one stage, a second plan that
    decodes ahead of its tokens (the rank that samples them also embeds them)."""
    return pp == 1, pp + (pp == 1)


def columns_of(layout: ParallelLayout) -> list[list[int]]:
    """The ranks of each expert-parallel column, stage by stage: what a plan passes through."""
    return [[layout.rank_of(s, r) for s in range(layout.pp)] for r in range(layout.ep)]


def merge(step_id: int, outs: list[StepResult]) -> StepResult:
    """The last stage's StepResult of every column -> one."""
    res = StepResult(step_id)
    for out in outs:
        res.merge(out)
    return res


class ClassicExecutor:
    """Each plan as actor calls, stage after stage down each column (columns_of)."""

    def __init__(self, actors: list, columns: list[list[int]], on_failure: OnFailure):
        self.actors, self.columns, self.on_failure = actors, columns, on_failure
        self.overlap, self.max_in_flight = plans_in_flight(len(columns[0]))
        self._pending: deque[tuple[int, list, dict]] = deque()

    def submit(self, plan: StepPlan) -> None:
        last, calls = [], {}
        for column in self.columns:
            ref = None
            for rank in column:
                ref = self.actors[rank].step.remote(plan, ref)  # small: inlined in the call
                calls[ref] = (rank, f"step {plan.step_id}")
            last.append(ref)
        self._pending.append((plan.step_id, last, calls))

    def result(self, timeout_s: float | None = None) -> StepResult:
        step_id, last, calls = self._pending.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        outs, left = {}, list(last)
        while left:  # column by column as they finish: the first error fails the step at once
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, left = ray.wait(left, num_returns=1, timeout=wait)
            if not ready:
                raise self.on_failure(f"step {step_id} did not finish within {timeout_s:.0f} s",
                                      None, calls=self._calls(calls))
            try:
                outs[ready[0]] = ray.get(ready[0])
            except Exception as e:  # a rank raised or died
                raise self.on_failure(f"step {step_id} failed", e,
                                      calls=self._calls(calls)) from e
        return merge(step_id, [outs[ref] for ref in last])

    def _calls(self, first: dict) -> dict:
        out = dict(first)
        for _, _, calls in self._pending:
            out.update(calls)
        return out

    def close(self) -> None:
        self._pending.clear()


class Napper:
    """Ray's compiled-graph reads spin a CPU core while they wait (Ray 2.60). On a machine with
    few cores that core is taken from the ranks, so the driver first sleeps `share` of a lower
    bound on the wait and spins only for the rest. The bound is the longest recent wait of a
    step with no more tokens than this one (a smaller step never takes longer, give or take
    noise); none: no nap. A wait is measured only when the read had to spin; a read that finds
    its result already there means the nap was too long, and the history is halved."""

    SPUN_S = 2e-4  # a read that returns faster than this found its result waiting

    def __init__(self, share: float = 0.8, history: int = 16):
        self.share = share
        self.waits: deque[tuple[int, float]] = deque(maxlen=history)  # (tokens, seconds)
        self.begin = time.monotonic()

    def nap(self, tokens: int, deadline: float | None) -> float:
        """Sleep until the result is probably near; returns when the read starts."""
        bound = max((w for t, w in self.waits if t <= tokens), default=0.0)
        until = self.begin + self.share * bound
        if deadline is not None:
            until = min(until, deadline)
        time.sleep(max(0.0, until - time.monotonic()))
        return time.monotonic()

    def observe(self, tokens: int, read_start: float) -> None:
        now = time.monotonic()
        if now - read_start > self.SPUN_S:
            self.waits.append((tokens, now - self.begin))
        elif read_start > self.begin + 1e-3:  # it napped, and too long
            self.waits = deque(((t, 0.5 * w) for t, w in self.waits), maxlen=self.waits.maxlen)
        self.begin = now


class CompiledExecutor:
    """The columns (columns_of) as one Ray compiled graph, plans in flight through it."""

    def __init__(self, actors: list, columns: list[list[int]], on_failure: OnFailure):
        self.actors, self.on_failure = actors, on_failure
        self.napper = Napper()
        self.overlap, self.max_in_flight = plans_in_flight(len(columns[0]))
        with InputNode() as plan:
            last = []
            for first, *rest in columns:
                node = actors[first].step.bind(plan)
                for rank in rest:
                    node = actors[rank].step.bind(plan, node)
                last.append(node)
            dag = MultiOutputNode(last)
        self.dag = dag.experimental_compile(_max_inflight_executions=self.max_in_flight)
        self._pending: deque[tuple[int, int, list]] = deque()  # step id, tokens, refs

    def submit(self, plan: StepPlan) -> None:
        if not self._pending:  # the wait for its result begins now
            self.napper.begin = time.monotonic()
        self._pending.append((plan.step_id, plan.num_tokens, self.dag.execute(plan)))

    def result(self, timeout_s: float | None = None) -> StepResult:
        step_id, tokens, refs = self._pending.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        read_start = self.napper.nap(tokens, deadline)
        outs, errors = [], {}
        for r, ref in enumerate(refs):  # one column at a time: each output is read once
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                outs.append(ray.get(ref, timeout=1.0 if errors else left))
            except Exception as e:  # a rank raised or died, or no result in time
                errors[r] = e
        self.napper.observe(tokens, read_start)
        if errors:
            timed_out = all(isinstance(e, ray.exceptions.RayChannelTimeoutError)
                            for e in errors.values())
            what = f"step {step_id} " + ("did not finish in time" if timed_out else "failed")
            cause = next((e for e in errors.values()
                          if not isinstance(e, ray.exceptions.RayChannelTimeoutError)), None)
            raise self.on_failure(what, cause, reports=self._reports(step_id, errors))
        return merge(step_id, outs)

    def _reports(self, step_id: int, errors: dict[int, BaseException]) -> dict[int, str]:
        """rank -> its part, from the columns' outputs (a compiled graph's actors answer
        nothing else while it lives): the error a rank raised, or a dead actor. The ranks'
        published progress (ds3dist.runtime.progress) says who else is behind."""
        out: dict[int, str] = {}
        for e in errors.values():
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            if isinstance(e, ray.exceptions.RayActorError):
                out[self._rank_of_actor(e)] = "died (its actor is gone)"
            elif getattr(cause, "rank", None) is not None:
                out[cause.rank] = cause_text(e)
        return out

    def _rank_of_actor(self, e: BaseException) -> int:
        dead = getattr(e, "actor_id", None)
        return next((rank for rank, a in enumerate(self.actors)
                     if dead is not None and a._actor_id.hex() == dead), -1)

    def close(self) -> None:
        """Release the graph (after a failure the engine kills the actors first, so a
        stopped rank cannot hold the teardown up)."""
        self._pending.clear()
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception:  # already torn down by a failure
                pass
            self.dag = None
