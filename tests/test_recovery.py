"""Batch jobs that outlive lost ranks, on the local Ray cluster: a chaos test that kills
StageWorker processes mid-job, and two replicas of which one loses an actor.

The oracle is the same job run by the single-process model (LocalEngine, float32): greedy
outputs do not depend on which requests share a step, so a request run again from its prompt
on a rebuilt engine gives the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time

import pytest
import torch

from ds3dist.jobs.batch import run_batch_job
from ds3dist.jobs.requests import DEFAULT_SAMPLING
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime.engine import Engine
from ds3dist.runtime.options import RuntimeOptions
from ds3dist.runtime.replicas import ReplicaSet
from ds3dist.core.options import ServingOptions

pytestmark = pytest.mark.slow

N = 64  # requests: long enough a job for three kills, each 0.3-1.5 s after a rebuild
GREEDY = DEFAULT_SAMPLING.overridden({"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0,
                                      "top_k": 0, "seed": 0, "stop": None})


def write_input(path, n: int):
    words = ["sea", "stone", "river", "number", "engine", "forest", "lamp", "bridge"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"Request {i}: a note on the {words[i % 8]} " + "and more " * (i % 5)
            f.write(json.dumps({"id": f"q{i}", "prompt": prompt,
                                "max_new_tokens": 8 + (i * 7) % 24}) + "\n")
    return path


def records(path) -> dict[str, dict]:
    lines = [json.loads(x) for x in open(path) if x.strip()]
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)), "a line was written twice"
    return {r["id"]: r for r in lines}


@pytest.fixture(scope="module")
def oracle(tiny_fp8_dir, tok, tmp_path_factory):
    """The job's records from the single-process model, and its input file."""
    import ds3dist
    from ds3dist.local import LocalEngine

    d = tmp_path_factory.mktemp("oracle")
    inp = write_input(d / "in.jsonl", N)
    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    run_batch_job(LocalEngine(model, tok, ServingOptions(max_seqs=8)), tok, inp, d / "out.jsonl",
                  sampling=GREEDY, progress=False)
    want = records(d / "out.jsonl")
    assert len(want) == N
    return inp, want


def builder(ckpt, layout: ParallelLayout, builds: list, collective_timeout_s: float = 30):
    def build(replica: int, attempt: int) -> Engine:
        builds.append((replica, attempt))
        return Engine(ckpt, layout, execution="bf16", dtype=torch.float32,
                      serving=ServingOptions(max_seqs=8),
                      runtime=RuntimeOptions(collective_timeout_s=collective_timeout_s),
                      resource_wait_s=60 if attempt else 0)
    return build


def same_records(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), "lost or extra requests"
    for k, w in want.items():
        assert got[k]["token_ids"] == w["token_ids"], k
        assert (got[k]["text"], got[k]["finish_reason"]) == (w["text"], w["finish_reason"]), k


class Killer(threading.Thread):
    """Kills a random rank process of replica `replica` `times` times, each at a random moment
    after the replica (re)started; records (engine number, rank) killed."""

    def __init__(self, rs: ReplicaSet, replica: int, times: int, seed: int,
                 sig: signal.Signals = signal.SIGKILL):
        super().__init__(daemon=True)
        self.rs, self.replica, self.times, self.rng = rs, replica, times, random.Random(seed)
        self.sig = sig
        self.killed: list[tuple[int, int]] = []
        self.pids: list[int] = []
        self.done = threading.Event()

    @contextlib.contextmanager
    def active(self):
        """Killing while the body runs; stopped and joined after it."""
        self.start()
        try:
            yield self
        finally:
            self.done.set()
            self.join(10)

    def run(self) -> None:
        for k in range(self.times):
            deadline = time.monotonic() + 120
            while sum(r.replica == self.replica for r in self.rs.recovery.restarts) < k:  # rebuilt
                if self.done.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            engine = self.rs.engines[self.replica]
            if self.done.wait(self.rng.uniform(0.3, 1.5)):
                return
            victim = self.rng.choice(engine.infos)
            os.kill(victim["pid"], self.sig)
            self.pids.append(victim["pid"])
            self.killed.append((k, victim["rank"]))


