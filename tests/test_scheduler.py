"""The serving core's plain-Python half: params, requests, page pool, scheduler, step plans.

`FakeWorkers` plays the workers: it keeps each request's page table from the plans alone,
writes every fed token into a paged cache, and "samples" a token that hashes the request id
and the whole context it reads back through the page table. A wrong page table, a page shared
by two requests, a missing `freed` or a wrong chunk changes the tokens, so each request's
output is checked against `reference()`, which generates the same tokens one at a time.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import zlib
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds3dist.core.pages import OutOfPages, PagePool
from ds3dist.core.params import SamplingParams
from ds3dist.core.plan import FILL, SeqStep, StepPlan, StepResult
from ds3dist.core.request import Request, RequestStatus
from ds3dist.core.scheduler import Scheduler, SchedulerConfig

VOCAB = 50


def model(req_id: str, context: list[int]) -> int:
    return zlib.crc32(f"{req_id}:{context}".encode()) % VOCAB


def reference(req_id, prompt, max_new, stop_ids=()):
    """(output ids, finish_reason) generated one token at a time."""
    ctx, out = list(prompt), []
    while len(out) < max_new:
        out.append(model(req_id, ctx))
        ctx.append(out[-1])
        if out[-1] in stop_ids:
            return out, "stop"
    return out, "length"


class FakeWorkers:
    """Executes plans in order, holding only what the plans tell it."""

    def __init__(self, cfg: SchedulerConfig, fail: dict[str, int] | None = None):
        self.cfg = cfg
        self.tables: dict[str, dict] = {}  # req_id -> {column, pages, n}
        self.owner: dict[tuple[int, int], str] = {}  # (column, page) -> req_id
        self.cache: dict[tuple[int, int, int], tuple[str, int, int]] = {}
        self.fail = dict(fail or {})  # req_id -> fail on its n-th step (1-based)
        self.steps_run: Counter = Counter()
        self.introduced: Counter = Counter()
        self.last: dict[str, int] = {}  # the token each request's newest step sampled

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.freed:
            self.last.pop(rid, None)
            table = self.tables.pop(rid, None)
            for p in table["pages"] if table else ():
                del self.owner[(table["column"], p)]
        result = StepResult(plan.step_id)
        for c, col in enumerate(plan.columns):
            for s in col:
                self._run(c, s, result)
        return result

    def _run(self, c: int, s: SeqStep, result: StepResult) -> None:
        ps = self.cfg.page_size
        if s.params is not None:
            assert s.start == 0 and s.req_id not in self.tables, "reintroduced without freed"
            self.tables[s.req_id] = {"column": c, "pages": [], "n": 0}
            self.introduced[s.req_id] += 1
        t = self.tables[s.req_id]
        assert t["column"] == c and s.start == t["n"]
        for p in s.new_pages:
            assert (c, p) not in self.owner, f"page {p} of column {c} is in two requests"
            self.owner[(c, p)] = s.req_id
        t["pages"] += s.new_pages
        t["n"] = s.start + len(s.token_ids)
        assert len(t["pages"]) == -(-t["n"] // ps), "pages beyond the scheduled tokens"
        self.steps_run[s.req_id] += 1
        if s.token_ids == [FILL] and s.req_id not in self.last:
            result.failed[s.req_id] = "no token to continue from"
            return
        for i, tok in enumerate(s.token_ids):
            pos = s.start + i
            tok = self.last[s.req_id] if tok == FILL else tok
            self.cache[(c, t["pages"][pos // ps], pos % ps)] = (s.req_id, pos, tok)
        if self.fail.get(s.req_id) == self.steps_run[s.req_id]:
            result.failed[s.req_id] = "injected failure"
            self.last.pop(s.req_id, None)
        elif s.sample:
            ctx = []
            for pos in range(t["n"]):
                rid, p, tok = self.cache[(c, t["pages"][pos // ps], pos % ps)]
                assert (rid, p) == (s.req_id, pos), "cache row written by another request"
                ctx.append(tok)
            result.sampled[s.req_id] = self.last[s.req_id] = model(s.req_id, ctx)


def check_plan(sched: Scheduler, plan: StepPlan, in_flight, reqs) -> None:
    cfg = sched.cfg
    assert len(plan.columns) == cfg.columns
    ids = [s.req_id for s in plan.seqs()]
    assert len(ids) == len(set(ids))
    held = [s for p in in_flight for s in p.seqs()]
    for s in plan.seqs():  # in two plans only as an overlapped decode after a sampling step
        before = [x for x in held if x.req_id == s.req_id]
        if before:
            assert cfg.overlap and s.token_ids == [FILL] and len(before) == 1 and before[0].sample
            assert s.start == before[0].start + len(before[0].token_ids)
    for c, col in enumerate(plan.columns):
        assert sum(len(s.token_ids) for s in col) <= cfg.max_tokens_per_step
        assert len(col) <= cfg.max_seqs
        for s in col:
            req = sched.running[s.req_id]
            assert req.column == c and req.in_flight
            if s.token_ids == [FILL]:
                assert (s.start, s.sample, s.params) == (req.num_tokens, True, None)
                assert s.output_index == len(req.output_ids) + 1 < req.max_new_tokens
                continue
            assert s.token_ids == req.all_ids[s.start:s.start + len(s.token_ids)]
            assert s.sample == (s.start + len(s.token_ids) == req.num_tokens)
            assert s.output_index == len(req.output_ids)
            assert (s.params is not None) == (s.start == 0)
    check_pages(sched, reqs)


def check_pages(sched: Scheduler, reqs) -> None:
    for c, pool in enumerate(sched.pools):
        held = [p for r in reqs if r.column == c and not r.status.ended for p in r.pages]
        assert len(held) == len(set(held)), "page in two requests"
        assert len(held) + pool.num_free == pool.num_pages, "page leaked"
        running = [r for r in sched.running.values() if r.column == c]
        assert len(running) <= sched.cfg.max_seqs


def run(sched: Scheduler, workers: FakeWorkers, reqs, pp: int = 1, late=(),
        max_steps: int = 10_000):
    """Drive the scheduler like an engine with up to pp plans in flight, adding one of `late`
    after each update; (ended, plans)."""
    in_flight: deque = deque()
    late = deque(late)
    ended, plans = sched.pop_ended(), []
    for _ in range(max_steps):
        while len(in_flight) < pp and (plan := sched.schedule()) is not None:
            check_plan(sched, plan, [p for p, _ in in_flight], reqs)
            plans.append(plan)
            in_flight.append((plan, workers.execute(plan)))
        if in_flight:
            ended += sched.update(*in_flight.popleft())
            check_pages(sched, reqs)
        elif not late:
            break
        if late:
            sched.add(late.popleft())
    ended += sched.pop_ended()
    assert not sched.has_work and not in_flight, "scheduler stuck with work left"
    return ended, plans


def make(i, prompt_len, max_new, stop=None, **kw):
    prompt = [(i * 7 + j) % VOCAB for j in range(prompt_len)]
    return Request(f"r{i}", prompt, max_new_tokens=max_new, stop_ids=frozenset(stop or ()), **kw)


def assert_outputs(reqs, ended):
    assert Counter(r.id for r in ended) == Counter(r.id for r in reqs), "each ends exactly once"
    for r in reqs:
        if r.status is RequestStatus.REJECTED:
            continue
        want, why = reference(r.id, r.prompt_ids, r.max_new_tokens,
                              r.stop_ids)
        if r.status is RequestStatus.FAILED:
            assert r.output_ids == want[:len(r.output_ids)] and r.error
        else:
            assert r.status is RequestStatus.FINISHED
            assert (r.output_ids, r.finish_reason) == (want, why), r.id


def cfg(**kw) -> SchedulerConfig:
    base = dict(pages_per_column=64, page_size=4, max_tokens_per_step=64, max_seqs=8,
                max_model_len=4096)
    return SchedulerConfig(**{**base, **kw})


# ---- plain data --------------------------------------------------------------------------------
NO_TORCH_LOOP = """
import sys
sys.modules['torch'] = sys.modules['ray'] = sys.modules['numpy'] = None  # imports fail
from collections import deque
from ds3dist.core.loop import serve
from ds3dist.core.options import ServingOptions, SpeculativeConfig
from ds3dist.core.plan import StepResult
from ds3dist.core.request import Request
from ds3dist.core.scheduler import Scheduler, SchedulerConfig
import ds3dist.core.engine, ds3dist.core.executor, ds3dist.core.pages, ds3dist.core.params
import ds3dist.runtime.options  # the runtime's options are plain data too

