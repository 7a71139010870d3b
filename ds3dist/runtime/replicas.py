"""Replicas and recovery: N engines fed from one request stream, each rebuilt when it fails.

A replica is one Engine (its own placement group of pp x ep ranks). When a rank's process, its
actor or its node is lost, or a step passes its timeout (a hung collective), the replica's
`stream` raises an EngineError, and the engine has already released its actors and placement
group. The replica is then built again (`make_engine(replica, attempt)`: replacement resources
waited for within a bound, new actors that load their shards and form their process groups)
and the requests it held run again from their prompts (`Request.fresh`: the same id, so seeded
draws repeat). A request leaves a replica only once it has ended, so no finished line is
computed or handed on twice. Each replica may be rebuilt `max_restarts` times; one past that
gives its requests back to the others, and when none is left the stream fails naming what
never came back.

Each replica runs its serving loop in a thread of its own (the loop blocks on its ranks) and
pulls requests from the one stream as its scheduler has room, so a faster replica takes more.
Ended requests come back on one queue, read by the caller's thread, which stays free to
handle signals. `should_stop()` true: no more requests are handed out and a lost replica is
not rebuilt; the replicas finish what they hold.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

from ds3dist.core.engine import EngineStats, RecoveryStats, ReplicaStats, Restart
from ds3dist.runtime import cluster
from ds3dist.runtime.engine import EngineError
from ds3dist.core.request import Request, RequestStatus
from ds3dist.core.scheduler import SchedulerStats

log = logging.getLogger(__name__)

MakeEngine = Callable[[int, int], Any]  # (replica, attempt: 0 first start) -> Engine
POLL_S = 0.5  # the caller's thread wakes this often to let signal handlers run


class _GaveUp(Exception):
    """A replica past its restart budget (or whose replacement never came)."""


class _Feed:
    """The one request stream, shared by the replicas' threads: requests given back by a
    replica that gave up go first. `wait_for_work` parks a replica whose stream ended until
    work is given back (True) or every replica is idle (False)."""

    def __init__(self, requests: Iterable[Request], replicas: int,
                 should_stop: Callable[[], bool]):
        self._source = iter(requests)
        self._returned: deque[Request] = deque()
        self._cond = threading.Condition()
        self.active = replicas
        self.exhausted = False
        self.should_stop = should_stop

    def take(self) -> Request | None:
        with self._cond:
            if self.should_stop():
                return None
            if self._returned:
                return self._returned.popleft()
            if self.exhausted:
                return None
            req = next(self._source, None)
            self.exhausted = req is None
            return req

    def give_back(self, reqs: list[Request]) -> None:
        with self._cond:
            self._returned.extend(reqs)
            self.active -= 1
            self._cond.notify_all()

    def stranded(self) -> int:
        with self._cond:
            return len(self._returned)

    def wait_for_work(self) -> bool:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()
            while not self._returned and self.active > 0 and not self.should_stop():
                self._cond.wait(POLL_S)
            if self._returned and not self.should_stop():
                self.active += 1
                return True
            return False


class ReplicaSet:
    """N engines behind the engine interface the batch job uses (`stream`, `stats`,
    `scheduler`, `shutdown`): ended requests in the order they end, whichever replica ran
    them. make_engine(replica, attempt) builds one (attempt 0: the first start)."""

    def __init__(self, make_engine: MakeEngine, replicas: int = 1, max_restarts: int = 3,
                 should_stop: Callable[[], bool] = lambda: False):
        if replicas < 1:
            raise ValueError(f"runtime.replicas: must be >= 1, got {replicas}")
        if max_restarts < 0:
            raise ValueError(f"runtime.max_restarts: must be >= 0, got {max_restarts}")
        self.make_engine, self.max_restarts, self.should_stop = make_engine, max_restarts, should_stop
        self.engines: list[Any] = [make_engine(0, 0)]  # the first joins or starts the cluster
        try:
            with ThreadPoolExecutor(max(1, replicas - 1)) as pool:
                futures = [pool.submit(make_engine, i, 0) for i in range(1, replicas)]
                for f in futures:
                    self.engines.append(f.result())
        except BaseException:
            self.shutdown()
            raise
        self.figures = [ReplicaStats(i) for i in range(replicas)]
        self.recovery = RecoveryStats()
        self._lost_stats = [SchedulerStats() for _ in range(replicas)]  # of replaced engines
        self._held: list[dict[str, Request]] = [{} for _ in range(replicas)]
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    @property
    def scheduler(self):
        """Replica 0's scheduler (the progress bar's figures)."""
        return self.engines[0].scheduler

    # ---- the stream ---------------------------------------------------------------------
    def stream(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Run every request to its end on some replica; yield each once it has ended."""
        n = len(self.engines)
        feed = _Feed(requests, n, self.should_stop)
        out: queue.Queue = queue.Queue()
        self._t0 = time.monotonic()
        for i in range(n):
            threading.Thread(target=self._replica, args=(i, feed, out), daemon=True,
                             name=f"replica-{i}").start()
        running = n
        while running:
            try:
                kind, i, item = out.get(timeout=POLL_S)
            except queue.Empty:
                if self.should_stop() and not cluster.alive():
                    log.warning("stopping, and the Ray cluster is gone: the requests in flight "
                                "are left to the next run")
                    return
                continue
            if kind == "ended":
                yield item
            elif kind == "error":
                raise item
            else:
                running -= 1
        if feed.stranded():
            lost = "; ".join(f"replica {f.replica}: {f.gave_up}" for f in self.figures if f.gave_up)
            raise EngineError(f"{feed.stranded()} requests could not run: no replica is left "
                              f"({lost})")

    def _replica(self, i: int, feed: _Feed, out: queue.Queue) -> None:
        """Replica i's thread: serve until the feed is dry, rebuilding the engine on failure."""
        try:
            while True:
                self._serve(i, feed, out)
                if not feed.wait_for_work():
                    return
        except _GaveUp as e:
            self.figures[i].gave_up = str(e)
            log.error("replica %d: %s; its %d requests go to the other replicas", i, e,
                      len(self._held[i]))
            feed.give_back(list(self._held[i].values()))
            self._held[i].clear()
        except BaseException as e:  # a bug, or a cause no rebuild mends: the job ends
            out.put(("error", i, e))
        finally:
            self.figures[i].seconds = time.monotonic() - self._t0
            out.put(("done", i, None))

    def _serve(self, i: int, feed: _Feed, out: queue.Queue) -> None:
        held, rerun = self._held[i], []
        while True:
            try:
                for ended in self.engines[i].stream(self._pull(held, rerun, feed)):
                    held.pop(ended.id, None)
                    self._count(i, ended)
                    out.put(("ended", i, ended))
                return
            except EngineError as e:
                rerun = list(held.values())  # held until they end here or are given back
                if self.should_stop():  # stopping: what it held runs in the next job run
                    log.warning("replica %d failed while stopping: %s", i, _one_line(e))
                    return
                self._rebuild(i, e, len(rerun))

    @staticmethod
    def _pull(held: dict[str, Request], rerun: list[Request], feed: _Feed) -> Iterator[Request]:
        """The replica's requests: those to run again, then the feed's; the engine gets a
        fresh copy, the submitted request is kept until it ends."""
        for req in rerun:
            held[req.id] = req
            yield req.fresh()
        while (req := feed.take()) is not None:
            held[req.id] = req
            yield req.fresh()

    def _count(self, i: int, ended: Request) -> None:
        f = self.figures[i]
        f.requests += 1
        if ended.status is RequestStatus.FINISHED:
            f.completion_tokens += len(ended.output_ids)

    def _rebuild(self, i: int, error: BaseException, rerun: int) -> None:
        """A new engine for replica i, within its restart budget; raises _GaveUp past it."""
        t_fail, cause = time.monotonic(), _one_line(error)
        old = self.engines[i].scheduler
        if old is not None:
            self._lost_stats[i].add(old.stats)
        while True:
            f = self.figures[i]
            if f.restarts >= self.max_restarts:
                raise _GaveUp(f"failed after {f.restarts} restarts "
                              f"(runtime.max_restarts={self.max_restarts}): {cause}")
            if self.should_stop():
                raise _GaveUp(f"not rebuilt while stopping: {cause}")
            f.restarts += 1
            log.warning("replica %d lost: %s; restart %d of at most %d, %d requests to run "
                        "again from their prompts", i, cause, f.restarts, self.max_restarts, rerun)
            try:
                self.engines[i] = self.make_engine(i, f.restarts)
                break
            except Exception as e:  # no replacement resources in time, or start-up failed
                cause = f"{cause}; then the restart failed: {_one_line(e)}"
        with self._lock:
            self.recovery.restarts.append(Restart(i, cause, round(t_fail - self._t0, 3),
                                                  round(time.monotonic() - t_fail, 3), rerun))

    # ---- figures and shutdown -------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The engines' figures combined (ranks tagged with their replica; routed tokens
        summed; busy seconds per stage, the most of any replica), the replicas' own and the
        restarts. Figures of replaced engines' ranks are gone with them; their scheduler
        counters are kept."""
        per = [_stats_of(e) for e in self.engines] if cluster.alive() else []
        out = EngineStats(ranks=[replace(r, replica=i) for i, s in enumerate(per) for r in s.ranks],
                          speculating=any(s.speculating for s in per),
                          replicas=list(self.figures), recovery=self.recovery)
        for s in per:
            out.expert_load.merge(s.expert_load)
            out.rebalances += s.rebalances
        stages = [s.stage_seconds for s in per]
        out.stage_seconds = [max(col) for col in zip(*stages)] if stages and all(stages) else []
        for i, e in enumerate(self.engines):
            out.scheduler.add(self._lost_stats[i])
            if e.scheduler is not None:
                out.scheduler.add(e.scheduler.stats)
        return out

    def shutdown(self) -> None:
        if not cluster.alive():  # nothing left to release, and no call would be answered
            log.warning("the Ray cluster is gone; the replicas' actors went with it")
            return
        for e in self.engines:
            try:
                e.shutdown()
            except Exception as err:  # one engine's teardown must not keep the others up
                log.warning("shutting a replica down failed: %s", err)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _one_line(e: BaseException) -> str:
    """The error on one line: type and message, its lines joined (every rank named)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = "".join(x + ("" if i + 1 == len(lines) else " " if x.endswith(":") else "; ")
                   for i, x in enumerate(lines))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _stats_of(engine: Any) -> EngineStats:
    """engine.stats(), or empty figures for an engine that can no longer answer (logged)."""
    try:
        return engine.stats()
    except Exception as e:  # a replica given up on: its ranks are gone
        log.warning("a replica's figures are missing: %s", _one_line(e))
        return EngineStats()
