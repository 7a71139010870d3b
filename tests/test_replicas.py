"""ReplicaSet (recovery, replicas, stopping) and GracefulStop, with engines that fail on cue.

The fake engine decodes with a hash "model" (token = crc32 of the request id and its context),
so a request run again from its prompt gives the same tokens, and fails by raising the
EngineError a real engine raises when a rank is lost. The oracle is the same model run one
token at a time.
"""

from __future__ import annotations

import os
import signal
import time
import zlib

import pytest

from ds3dist.jobs.stop import GracefulStop, Interrupted
from ds3dist.runtime.engine import EngineError
from ds3dist.runtime.replicas import ReplicaSet
from ds3dist.core.engine import EngineStats, ExpertLoad, LoadInfo, RankStats
from ds3dist.core.request import Request, RequestStatus
from ds3dist.core.scheduler import SchedulerStats

VOCAB = 1000


def model(req_id: str, context: list[int]) -> int:
    return zlib.crc32(f"{req_id}:{context}".encode()) % VOCAB


def reference(req: Request) -> list[int]:
    ctx, out = list(req.prompt_ids), []
    while len(out) < req.max_new_tokens:
        out.append(model(req.id, ctx))
        ctx.append(out[-1])
    return out


def requests(n: int, max_new: int = 5) -> list[Request]:
    return [Request(f"r{i}", [i + 1, 2 * i + 3], max_new_tokens=max_new)
            for i in range(n)]


class FlakyEngine:
    """Up to `width` requests at a time, one token each per step; raises EngineError at the
    steps `fail(step)` says (step counts every step of this engine)."""

    def __init__(self, fail=lambda step: False, width: int = 3, step_s: float = 0.0):
        self.fail, self.width, self.step_s = fail, width, step_s
        self.scheduler = None
        self.steps = 0
        self.closed = False

    def stream(self, reqs):
        src, running = iter(reqs), []
        while True:
            while len(running) < self.width and (r := next(src, None)) is not None:
                r.status = RequestStatus.RUNNING
                running.append(r)
            if not running:
                return
            self.steps += 1
            time.sleep(self.step_s)
            if self.fail(self.steps):
                self.closed = True
                raise EngineError(f"step {self.steps} failed:\n  rank 1 (stage 0, ep rank 1) "
                                  f"on node 10.0.0.2: died (its actor is gone)")
            for r in list(running):
                r.output_ids.append(model(r.id, r.all_ids))
                if len(r.output_ids) >= r.max_new_tokens:
                    r.status, r.finish_reason = RequestStatus.FINISHED, "length"
                    running.remove(r)
                    yield r

    def stats(self):
        load = LoadInfo(bytes_read=0, load_seconds=0.0, rss_bytes=0, dtype="torch.float32",
                        cuda_free_bytes=None)
        rank = RankStats(rank=0, stage=0, ep_rank=0, node_ip="10.0.0.1", hostname="h", pid=1,
                         load=load, net={}, rss_bytes=0, peak_rss_bytes=0, busy_seconds=1.0,
                         steps=self.steps, dispatch={})
        return EngineStats(ranks=[rank], expert_load=ExpertLoad({3: [1, 2]}),
                           stage_seconds=[1.0])

    def shutdown(self):
        self.closed = True


def run(rs: ReplicaSet, reqs: list[Request]) -> dict[str, Request]:
    ended: dict[str, Request] = {}
    for r in rs.stream(reqs):
        assert r.id not in ended, f"{r.id} handed on twice"
        ended[r.id] = r
    return ended


def test_a_failed_replica_is_rebuilt_and_reruns_what_it_held():
    builds = []

    def make(replica, attempt):
        builds.append((replica, attempt))
        return FlakyEngine(fail=lambda step: attempt < 2 and step == 3)  # fails twice

    reqs = requests(10)
    with ReplicaSet(make, replicas=1, max_restarts=3) as rs:
        ended = run(rs, reqs)
        stats = rs.stats()
    assert builds == [(0, 0), (0, 1), (0, 2)]
    assert sorted(ended) == sorted(r.id for r in reqs)
    for r in reqs:
        assert ended[r.id].output_ids == reference(r), r.id
        assert r.output_ids == [], "the submitted request is kept as it was"
    rec = stats.recovery
    assert len(rec.restarts) == 2
    for ev in rec.restarts:
        assert ev.replica == 0 and ev.rerun == 3
        assert "rank 1 (stage 0, ep rank 1) on node 10.0.0.2: died" in ev.cause
    assert stats.replicas[0].restarts == 2 and stats.replicas[0].requests == 10
    assert stats.replicas[0].completion_tokens == 50


def test_past_max_restarts_the_error_names_what_never_came_back():
    with ReplicaSet(lambda i, a: FlakyEngine(fail=lambda step: step == 2), 1,
                    max_restarts=1) as rs:
        with pytest.raises(EngineError) as e:
            run(rs, requests(6))
    msg = str(e.value)
    assert "no replica is left" in msg and "replica 0: failed after 1 restarts" in msg
    assert "runtime.max_restarts=1" in msg and "rank 1 (stage 0, ep rank 1)" in msg