class Fake:  # every sampling step returns 7 + the step id
    max_in_flight, overlap = 2, False
    def __init__(self):
        self.done = deque()
    def submit(self, plan):
        self.done.append(StepResult(plan.step_id, {s.req_id: 7 + plan.step_id
                                                   for s in plan.seqs() if s.sample}))
    def result(self, timeout_s=None):
        return self.done.popleft()

sched = Scheduler(SchedulerConfig(columns=2, pages_per_column=16, page_size=4, max_model_len=64))
reqs = [Request(f"r{i}", [1, 2, 3] * (i + 1), max_new_tokens=3 + i) for i in range(4)]
ended = {r.id: r.output_ids for r in serve(sched, Fake(), reqs)}
assert sorted(ended) == ["r0", "r1", "r2", "r3"] and all(len(ended[f"r{i}"]) == 3 + i for i in range(4))
print("ran", sched.stats.steps, "steps")
"""


def test_the_driver_core_runs_its_loop_where_torch_cannot_be_imported():
    p = subprocess.run([sys.executable, "-c", NO_TORCH_LOOP], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("ran "), p.stderr[-3000:]


def test_sampling_params():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3)
    assert SamplingParams.of(p.as_dict()) == p and SamplingParams.of(p) is p
    assert SamplingParams().greedy and not p.greedy
    for field, bad in [("temperature", -1), ("temperature", float("nan")), ("top_p", 0),
                       ("top_p", 1.5), ("top_k", -1), ("top_k", 1.5), ("seed", "x")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: bad})
    with pytest.raises(ValueError, match="top_q"):
        SamplingParams.of({"top_q": 1})


def test_request_basics():
    r = Request("a", [1, 2, 3], {"temperature": 0.5}, max_new_tokens=4)
    assert r.params == SamplingParams(temperature=0.5) and r.status is RequestStatus.WAITING
    r.output_ids += [7, 8]
    assert r.all_ids == [1, 2, 3, 7, 8] and r.num_tokens == 5
    assert [r.token_slice(a, b) for a, b in [(0, 2), (2, 4), (3, 5), (4, 5)]] == \
        [[1, 2], [3, 7], [7, 8], [8]]
    for kw, field in [(dict(id="", prompt_ids=[1]), "id"), (dict(id="a", prompt_ids=[]), "prompt"),
                      (dict(id="a", prompt_ids=[1], max_new_tokens=-1), "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            Request(**kw)


def test_plan_pickles_small():
    steps = [SeqStep(f"r{i}", [5], 100, [], True, None, 3) for i in range(4)]
    plan = StepPlan(7, [steps, []], ["gone"])
    back = pickle.loads(pickle.dumps(plan))
    assert back.columns[0][2].req_id == "r2" and back.freed == ["gone"] and back.num_tokens == 4
    assert len(pickle.dumps(plan)) < 600


def test_config_validation():
    for field, bad in [("columns", 0), ("pages_per_column", 0), ("page_size", 0),
                       ("max_tokens_per_step", 0), ("max_seqs", 0), ("prefill_chunk", 0),
                       ("max_model_len", 0)]:
        with pytest.raises(ValueError, match=field):
            cfg(**{field: bad})


# ---- page pool ---------------------------------------------------------------------------------
def test_page_pool():
    pool = PagePool(5, 16)
    assert [pool.pages_for(n) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert (a, b, pool.num_free) == ([0, 1], [2, 3], 1)
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(OutOfPages, match="need 2 pages, only 1 of 5 free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 3 and pool.allocate(1) == [0]
    with pytest.raises(ValueError, match="cannot free"):
        pool.free([1])  # double free
    with pytest.raises(ValueError, match="cannot free"):
        pool.free([9])  # foreign page
    with pytest.raises(ValueError, match="cannot free"):
        pool.free([2, 2])
    assert pool.num_free == 2  # failed frees change nothing
    pool.free(b + [0])
    assert pool.num_free == 5 and pool.allocate(0) == []


# ---- scheduling --------------------------------------------------------------------------------
def test_budget_and_chunk_by_hand():
    # budget 8, default chunk 8 // 2 = 4 while others wait
    s = Scheduler(cfg(max_tokens_per_step=8))
    reqs = [make(i, 5, 3) for i in range(3)]
    for r in reqs:
        s.add(r)
    p1 = s.schedule()
    assert [(x.req_id, x.start, len(x.token_ids), x.sample) for x in p1.columns[0]] == \
        [("r0", 0, 4, False), ("r1", 0, 4, False)]
    assert [x.new_pages for x in p1.columns[0]] == [[0], [1]]
    w = FakeWorkers(s.cfg)
    assert s.update(p1, w.execute(p1)) == []
    p2 = s.schedule()  # r0, r1 finish their prompt; r2, alone in the queue, takes 5 of 6 left
    assert [(x.req_id, x.start, len(x.token_ids), x.sample, x.new_pages) for x in p2.columns[0]] == \
        [("r0", 4, 1, True, [2]), ("r1", 4, 1, True, [3]), ("r2", 0, 5, True, [4, 5])]
    s.update(p2, w.execute(p2))
    assert [r.num_tokens for r in reqs] == [6, 6, 6] and s.stats.tokens_scheduled == 15
    ended, _ = run(s, w, reqs)
    assert_outputs(reqs, ended)
    assert s.stats.steps == 4  # two more decode steps


def test_max_seqs_and_budget_every_plan():
    s = Scheduler(cfg(max_seqs=3, max_tokens_per_step=10))
    reqs = [make(i, 1 + i % 7, 4) for i in range(12)]
    for r in reqs:
        s.add(r)
    ended, plans = run(s, FakeWorkers(s.cfg), reqs)  # run() checks every plan
    assert_outputs(reqs, ended)
    assert max(len(p.columns[0]) for p in plans) == 3
    assert max(p.num_tokens for p in plans) == 10


def test_long_prompt_chunked_and_short_ones_finish_first():
    s = Scheduler(cfg(page_size=16, pages_per_column=100, max_tokens_per_step=128,
                      max_model_len=2048))
    long = make(0, 1000, 3)
    shorts = [make(i, 10, 5) for i in (1, 2, 3)]
    reqs = [long] + shorts
    for r in reqs:
        s.add(r)
    ended, plans = run(s, FakeWorkers(s.cfg), reqs)
    assert_outputs(reqs, ended)
    assert [r.id for r in ended] == ["r1", "r2", "r3", "r0"]
    chunks = [(x.start, len(x.token_ids)) for p in plans for x in p.seqs() if x.req_id == "r0"]
    # 64 while the short ones wait, then the budget less their decodes, then decode
    assert chunks[:3] == [(0, 64), (64, 125), (189, 125)]
    assert sum(n for _, n in chunks[:9]) == 1000 and chunks[9:] == [(1000, 1), (1001, 1)]
    # every step after the first carries r0's prefill next to the short ones' decodes
    assert all({"r0", "r1", "r2", "r3"} <= {x.req_id for x in p.seqs()} for p in plans[1:5])


def test_preemption_recomputes_and_leaks_nothing():
    # 4 pages of 4 tokens; each request may need 3 pages, both start with 2 (pool full);
    # at r0's 4th step it needs a page: r1, the newer, is preempted
    s = Scheduler(cfg(pages_per_column=4, page_size=4, max_model_len=64))
    r0, r1 = make(0, 6, 6), make(1, 6, 6)
    for r in (r0, r1):
        s.add(r)
    w = FakeWorkers(s.cfg)
    ended, plans = run(s, w, [r0, r1])
    assert_outputs([r0, r1], ended)
    assert s.stats.preemptions == 1 and s.pools[0].num_free == 4
    assert [i for i, p in enumerate(plans) if p.freed] == [3, 6]
    assert plans[3].freed == ["r1"] and [x.req_id for x in plans[3].seqs()] == ["r0"]
    assert plans[6].freed == ["r0"]  # r0 ended after step 5
    # r1 came back from scratch with 4 tokens (the one free page); at step 5 it would have to
    # preempt itself, so it waits; once r0 ends it runs the rest of prompt + 3 outputs and
    # samples its 4th output
    back = [(p.step_id, x.start, len(x.token_ids), x.sample, x.output_index, x.params is not None)
            for p in plans[4:7] for x in p.seqs() if x.req_id == "r1"]
    assert back == [(4, 0, 4, False, 3, True), (6, 4, 5, True, 3, False)]
    assert w.introduced == {"r0": 1, "r1": 2}
    assert [r.id for r in ended] == ["r0", "r1"]


def test_preempted_request_goes_back_to_the_front():
    # as above, with max_seqs 2 and r2 waiting since the start: r1, preempted at step 3,
    # is admitted again before r2
    s = Scheduler(cfg(pages_per_column=4, page_size=4, max_seqs=2, max_model_len=64))
    got = shapes(s, [make(0, 6, 6), make(1, 6, 6), make(2, 1, 1)])
    assert got[3:7] == [[("r0", 8, 1)], [("r0", 9, 1), ("r1", 0, 4)], [("r0", 10, 1)],
                        [("r1", 4, 5), ("r2", 0, 1)]]


def test_preemption_takes_back_a_decode_already_in_this_step():
    # 3 pages of 4. Step 3: r1 decodes into its own page's slack; then r0, older, needs a page
    # for the rest of its prompt: r1 leaves the plan and its budget and page go to r0.
    s = Scheduler(cfg(pages_per_column=3, page_size=4, max_tokens_per_step=8,
                      prefill_chunk=4, max_model_len=64))
    r0, r1 = make(0, 10, 1), make(1, 1, 6)
    s.add(r0)
    s.add(r1)
    w = FakeWorkers(s.cfg)
    shape = []
    for _ in range(3):
        plan = s.schedule()
        shape.append([(x.req_id, x.start, len(x.token_ids)) for x in plan.seqs()])
        s.update(plan, w.execute(plan))
    assert shape == [[("r0", 0, 4), ("r1", 0, 1)], [("r1", 1, 1), ("r0", 4, 4)],
                     [("r0", 8, 2)]]
    assert plan.freed == ["r1"] and s.stats.preemptions == 1
    assert r0.status is RequestStatus.FINISHED and r1.status is RequestStatus.WAITING
    ended, _ = run(s, w, [r0, r1])
    assert_outputs([r0, r1], ended + [r0])


def shapes(s: Scheduler, reqs) -> list[list[tuple[str, int, int]]]:
    """(req_id, start, tokens) of each plan, run to the end one step at a time."""
    for r in reqs:
        s.add(r)
    w, out, ended = FakeWorkers(s.cfg), [], []
    while (plan := s.schedule()) is not None:
        out.append([(x.req_id, x.start, len(x.token_ids)) for x in plan.seqs()])
        ended += s.update(plan, w.execute(plan))
    assert_outputs(reqs, ended + s.pop_ended())
    return out


def test_prefill_shrinks_to_the_free_pages():
    # 2 pages of 4, budget 4. Step 1: r1 wants its last 2 prompt tokens but only 1 row is
    # left (its page has one slot, the pool none): it runs 1 rather than wait
    s = Scheduler(cfg(pages_per_column=2, page_size=4, max_tokens_per_step=4))
    assert shapes(s, [make(0, 1, 2), make(1, 5, 1)]) == [
        [("r0", 0, 1), ("r1", 0, 3)], [("r0", 1, 1), ("r1", 3, 1)], [("r1", 4, 1)]]


def test_preempted_step_gives_its_budget_back():
    # 3 pages of 4, budget 3 (chunk 1 while others wait). Step 3: r2's decode is placed, then
    # r0 needs a page: r2 is preempted, its token goes back to the budget, and r1 uses it
    s = Scheduler(cfg(pages_per_column=3, page_size=4, max_tokens_per_step=3))
    got = shapes(s, [make(0, 7, 1), make(1, 10, 1), make(2, 2, 3)])
    assert got == [[("r0", 0, 1), ("r1", 0, 1), ("r2", 0, 1)],
                   [("r2", 1, 1), ("r0", 1, 2)],
                   [("r2", 2, 1), ("r0", 3, 1), ("r1", 1, 1)],  # r0 shrinks to its page
                   [("r0", 4, 2), ("r1", 2, 1)],
                   [("r0", 6, 1), ("r1", 3, 1)],
                   [("r1", 4, 1), ("r2", 0, 2)],  # r2 is back (prompt + 2 outputs)
                   [("r1", 5, 3)],
                   [("r1", 8, 2)],  # r1 needs a page: r2 goes again
                   [("r2", 0, 3)],
                   [("r2", 3, 1)]]
    assert s.stats.preemptions == 2


def test_two_plans_in_flight_skip_requests():
    s = Scheduler(cfg())
    a, b, c = make(0, 3, 2), make(1, 3, 2), make(2, 3, 2)
    s.add(a)
    s.add(b)
    w = FakeWorkers(s.cfg)
    p1 = s.schedule()
    assert [x.req_id for x in p1.seqs()] == ["r0", "r1"] and a.in_flight and b.in_flight
    assert s.schedule() is None  # everything in flight
    s.add(c)
    p2 = s.schedule()
    assert [x.req_id for x in p2.seqs()] == ["r2"]
    res1, res2 = w.execute(p1), w.execute(p2)
    assert s.update(p1, res1) == []
    p3 = s.schedule()  # r2 is still in flight
    assert [(x.req_id, x.start, x.sample) for x in p3.seqs()] == [("r0", 3, True), ("r1", 3, True)]
    s.update(p2, res2)
    with pytest.raises(ValueError, match="not in flight"):
        s.update(p2, res2)
    assert [r.id for r in s.update(p3, w.execute(p3))] == ["r0", "r1"]  # 2 tokens each
    ended, _ = run(s, w, [a, b, c], pp=2)
    assert [r.id for r in ended] == ["r2"]
    assert_outputs([a, b, c], [a, b] + ended)


def test_overlap_decodes_ahead_of_the_token_in_flight():
    s = Scheduler(cfg(overlap=True, page_size=4))
    want, _ = reference("r1", make(1, 3, 1).prompt_ids, 6)
    a, b, c = make(0, 3, 6), make(1, 3, 6, stop=[want[2]]), make(2, 3, 6)
    for r in (a, b, c):
        s.add(r)
    w = FakeWorkers(s.cfg, fail={"r2": 3})  # its second decode step
    p1 = s.schedule()
    p2 = s.schedule()  # p1 in flight: each request's next decode, its token filled in
    assert [(x.req_id, x.token_ids, x.start, x.output_index) for x in p2.seqs()] == \
        [(r, [FILL], 3, 1) for r in ("r0", "r1", "r2")]
    assert s.schedule() is None  # each request is in two plans
    assert (a.in_flight, a.sampling, len(a.pages)) == (2, True, 1)
    r1, r2 = w.execute(p1), w.execute(p2)
    ended = s.update(p1, r1) + s.update(p2, r2)
    more, plans = run(s, w, [a, b, c], pp=2)
    ended, plans = ended + more, [p1, p2] + plans
    assert_outputs([a, b, c], ended)
    assert b.finish_reason == "stop" and len(b.output_ids) == 3  # its step ahead discarded
    assert c.status is RequestStatus.FAILED and len(c.output_ids) == 2
    fills = [x for p in plans for x in p.seqs() if x.token_ids == [FILL]]
    # r0 decodes 5 tokens after its prompt, all but its last ahead of the token before
    assert sum(x.req_id == "r0" for x in fills) == 4
    assert all(p.num_free == p.num_pages for p in s.pools) and not s.has_work


def test_overlap_stops_before_the_last_token():
    s = Scheduler(cfg(overlap=True, page_size=2, pages_per_column=3))
    a = make(0, 2, 4)  # positions 0..4 are fed (the 4th token is only sampled): 3 pages
    s.add(a)
    w = FakeWorkers(s.cfg)
    plans, flying = [], deque()
    while s.has_work:
        while (plan := s.schedule()) is not None:
            plans.append(plan)
            flying.append((plan, w.execute(plan)))
        assert len(flying) <= 2
        s.update(*flying.popleft())
    assert [(x.token_ids, x.start, x.output_index) for p in plans for x in p.seqs()] == \
        [([a.prompt_ids[0], a.prompt_ids[1]], 0, 0), ([FILL], 2, 1), ([FILL], 3, 2), ([FILL], 4, 3)]
    assert_outputs([a], [a])
    assert s.pools[0].num_free == 3


def test_columns_spread_by_free_pages():
    s = Scheduler(cfg(columns=3, pages_per_column=10, page_size=4))
    sizes = [12, 4, 4, 8, 4]  # pages: 3, 1, 1, 2, 1
    reqs = [make(i, n, 2) for i, n in enumerate(sizes)]
    for r in reqs:
        s.add(r)
    w = FakeWorkers(s.cfg)
    plan = s.schedule()
    # free pages before each: r0 [10,10,10] -> 0; r1 [7,10,10] -> 1; r2 [7,9,10] -> 2;
    # r3 [7,9,9] -> 1; r4 [7,7,9] -> 2
    assert [[x.req_id for x in col] for col in plan.columns] == [["r0"], ["r1", "r3"], ["r2", "r4"]]
    assert [r.column for r in reqs] == [0, 1, 2, 1, 2]
    assert [p.num_free for p in s.pools] == [7, 7, 8]
    ended = s.update(plan, w.execute(plan)) + run(s, w, reqs)[0]
    assert_outputs(reqs, ended)


def test_empty_columns_stay_in_the_plan():
    s = Scheduler(cfg(columns=4))
    s.add(make(0, 3, 1))
    plan = s.schedule()
    assert [len(c) for c in plan.columns] == [1, 0, 0, 0]


def test_failed_request_fails_alone():
    s = Scheduler(cfg())
    reqs = [make(i, 5, 4) for i in range(3)]
    for r in reqs:
        s.add(r)
    w = FakeWorkers(s.cfg, fail={"r1": 2})  # its first decode step
    ended, plans = run(s, w, reqs)
    assert_outputs(reqs, ended)
    assert reqs[1].status is RequestStatus.FAILED and reqs[1].error == "injected failure"
    assert len(reqs[1].output_ids) == 1 and reqs[1].pages == []
    assert plans[2].freed == ["r1"] and [x.req_id for x in plans[2].seqs()] == ["r0", "r2"]
    assert [r.status for r in (reqs[0], reqs[2])] == [RequestStatus.FINISHED] * 2


def test_missing_token_fails_the_request_and_stray_ids_are_refused():
    s = Scheduler(cfg())
    s.add(make(0, 2, 3))
    s.add(make(1, 2, 3))
    plan = s.schedule()
    with pytest.raises(ValueError, match="did not sample or run"):
        s.update(plan, StepResult(plan.step_id, {"r0": 1, "zz": 2}))
    with pytest.raises(ValueError, match="result of step 5"):
        s.update(plan, StepResult(5, {"r0": 1}))
    ended = s.update(plan, StepResult(plan.step_id, {"r0": 1}))
    assert [(r.id, r.status) for r in ended] == [("r1", RequestStatus.FAILED)]
    assert "no token" in ended[0].error


def test_rejections():
    s = Scheduler(cfg(page_size=4, pages_per_column=3, max_model_len=20))
    too_long, no_fit, ok = make(0, 15, 6), make(1, 10, 3), make(2, 10, 2)
    for r in (too_long, no_fit, ok):
        s.add(r)
    assert too_long.status is RequestStatus.REJECTED
    assert too_long.error == "prompt (15 tokens) + max_new_tokens (6) = 21 exceeds max_model_len 20"
    assert no_fit.error == "can never fit the cache pool: needs 4 pages of 4 tokens, a column has 3"
    assert ok.status is RequestStatus.WAITING and ok.error is None
    assert s.pop_ended() == [too_long, no_fit]
    with pytest.raises(ValueError, match="already queued"):
        s.add(make(2, 1, 1))
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(too_long)


def test_max_new_tokens_zero_ends_at_once():
    s = Scheduler(cfg())
    r = make(0, 5, 0)
    s.add(r)
    assert (r.status, r.finish_reason, r.output_ids) == (RequestStatus.FINISHED, "length", [])
    assert s.schedule() is None and not s.has_work and s.pop_ended() == [r]


def test_stop_rule_ends_early():
    want, _ = reference("r0", make(0, 4, 1).prompt_ids, 20)
    stop_tok = want[2]
    r = make(0, 4, 20, stop=[stop_tok])
    s = Scheduler(cfg())
    s.add(r)
    ended, _ = run(s, FakeWorkers(s.cfg), [r])
    assert ended == [r] and r.finish_reason == "stop"
    assert r.output_ids == want[:want.index(stop_tok) + 1]


def test_abort_waiting_running_and_in_flight():
    s = Scheduler(cfg(max_seqs=1))
    a, b = make(0, 3, 5), make(1, 3, 5)
    s.add(a)
    s.add(b)
    w = FakeWorkers(s.cfg)
    p1 = s.schedule()
    assert s.abort("r1") and b.finish_reason == "abort" and s.waiting == []
    assert s.abort("r0")  # in flight: ends when its step returns, its token discarded
    assert a.status is RequestStatus.RUNNING and s.has_work
    assert s.update(p1, w.execute(p1)) == [b, a]
    assert a.output_ids == [] and a.finish_reason == "abort" and not s.abort("r0")
    assert s.pools[0].num_free == s.cfg.pages_per_column
    s.add(make(2, 3, 1))
    assert s.schedule().freed == ["r0"]  # r1 never reached the workers


# ---- random workloads --------------------------------------------------------------------------
workload = st.fixed_dictionaries({
    "columns": st.integers(1, 3),
    "page_size": st.integers(1, 6),
    "pages_per_column": st.integers(2, 20),
    "budget": st.integers(1, 40),
    "max_seqs": st.integers(1, 5),
    "chunk": st.one_of(st.none(), st.integers(1, 24)),
    "pp": st.integers(1, 3),
    "overlap": st.booleans(),  # with one plan more in flight
    # (prompt length, max_new_tokens, stop rule?, fail at step 3*n if n)
    "requests": st.lists(st.tuples(st.integers(1, 16), st.integers(0, 8), st.booleans(),
                                   st.integers(0, 6)), min_size=1, max_size=12),
    "upfront": st.integers(1, 12),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload)
def test_random_workloads_keep_invariants(w):
    c = cfg(columns=w["columns"], page_size=w["page_size"], pages_per_column=w["pages_per_column"],
            max_tokens_per_step=w["budget"], max_seqs=w["max_seqs"], prefill_chunk=w["chunk"],
            max_model_len=22, overlap=w["overlap"])
    s = Scheduler(c)
    reqs = [make(i, n, m, stop=[0, 1, 2] if stops else None)
            for i, (n, m, stops, _) in enumerate(w["requests"])]
    fail = {f"r{i}": 3 * f for i, (*_, f) in enumerate(w["requests"]) if f}
    for r in reqs[:w["upfront"]]:
        s.add(r)
    ended, _ = run(s, FakeWorkers(c, fail), reqs, pp=w["pp"] + w["overlap"],
                   late=reqs[w["upfront"]:])
    assert_outputs(reqs, ended)  # each ends once, with exactly the reference tokens
    for r in reqs:
        need = len(r.prompt_ids) + r.max_new_tokens
        never = need > 22 or -(-need // c.page_size) > c.pages_per_column
        assert (r.status is RequestStatus.REJECTED) == never
    assert all(p.num_free == p.num_pages for p in s.pools)
    assert s.stats.tokens_scheduled >= sum(r.num_tokens - 1 for r in reqs if r.output_ids)


def test_random_page_pressure_preempts_and_stays_exact():
    """Seeded workloads whose pool barely holds the largest request: preemption is common."""
    rng = random.Random(0)
    preemptions = overlapped = 0
    for _ in range(150):
        page_size = rng.randint(1, 4)
        shapes = [(rng.randint(1, 14), rng.randint(1, 8)) for _ in range(rng.randint(2, 10))]
        biggest = max(-(-(n + m) // page_size) for n, m in shapes)
        c = cfg(columns=rng.randint(1, 2), page_size=page_size,
                pages_per_column=biggest + rng.randint(0, 2), max_model_len=64,
                max_tokens_per_step=rng.randint(1, 24), max_seqs=rng.randint(1, 6),
                prefill_chunk=rng.choice([None, rng.randint(1, 8)]), overlap=rng.random() < 0.5)
        s = Scheduler(c)
        reqs = [make(i, n, m, stop=[0] if i % 3 == 0 else None) for i, (n, m) in enumerate(shapes)]
        for r in reqs:
            s.add(r)
        ended, plans = run(s, FakeWorkers(c), reqs, pp=rng.randint(1, 3) + c.overlap)
        overlapped += sum(x.token_ids == [FILL] for p in plans for x in p.seqs())
        assert_outputs(reqs, ended)
        assert all(r.status is RequestStatus.FINISHED for r in reqs)
        assert all(p.num_free == p.num_pages for p in s.pools)
        preemptions += s.stats.preemptions
    assert preemptions > 100 and overlapped > 100


# ---- speculative decoding ----------------------------------------------------------------------
class DraftingWorkers:
    """The workers of a speculating engine, by the plans alone: each request's computed
    context (a reintroduced request starts empty), its pages (never shared, enough for the
    step's tokens and the chained rows of a sampling step); a sampling step verifies its drafts
    greedily against `model` and proposes k drafts: the true continuation, except draft j of
    request i when (i + j) % 3 == 1, which is wrong (rejected)."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg, self.k = cfg, cfg.num_drafts
        self.ctx: dict[str, list[int]] = {}
        self.pages: dict[str, list[tuple[int, int]]] = {}
        self.owner: dict[tuple[int, int], str] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.freed:
            self.ctx.pop(rid, None)
            for p in self.pages.pop(rid, []):
                del self.owner[p]
        res = StepResult(plan.step_id)
        for c, col in enumerate(plan.columns):
            for s in col:
                self._run(c, s, res)
        return res

    def _run(self, c: int, s: SeqStep, res: StepResult) -> None:
        rid = s.req_id
        if s.params is not None:
            assert s.start == 0 and rid not in self.ctx, "reintroduced without freed"
            self.ctx[rid], self.pages[rid] = [], []
        for p in s.new_pages:
            assert (c, p) not in self.owner, "page in two requests"
            self.owner[(c, p)] = rid
            self.pages[rid].append((c, p))
        ctx, n = self.ctx[rid], len(s.token_ids) - s.drafts
        assert s.start == len(ctx), "start is not the computed length"
        rows = s.start + len(s.token_ids) + (self.k - 1 if s.sample else 0)
        assert len(self.pages[rid]) * self.cfg.page_size >= rows, "no page for a row written"
        ctx.extend(s.token_ids[:n])
        if not s.sample:
            assert s.drafts == 0 and s.next_token is not None  # the MTP reads the next token
            return
        accepted = []
        for d in s.token_ids[n:]:
            if model(rid, ctx) != d:
                break
            accepted.append(d)
            ctx.append(d)
        res.accepted[rid], res.sampled[rid] = accepted, model(rid, ctx)
        ahead, drafts = ctx + [res.sampled[rid]], []
        for j in range(self.k):
            t = model(rid, ahead)
            ahead.append(t)
            drafts.append((t + 1) % VOCAB if (int(rid[1:]) + j) % 3 == 1 else t)
        res.drafts[rid] = drafts


def run_drafting(sched: Scheduler, reqs, pp: int = 1, max_steps: int = 10_000):
    workers, in_flight, ended = DraftingWorkers(sched.cfg), deque(), sched.pop_ended()
    for _ in range(max_steps):
        while len(in_flight) < pp and (plan := sched.schedule()) is not None:
            for s in plan.seqs():
                req = sched.running[s.req_id]
                assert s.drafts <= min(len(req.drafts), req.max_new_tokens - len(req.output_ids) - 1)
                assert s.token_ids[len(s.token_ids) - s.drafts:] == req.drafts[:s.drafts]
            in_flight.append((plan, workers.execute(plan)))
        if not in_flight:
            break
        ended += sched.update(*in_flight.popleft())
        check_pages(sched, reqs)
    assert not sched.has_work
    return ended + sched.pop_ended()


def test_config_refuses_overlap_with_drafts():
    with pytest.raises(ValueError, match="exclude each other"):
        cfg(overlap=True, num_drafts=2)
    assert cfg(num_drafts=3).chain_rows == 2


def test_drafts_by_hand():
    """A decode step feeds the newest token and the drafts; accepted ones are outputs and
    computed, the rest are not; pages cover the chained rows."""
    s = Scheduler(cfg(num_drafts=2, page_size=4))
    r = make(0, 5, 10)
    s.add(r)
    plan = s.schedule()
    (step,) = plan.seqs()
    assert (step.start, len(step.token_ids), step.drafts, step.sample) == (0, 5, 0, True)
    assert len(step.new_pages) == 2  # 5 tokens + 1 chained row
    want, _ = reference("r0", r.prompt_ids, 10)
    s.update(plan, StepResult(plan.step_id, {"r0": want[0]}, drafts={"r0": [want[1], 99]}))
    assert r.output_ids == want[:1] and r.drafts == [want[1], 99] and r.num_computed == 5
    plan = s.schedule()
    (step,) = plan.seqs()
    assert step.token_ids == [want[0], want[1], 99] and step.drafts == 2 and step.start == 5
    s.update(plan, StepResult(plan.step_id, {"r0": want[2]}, accepted={"r0": [want[1]]},
                              drafts={"r0": [7, 8]}))
    assert r.output_ids == want[:3] and r.num_computed == 7  # x and the accepted draft
    assert len(r.pages) * 4 >= 5 + 3 + 1


@pytest.mark.parametrize("k", [1, 3])
def test_drafting_workloads_stay_exact(k):
    """Seeded workloads under page pressure, pp plans in flight, stops and max_new_tokens:
    with drafts accepted and rejected, every request ends with the reference tokens."""
    rng = random.Random(k)
    accepted = rejected = preemptions = 0
    for _ in range(80):
        page_size = rng.randint(1, 4)
        shapes = [(rng.randint(1, 14), rng.randint(1, 9)) for _ in range(rng.randint(2, 10))]
        biggest = max(-(-(n + m + k) // page_size) for n, m in shapes)
        c = cfg(columns=rng.randint(1, 2), page_size=page_size, num_drafts=k,
                pages_per_column=biggest + rng.randint(0, 3), max_model_len=64,
                max_tokens_per_step=rng.randint(k + 1, 24), max_seqs=rng.randint(1, 6),
                prefill_chunk=rng.choice([None, rng.randint(1, 8)]))
        s = Scheduler(c)
        reqs = [make(i, n, m, stop=[0] if i % 3 == 0 else None) for i, (n, m) in enumerate(shapes)]
        for r in reqs:
            s.add(r)
        ended = run_drafting(s, reqs, pp=rng.randint(1, 3))
        assert_outputs(reqs, ended)
        assert all(r.status is RequestStatus.FINISHED for r in reqs)
        assert all(p.num_free == p.num_pages for p in s.pools)
        accepted += sum(s.stats.drafts_accepted)
        rejected += sum(s.stats.drafts_proposed) - sum(s.stats.drafts_accepted)
        preemptions += s.stats.preemptions
    assert accepted > 100 and rejected > 50 and preemptions > 20
