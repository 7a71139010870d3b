"""Continuous batching over a paged cache, one page pool per expert-parallel column.

Each schedule() builds one StepPlan under a per-column token budget. Per column:
  1. running requests one token from their target (decode), oldest first;
  2. running requests further behind (chunked prefill or recompute), oldest first;
  3. waiting requests, FIFO, each to the column with the most free pages (ties: lowest) that
     has a free sequence slot and budget left; the head of the queue blocks the rest.
A request gets min(pending tokens, budget left, prefill chunk) tokens, and pages for those
tokens only. When its column has too few free pages it takes fewer tokens; when it can take
none it preempts (recompute) the newest running request of its column that is not in flight,
or waits if that would be itself. A column that preempted admits nobody that step. Requests
in a plan not yet returned are otherwise skipped, so up to pp plans can be in flight.

With `overlap` (one pipeline stage: the rank that samples a token also embeds it), a request
whose only step in flight samples gets its next decode step in this plan too, the token
written FILL for the worker to fill in, so that the workers never wait for the driver; that
step takes free pages only, never preempts, and is wasted when the token in flight ends the
request.

With speculative decoding (`num_drafts` k > 0), a decode step feeds the request's newest
token and the drafts the step before proposed (fewer when the budget, the pages or
max_new_tokens leave less room); the result says which were accepted, and only those count
as computed: rejected positions need no rewind, their cache rows are overwritten later. A
sampling step reserves pages for k - 1 positions past its last, where the MTP module's
chained drafts write their rows.

Every request that ends (REJECTED at add, FINISHED, FAILED, aborted) is reported exactly once,
by the next update() or pop_ended(); one that ends while a plan still holds it ends when
that plan returns. Ids of ended or preempted requests the workers know go into the next
plan's `freed`.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from ds3dist.core.options import ServingOptions
from ds3dist.core.pages import PagePool
from ds3dist.core.plan import FILL, SeqStep, StepPlan, StepResult
from ds3dist.core.request import Request, RequestStatus

WAITING, RUNNING = RequestStatus.WAITING, RequestStatus.RUNNING


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    columns: int = 1
    pages_per_column: int
    page_size: int = ServingOptions.page_size
    max_tokens_per_step: int = ServingOptions.max_tokens_per_step  # per column
    max_seqs: int = ServingOptions.max_seqs  # running sequences per column
    prefill_chunk: int | None = None  # None: max_tokens_per_step // 2 while others wait
    max_model_len: int
    overlap: bool = False  # decode steps ahead of their token (workers fill it in)
    num_drafts: int = 0  # speculative decoding: drafts per request and step (0: off)

    def __post_init__(self) -> None:
        for name in ("columns", "pages_per_column", "page_size", "max_tokens_per_step",
                     "max_seqs", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int)
                                               or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {self.prefill_chunk!r}")
        if not isinstance(self.num_drafts, int) or self.num_drafts < 0:
            raise ValueError(f"num_drafts must be an integer >= 0, got {self.num_drafts!r}")
        if self.overlap and self.num_drafts:
            raise ValueError("overlap and speculative drafts exclude each other: a step's "
                             "drafts are known only when the step before has returned")

    @classmethod
    def of(cls, serving: ServingOptions, *, columns: int, pages_per_column: int,
           max_model_len: int, num_drafts: int = 0) -> SchedulerConfig:
        """The scheduler of an engine that serves as `serving` says."""
        return cls(columns=columns, pages_per_column=pages_per_column,
                   page_size=serving.page_size, max_tokens_per_step=serving.max_tokens_per_step,
                   max_seqs=serving.max_seqs, prefill_chunk=serving.prefill_chunk,
                   max_model_len=max_model_len, num_drafts=num_drafts)

    @property
    def chain_rows(self) -> int:
        """Cache rows a sampling step writes past its last position (chained drafts)."""
        return max(0, self.num_drafts - 1)


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    tokens_scheduled: int = 0
    sample_steps: int = 0  # sequence steps that sampled (main-model steps of a request)
    output_tokens: int = 0  # tokens they produced (accepted drafts included)
    drafts_proposed: list[int] = field(default_factory=list)  # per draft position
    drafts_accepted: list[int] = field(default_factory=list)

    def speculative(self) -> dict:
        """Acceptance per draft position, tokens per sampling step and its inverse."""
        return {"acceptance_per_position": [round(a / p, 4) if p else None for a, p in
                                            zip(self.drafts_accepted, self.drafts_proposed)],
                "tokens_per_step": round(self.output_tokens / self.sample_steps, 4)
                if self.sample_steps else None,
                "steps_per_token": round(self.sample_steps / self.output_tokens, 4)
                if self.output_tokens else None}

    def add(self, other: SchedulerStats) -> None:
        """Add another scheduler's counters (per-position lists element by element)."""
        for name in ("steps", "preemptions", "tokens_scheduled", "sample_steps", "output_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("drafts_proposed", "drafts_accepted"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine += [0] * max(0, len(theirs) - len(mine))
            for k, v in enumerate(theirs):
                mine[k] += v

    def count(self, proposed: int, accepted: int, produced: int) -> None:
        """One sampling step: drafts sent and accepted, tokens appended."""
        grow = max(0, proposed - len(self.drafts_proposed))
        self.drafts_proposed += [0] * grow
        self.drafts_accepted += [0] * grow
        for i in range(proposed):
            self.drafts_proposed[i] += 1
            self.drafts_accepted[i] += i < accepted
        self.sample_steps += 1
        self.output_tokens += produced


@dataclass
class _Column:
    """One column's share of the step being built."""
    index: int
    budget: int
    seqs: int = 0  # running requests on the column
    preempted: bool = False
    steps: dict[str, SeqStep] = field(default_factory=dict)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.pools = [PagePool(cfg.pages_per_column, cfg.page_size) for _ in range(cfg.columns)]
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._live: dict[str, Request] = {}  # waiting + running
        self._arrivals = itertools.count()
        self._step_ids = itertools.count()
        self._outstanding: dict[int, StepPlan] = {}
        self._known: set[str] = set()  # ids whose state the workers hold
        self._to_free: list[str] = []  # the next plan's `freed`
        self._ending: dict[str, RequestStatus] = {}  # ended while in flight: when it returns
        self._ended: list[Request] = []
        self.appended: list[tuple[Request, int]] = []  # of the last update: (request, tokens)

    @property
    def has_work(self) -> bool:
        return bool(self._live)

    # ---- requests in and out ----------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request. One that can never run is REJECTED (req.error says why) and one
        with max_new_tokens == 0 FINISHED ('length') at once; both are reported by the next
        update()/pop_ended() like any other end. ValueError for a live id or a used request."""
        if req.id in self._live:
            raise ValueError(f"request id {req.id!r} is already queued or running")
        if req.status is not WAITING or req.output_ids or req.num_computed or req.pages:
            raise ValueError(f"request {req.id!r} was already scheduled; submit a new Request")
        req.arrival = next(self._arrivals)
        req.error = self._rejection(req)
        if req.error is not None:
            self._end(req, RequestStatus.REJECTED)
        elif req.max_new_tokens == 0:
            req.finish_reason = "length"
            self._end(req, RequestStatus.FINISHED)
        else:
            self._live[req.id] = req
            self.waiting.append(req)

    def _rejection(self, req: Request) -> str | None:
        need = len(req.prompt_ids) + req.max_new_tokens
        if need > self.cfg.max_model_len:
            return (f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) "
                    f"= {need} exceeds max_model_len {self.cfg.max_model_len}")
        pages = self.pools[0].pages_for(need + self.cfg.chain_rows)
        if pages > self.cfg.pages_per_column:
            return (f"can never fit the cache pool: needs {pages} pages of {self.cfg.page_size} "
                    f"tokens, a column has {self.cfg.pages_per_column}")
        return None

    def abort(self, req_id: str) -> bool:
        """End a live request with finish_reason 'abort' (at once, or when its in-flight step
        returns). False when no live request has this id."""
        req = self._live.get(req_id)
        if req is None:
            return False
        if req_id not in self._ending:
            req.finish_reason = "abort"
            self._end(req, RequestStatus.FINISHED)
        return True

    def pop_ended(self) -> list[Request]:
        """Requests that ended since the last update()/pop_ended()."""
        ended, self._ended = self._ended, []
        return ended

    def _end(self, req: Request, status: RequestStatus) -> None:
        if req.in_flight:  # its pages are in use until the plans holding it return
            self._ending[req.id] = status
            return
        if req.pages:
            self.pools[req.column].free(req.pages)
            req.pages = []
        self._forget(req.id)
        if self._live.pop(req.id, None) is not None and req.status is WAITING:
            self.waiting.remove(req)
        self.running.pop(req.id, None)
        req.status = status
        self._ended.append(req)

    def _forget(self, req_id: str) -> None:
        """Workers must drop this request's state before the next plan."""
        if req_id in self._known:
            self._known.discard(req_id)
            self._to_free.append(req_id)

    # ---- building a step --------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step, or None when nothing can run now (no work, or all in flight or
        blocked). Ids to free carry over to the next plan when None is returned."""
        cols = [_Column(c, self.cfg.max_tokens_per_step) for c in range(self.cfg.columns)]
        for req in self.running.values():
            cols[req.column].seqs += 1
        ready = sorted((r for r in self.running.values() if not r.in_flight), key=_arrival)
        for req in [r for r in ready if r.num_pending == 1] + [r for r in ready if r.num_pending > 1]:
            if req.status is RUNNING:  # not preempted by an older one meanwhile
                self._place(req, cols[req.column])
        if self.cfg.overlap:
            for req in sorted(self.running.values(), key=_arrival):
                if req.in_flight == 1 and req.sampling and req.id not in self._ending \
                        and len(req.output_ids) + 2 <= req.max_new_tokens:
                    self._overlap(req, cols[req.column])
        self._admit(cols)
        return self._emit(cols)

    def _chunk_cap(self, req: Request) -> int:
        if self.cfg.prefill_chunk is not None:
            return self.cfg.prefill_chunk
        others_wait = len(self.waiting) > (1 if req.status is WAITING else 0)
        budget = self.cfg.max_tokens_per_step
        return max(1, budget // 2) if others_wait else budget

    def _capacity(self, req: Request, pool: PagePool) -> int:
        """Tokens req can run now without more pages than the pool has free."""
        free_rows = (len(req.pages) + pool.num_free) * pool.page_size
        return free_rows - req.num_computed - self.cfg.chain_rows

    def _want(self, req: Request, col: _Column) -> int:
        """Tokens req would run this step: its pending ones (and its drafts), capped."""
        drafts = len(req.drafts) if req.num_pending == 1 else 0
        drafts = min(drafts, req.max_new_tokens - len(req.output_ids) - 1)
        return min(req.num_pending + max(0, drafts), self._chunk_cap(req), col.budget)

    def _place(self, req: Request, col: _Column) -> None:
        """Schedule a running request, preempting newer ones for pages if it must."""
        want = self._want(req, col)
        while want > 0:
            n = min(want, self._capacity(req, self.pools[col.index]))
            if n > 0:
                self._add_step(req, col, n)
                return
            victim = max((r for r in self.running.values()
                          if r.column == col.index and not r.in_flight), key=_arrival)
            if victim is req:
                return  # it is the newest: it waits
            self._preempt(victim, col)

    def _preempt(self, victim: Request, col: _Column) -> None:
        """Recompute later: drop the victim's pages (and its step in this plan, if any)."""
        step = col.steps.pop(victim.id, None)
        if step is not None:
            col.budget += len(step.token_ids)
        self.pools[col.index].free(victim.pages)
        victim.pages, victim.num_computed, victim.column, victim.drafts = [], 0, None, []
        victim.status = WAITING
        del self.running[victim.id]
        self._forget(victim.id)
        bisect.insort(self.waiting, victim, key=_arrival)
        col.seqs -= 1
        col.preempted = True
        self.stats.preemptions += 1

    def _overlap(self, req: Request, col: _Column) -> None:
        """The decode step after the token in flight, if budget and free pages allow."""
        pool, start = self.pools[col.index], req.num_tokens  # the in-flight token's position
        need = pool.pages_for(start + 1) - len(req.pages)
        if col.budget < 1 or need > pool.num_free:
            return
        new_pages = pool.allocate(need)
        req.pages.extend(new_pages)
        col.budget -= 1
        col.steps[req.id] = SeqStep(req_id=req.id, token_ids=[FILL], start=start,
                                    new_pages=new_pages, sample=True, params=None,
                                    output_index=len(req.output_ids) + 1)

    def _admit(self, cols: list[_Column]) -> None:
        """Admit waiting requests FIFO while the head fits somewhere."""
        while self.waiting:
            req = self.waiting[0]
            open_cols = [c for c in cols
                         if c.seqs < self.cfg.max_seqs and c.budget > 0 and not c.preempted]
            if not open_cols:
                return
            col = max(open_cols, key=lambda c: (self.pools[c.index].num_free, -c.index))
            n = min(self._want(req, col), self._capacity(req, self.pools[col.index]))
            if n <= 0:
                return
            self.waiting.pop(0)
            req.status, req.column = RUNNING, col.index
            self.running[req.id] = req
            col.seqs += 1
            self._add_step(req, col, n)

    def _add_step(self, req: Request, col: _Column, n: int) -> None:
        """n tokens from num_computed: pending ones first, then drafts."""
        pool = self.pools[col.index]
        start = req.num_computed
        fed = min(n, req.num_pending)
        sample = start + fed == req.num_tokens
        rows = start + n + (self.cfg.chain_rows if sample else 0)
        new_pages = pool.allocate(max(0, pool.pages_for(rows) - len(req.pages)))
        req.pages.extend(new_pages)
        col.budget -= n
        spec = self.cfg.num_drafts > 0
        col.steps[req.id] = SeqStep(
            req_id=req.id, token_ids=req.token_slice(start, start + fed) + req.drafts[:n - fed],
            start=start, new_pages=new_pages, sample=sample,
            params=req.params if start == 0 else None, output_index=len(req.output_ids),
            drafts=n - fed, next_token=req.token_slice(start + fed, start + fed + 1)[0]
            if spec and not sample else None)

    def _emit(self, cols: list[_Column]) -> StepPlan | None:
        if not any(c.steps for c in cols):
            return None
        plan = StepPlan(next(self._step_ids), [list(c.steps.values()) for c in cols],
                        self._to_free)
        self._to_free = []
        for s in plan.seqs():
            req = self.running[s.req_id]
            req.in_flight += 1
            req.sampling = s.sample
            self._known.add(s.req_id)
        self._outstanding[plan.step_id] = plan
        self.stats.steps += 1
        self.stats.tokens_scheduled += plan.num_tokens
        return plan

    # ---- applying a returned step -----------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a returned step; the requests that ended since the last call. `appended`
        then lists (request, tokens appended) of this step."""
        plan = self._check_result(plan, result)
        self.appended = []
        for s in plan.seqs():
            req = self._live[s.req_id]
            req.in_flight -= 1
            if s.req_id in self._ending:  # its result is not used
                if not req.in_flight:
                    self._end(req, self._ending.pop(s.req_id))
            elif s.req_id in result.failed or (s.sample and s.req_id not in result.sampled):
                req.error = result.failed.get(
                    s.req_id, f"step {plan.step_id} returned no token for a sampling step")
                self._end(req, RequestStatus.FAILED)
            else:
                accepted = result.accepted.get(s.req_id, [])[:s.drafts]
                req.num_computed = s.start + len(s.token_ids) - s.drafts + len(accepted)
                if s.sample:
                    self._sampled(req, s, accepted, result)
        return self.pop_ended()

    def _sampled(self, req: Request, s: SeqStep, accepted: list[int], result: StepResult) -> None:
        """Append a sampling step's tokens (accepted drafts, then its own) until one ends the
        request; keep its drafts for the next step."""
        tokens = [*accepted, result.sampled[s.req_id]]
        produced = 0
        for token in tokens:
            produced += 1
            if self._append(req, token):
                break
        else:
            req.drafts = list(result.drafts.get(s.req_id, []))[:self.cfg.num_drafts]
        self.appended.append((req, produced))
        if self.cfg.num_drafts:
            self.stats.count(s.drafts, len(accepted), produced)

    def stop_after(self, req: Request, keep: int) -> None:
        """A stop string ended `req` with its first `keep` outputs (the loop checks text; see
        ds3dist.text): the later ones are dropped, finish_reason 'stop'. A request that has
        ended in the same update (at a later token) is corrected in place."""
        dropped = len(req.output_ids) - keep
        del req.output_ids[keep:]
        req.finish_reason = "stop"
        if self.cfg.num_drafts:
            self.stats.output_tokens -= dropped
        if req.id in self._live and req.id not in self._ending:
            self._end(req, RequestStatus.FINISHED)

    def _check_result(self, plan: StepPlan, result: StepResult) -> StepPlan:
        """The outstanding plan `plan` names, once it is known to match `result`."""
        mine = self._outstanding.get(plan.step_id)
        if mine is None:
            raise ValueError(f"step {plan.step_id} is not in flight")
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given for step {plan.step_id}")
        sampling = {s.req_id for s in mine.seqs() if s.sample}
        stray = (set(result.sampled) - sampling) | (set(result.failed) - {s.req_id for s in mine.seqs()})
        if stray:
            raise ValueError(f"step {plan.step_id}: result names requests it did not sample or "
                             f"run: {sorted(stray)}")
        del self._outstanding[plan.step_id]
        return mine

    def _append(self, req: Request, token: int) -> bool:
        """Append one output token; whether it ended the request (a stop token id, or
        max_new_tokens)."""
        req.output_ids.append(int(token))
        if req.output_ids[-1] in req.stop_ids:
            req.finish_reason = "stop"
        elif len(req.output_ids) >= req.max_new_tokens:
            req.finish_reason = "length"
        else:
            return False
        self._end(req, RequestStatus.FINISHED)
        return True


def _arrival(req: Request) -> int:
    return req.arrival