def test_a_restart_that_finds_no_resources_uses_the_budget():
    def make(replica, attempt):
        if attempt == 1:
            raise EngineError("could not place 2 ranks within 5 s")
        return FlakyEngine(fail=lambda step: attempt == 0 and step == 2)

    reqs = requests(4)
    with ReplicaSet(make, 1, max_restarts=2) as rs:
        ended = run(rs, reqs)
        rec = rs.stats().recovery
    assert all(ended[r.id].output_ids == reference(r) for r in reqs)
    assert len(rec.restarts) == 1 and rs.figures[0].restarts == 2
    assert "then the restart failed: EngineError: could not place 2 ranks" in rec.restarts[0].cause


def test_a_replica_that_gives_up_hands_its_requests_to_the_others():
    def make(replica, attempt):
        return FlakyEngine(fail=(lambda step: step == 2) if replica == 0 else (lambda step: False),
                           step_s=0.002)

    reqs = requests(20)
    with ReplicaSet(make, replicas=2, max_restarts=0) as rs:
        ended = run(rs, reqs)
        stats = rs.stats()
    assert sorted(ended) == sorted(r.id for r in reqs)
    assert all(ended[r.id].output_ids == reference(r) for r in reqs)
    figs = stats.replicas
    assert figs[0].gave_up and figs[0].requests == 0
    assert figs[1].requests == 20 and figs[1].gave_up is None


def test_replicas_share_the_stream_by_load():
    """A replica four times slower takes fewer of the requests; together they run each once."""
    reqs = requests(40, max_new=3)
    with ReplicaSet(lambda i, a: FlakyEngine(step_s=0.02 if i == 0 else 0.005), 2) as rs:
        ended = run(rs, reqs)
        stats = rs.stats()
    assert all(ended[r.id].output_ids == reference(r) for r in reqs)
    figs = stats.replicas
    assert figs[0].requests + figs[1].requests == 40
    assert figs[1].requests > figs[0].requests, figs
    assert [r.replica for r in stats.ranks] == [0, 1]
    assert stats.expert_load.per_layer == {3: [2, 4]}


def test_once_stopping_nothing_is_admitted_and_a_lost_replica_is_not_rebuilt():
    engines = []

    def make(replica, attempt):
        engines.append(FlakyEngine(fail=lambda step: step == 4))
        return engines[-1]

    reqs = requests(30, max_new=2)  # r0-r2 end at step 2, r3-r5 start at step 3
    with ReplicaSet(make, 1, max_restarts=3, should_stop=lambda: engines[0].steps >= 3) as rs:
        ended = run(rs, reqs)
    assert len(engines) == 1, "no rebuild while stopping"
    assert sorted(ended) == ["r0", "r1", "r2"]
    assert all(ended[r.id].output_ids == reference(r) for r in reqs[:3])


def test_scheduler_stats_add():
    a, b = SchedulerStats(steps=2, output_tokens=5), SchedulerStats(steps=3, output_tokens=1)
    a.count(2, 1, 2)
    b.count(3, 3, 4)
    a.add(b)
    assert (a.steps, a.sample_steps, a.output_tokens) == (5, 2, 12)
    assert a.drafts_proposed == [2, 2, 1] and a.drafts_accepted == [2, 1, 1]


# ---- GracefulStop -------------------------------------------------------------------------
def test_first_signal_asks_to_stop_and_the_drain_is_bounded():
    with GracefulStop(drain_s=0.3) as stop:
        stop.generating = True
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop() and stop.signal == "SIGTERM"
        t0 = time.monotonic()
        with pytest.raises(Interrupted, match="did not finish within 0.3 s"):
            time.sleep(10)
        assert time.monotonic() - t0 < 3
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_a_second_signal_stops_at_once():
    with GracefulStop(drain_s=60) as stop:
        stop.generating = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signal == "SIGINT"
        with pytest.raises(Interrupted, match="SIGTERM while stopping"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)


def test_a_signal_before_generation_stops_at_once():
    with GracefulStop(drain_s=60) as stop:
        with pytest.raises(Interrupted, match="SIGTERM before generation began"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        assert stop.requested and stop.signal == "SIGTERM"


def test_once_drained_the_timer_never_fires():
    """The drain ended (nothing in flight): closing work may take longer than drain_s."""
    with GracefulStop(drain_s=0.3) as stop:
        stop.generating = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        stop.drained()
        time.sleep(0.8)  # past drain_s: no Interrupted
        assert stop.requested and not stop._expired
        with pytest.raises(Interrupted, match="SIGINT while stopping"):  # a second signal still
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)


def test_a_first_signal_in_the_closing_work_lets_it_finish():
    """Generation over (drained), then SIGTERM: the summary is still written (no timer, no
    Interrupted); a second signal stops at once."""
    with GracefulStop(drain_s=0.2) as stop:
        stop.generating = True
        stop.drained()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # past drain_s
        assert stop.requested and stop.signal == "SIGTERM" and stop._timer is None
        with pytest.raises(Interrupted, match="SIGINT while stopping"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
