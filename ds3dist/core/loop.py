"""The one generation loop, shared by one process and the Ray engine: requests in, ended
requests out, as they end.

Requests are pulled from an iterable as the scheduler has room (a stream: no batch
boundaries), up to `max_in_flight` plans are kept in the executor (one per pipeline stage),
and each result is applied to the scheduler, which reports the requests that ended: finished,
rejected at admission, or failed on their own. The new tokens of each request then go
through its stop strings, if it has any (text is checked here, at the edge of the core: the
scheduler knows token ids only).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from ds3dist.core.executor import Executor
from ds3dist.core.plan import StepPlan
from ds3dist.core.request import Request
from ds3dist.core.scheduler import Scheduler


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
        ended = scheduler.update(pending.popleft(), executor.result(timeout_s))
        _check_stop_strings(scheduler)
        yield from ended + scheduler.pop_ended()


def _check_stop_strings(scheduler: Scheduler) -> None:
    """Each request's new tokens through its stop strings (ds3dist.text.StopStrings: only
    the new text is searched); one that completed a stop string ends after that token."""
    for req, n in scheduler.appended:
        if req.stop_text is not None:
            first = len(req.output_ids) - n
            k = req.stop_text.feed(req.output_ids[first:])
            if k is not None:
                scheduler.stop_after(req, first + k)