def test_chaos_three_stage_workers_killed_mid_job(ray_cluster, tiny_fp8_dir, tok, oracle,
                                                  tmp_path):
    inp, want = oracle
    builds: list = []
    out = tmp_path / "out.jsonl"
    seed = random.randrange(1 << 16)
    with ReplicaSet(builder(tiny_fp8_dir, ParallelLayout(pp=2, ep=2), builds), 1,
                    max_restarts=3) as rs:
        with Killer(rs, 0, 3, seed).active() as killer:
            summary = run_batch_job(rs, tok, inp, out, sampling=GREEDY, progress=False).as_dict()
    print(f"chaos seed {seed}: killed (restart, rank) {killer.killed}; "
          f"recovery {summary['recovery']}")
    assert len(killer.killed) == 3, f"the job ended before 3 kills: {killer.killed}"
    same_records(records(out), want)
    assert summary["counts"]["generated"] == N and summary["counts"]["not_run"] == 0
    rec = summary["recovery"]
    assert rec["restarts"] == 3 and builds == [(0, 0), (0, 1), (0, 2), (0, 3)]
    for ev in rec["events"]:
        assert "died (its actor is gone)" in ev["cause"], ev
        assert ev["lost_s"] > 0
    assert summary["replicas"][0]["restarts"] == 3


def test_two_replicas_one_loses_an_actor(ray_cluster, tiny_fp8_dir, tok, oracle, tmp_path):
    inp, want = oracle
    layout = ParallelLayout(pp=1, ep=2)
    one = tmp_path / "one.jsonl"  # one replica, undisturbed
    with ReplicaSet(builder(tiny_fp8_dir, layout, []), 1) as rs:
        run_batch_job(rs, tok, inp, one, sampling=GREEDY, progress=False)
    same_records(records(one), want)

    builds: list = []
    out = tmp_path / "two.jsonl"
    with ReplicaSet(builder(tiny_fp8_dir, layout, builds), 2, max_restarts=1) as rs:
        steady = rs.engines[1]
        with Killer(rs, 0, 1, seed=1).active() as killer:
            summary = run_batch_job(rs, tok, inp, out, sampling=GREEDY, progress=False).as_dict()
        assert rs.engines[1] is steady, "the other replica was rebuilt"
    assert killer.killed, "the job ended before the kill"
    got = records(out)
    assert {k: r["token_ids"] for k, r in got.items()} == \
        {k: r["token_ids"] for k, r in records(one).items()}
    same_records(got, want)
    figs = summary["replicas"]
    assert [f["restarts"] for f in figs] == [1, 0], figs
    assert all(f["requests"] > 0 for f in figs), figs
    assert sum(f["requests"] for f in figs) == N
    assert summary["recovery"]["restarts"] == 1
    assert sorted(builds) == [(0, 0), (0, 1), (1, 0)]
    assert {r["replica"] for r in summary["ranks"]} == {0, 1}


def test_a_hung_rank_is_replaced(ray_cluster, tiny_fp8_dir, tok, oracle, tmp_path):
    """SIGSTOP one rank mid-job: its peer's collective times out, the step fails naming the
    stopped rank, and the rebuilt replica completes the job."""
    inp, want = oracle
    out = tmp_path / "out.jsonl"
    with ReplicaSet(builder(tiny_fp8_dir, ParallelLayout(pp=1, ep=2), [],
                            collective_timeout_s=5), 1, max_restarts=1) as rs:
        killer = Killer(rs, 0, 1, seed=2, sig=signal.SIGSTOP)
        try:
            with killer.active():
                summary = run_batch_job(rs, tok, inp, out, sampling=GREEDY, progress=False).as_dict()
        finally:
            for pid in killer.pids:  # killed by the engine already; make sure
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
    assert killer.killed, "the job ended before a rank was stopped"
    same_records(records(out), want)
    (event,) = summary["recovery"]["events"]
    rank = killer.killed[0][1]
    assert f"rank {rank} (stage 0, ep rank {rank})" in event["cause"], event
    assert "stopped or hung" in event["cause"] or "timed out" in event["cause"].lower(), event
