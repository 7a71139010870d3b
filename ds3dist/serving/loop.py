"""The one generation loop, shared by one process and the Ray engine: requests in, ended
requests out, as they end.

Requests are pulled from an iterable as the scheduler has room (a stream: no batch
boundaries), up to `max_in_flight` plans are kept in the executor (one per pipeline stage),
and each result is applied to the scheduler, which reports the requests that ended: finished,
rejected at admission, or failed on their own.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from ds3dist.serving.executor import Executor
from ds3dist.serving.plan import StepPlan
from ds3dist.serving.request import Request
from ds3dist.serving.scheduler import Scheduler


def serve(scheduler: Scheduler, executor: Executor, requests: Iterable[Request],
          lookahead: int | None = None, timeout_s: float | None = None) -> Iterator[Request]:
    """Run every request to its end; yield each once it has ended.

    lookahead: requests held waiting at most (default: two steps' worth of sequences)."""
    cfg = scheduler.cfg
    lookahead = lookahead or 2 * cfg.max_seqs * cfg.columns
    source = iter(requests)
    exhausted = False
    pending: deque[StepPlan] = deque()
    while True:
        while not exhausted and len(scheduler.waiting) < lookahead:
            req = next(source, None)
            if req is None:
                exhausted = True
            else:
                scheduler.add(req)
        yield from scheduler.pop_ended()
        while len(pending) < executor.max_in_flight:
            plan = scheduler.schedule()
            if plan is None:
                break
            executor.submit(plan)
            pending.append(plan)
        if not pending:
            if exhausted and not scheduler.has_work:
                return
            if scheduler.has_work:
                raise RuntimeError("the scheduler holds requests but scheduled no step")
            continue
        result = executor.result(timeout_s)
        yield from scheduler.update(pending.popleft(), result)
