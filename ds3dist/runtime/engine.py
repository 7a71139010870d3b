"""Engine: a placement group of StageWorker actors and the pipeline schedule that drives them.

Sequences are split into micro-batches (one per pipeline stage by default, so every stage
has work); inside a micro-batch each expert-parallel rank owns every ep-th sequence
(data-parallel attention). Rank (s, r) hands its hidden states to rank (s+1, r) as a Ray
object; the last stage samples and only token ids come back to feed the first stage.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ds3dist.config import ModelConfig
from ds3dist.generation import GenerationResult, SamplingParams, StopChecker, encode_prompts
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime import cluster
from ds3dist.runtime.worker import StageWorker
from ds3dist.tokenizer import load_tokenizer

PING_TIMEOUT_S = 5.0  # a rank that cannot answer a ping in this time is stopped or hung


class EngineError(RuntimeError):
    """A rank failed or timed out; the message names rank, stage and node."""


class Engine:
    def __init__(
        self,
        checkpoint: str | os.PathLike,
        layout: ParallelLayout | None = None,
        execution: str = "bf16",
        dtype=None,
        *,
        attn_form: str = "absorbed",
        transfer: str = "ray",
        micro_batches: int | None = None,
        rendezvous_port: int | None = None,
        collective_timeout_s: float = 120.0,
        startup_timeout_s: float = 600.0,
        ray_address: str | None = None,
        num_cpus: int | None = None,
        connect_timeout_s: float = 30.0,
    ):
        self.checkpoint = str(Path(checkpoint).resolve())
        self.layout = layout or ParallelLayout()
        self.config = ModelConfig.from_json(self.checkpoint)
        self.plans = self.layout.plan(self.config)
        self.micro_batches = micro_batches or self.layout.pp
        if transfer not in ("ray", "p2p"):
            raise ValueError(f"runtime.transfer: must be 'ray' or 'p2p', got {transfer!r}")
        self.transfer = transfer
        self.collective_timeout_s = collective_timeout_s
        self.step_timeout_s = collective_timeout_s + 30.0
        self.actors: list = []
        self.infos: list[dict] = []
        self.pg = None
        self._calls: dict[int, dict] = {}  # micro-batch -> {ref: (rank, what)} in flight
        cluster.connect(ray_address, num_cpus or max(8, self.layout.world_size), connect_timeout_s)
        self.layout.check_resources(ray.available_resources())
        try:
            self._start(attn_form, execution, dtype, rendezvous_port, startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = load_tokenizer(self.checkpoint)

    # ---- start-up ---------------------------------------------------------------------
    def _start(self, attn_form, execution, dtype, port, timeout):
        gpu = self.layout.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in self.plans], strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            raise EngineError(
                f"could not place {len(self.plans)} ranks ({bundle} each) within {timeout:.0f} s; "
                f"Ray reports available {ray.available_resources()}"
            )
        remote_cls = ray.remote(StageWorker)
        dtype_name = str(dtype).replace("torch.", "") if dtype is not None else None
        for plan in self.plans:
            self.actors.append(
                remote_cls.options(
                    num_cpus=1, num_gpus=1 if gpu else 0, max_concurrency=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=plan.rank),
                    runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}},
                ).remote(plan, self.layout, self.checkpoint, execution, dtype_name, attn_form,
                         self.transfer)
            )
        self.infos = self._get([a.node_info.remote() for a in self.actors], timeout, "start-up")
        addr, port = self._get([self.actors[0].rendezvous_address.remote(port)], timeout,
                               "rendezvous", ranks=[0])[0]
        self.rendezvous = (addr, port)
        self._get([a.init_distributed.remote(addr, port, self.collective_timeout_s)
                   for a in self.actors], timeout, "process-group set-up")
        self.load_info = self._get([a.load.remote() for a in self.actors], timeout, "loading")

    # ---- generation -------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop=None) -> list[GenerationResult]:
        """Same arguments and results as `ds3dist.generate` on one process."""
        if not self.actors:
            raise EngineError("the engine has been shut down")
        ids = encode_prompts(self.tokenizer, prompts)
        n = len(ids)
        if n == 0:
            return []
        limit = self.config.max_position_embeddings
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} "
                                 f"exceed max_position_embeddings {limit}")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        checkers = [StopChecker(self.tokenizer, stop, max_new_tokens) for _ in ids]
        out_ids: list[list[int]] = [[] for _ in ids]
        ep = self.layout.ep
        owner = self._open(ids, max_new_tokens, sampling.as_dict())
        m_count = len(owner)
        active = [[list(row) for row in owner_m] for owner_m in owner]  # cache rows, per (m, r)
        pending: dict = {}
        for m in range(m_count):
            pending.update(self._submit(m, active[m], lambda i: ids[i]))
        waiting = {m: ep for m in range(m_count)}
        got: dict[int, dict[int, list[int]]] = {m: {} for m in range(m_count)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.step_timeout_s)
            if not ready:
                raise self._failure(f"no step finished within {self.step_timeout_s:.0f} s",
                                    calls=self._in_flight())
            ref = ready[0]
            m, r, is_last = pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # an actor died or raised
                raise self._failure(f"micro-batch {m} failed", e, self._in_flight()) from e
            if not is_last:
                continue
            got[m][r] = value
            waiting[m] -= 1
            if waiting[m]:
                continue
            keep = []  # per ep rank: cache rows of the sequences still running
            for r2 in range(ep):
                for i, tok in zip(active[m][r2], got[m][r2]):
                    out_ids[i].append(tok)
                    checkers[i].update(out_ids[i])
                keep.append([k for k, i in enumerate(active[m][r2]) if not checkers[i].done])
                active[m][r2] = [active[m][r2][k] for k in keep[-1]]
            if not any(active[m]):
                self._close(m)
                continue
            waiting[m] = ep
            got[m] = {}
            pending.update(self._submit(m, active[m], lambda i: [out_ids[i][-1]], keep=keep))
        return [checkers[i].result(ids[i], out_ids[i]) for i in range(n)]

    def score(self, prompts) -> list:
        """Float32 logits [len_i, vocab] of every prompt position (a full causal forward)."""
        ids = encode_prompts(self.tokenizer, prompts)
        owner = self._open(ids, 0, {})
        refs = {}
        for m in range(len(owner)):
            refs.update(self._submit(m, owner[m], lambda i: ids[i], want="logits"))
        flight = self._in_flight()
        values = self._get(list(refs), self.step_timeout_s, "scoring",
                           ranks=[flight[ref][0] for ref in refs])
        out = [None] * len(ids)
        for (m, r, is_last), value in zip(refs.values(), values):
            if is_last:
                for i, logits in zip(owner[m][r], value):
                    out[i] = logits
        for m in range(len(owner)):
            self._close(m)
        return out

    # ---- the pipeline schedule --------------------------------------------------------
    def _stage(self, s: int, r: int):
        return self.actors[self.layout.rank_of(s, r)]

    def _open(self, ids: list[list[int]], max_new_tokens: int, sampling: dict) -> list:
        """Split sequences into micro-batches x ep ranks and open their caches.

        Returns owner[m][r]: the sequence indices of micro-batch m on ep rank r."""
        n, ep = len(ids), self.layout.ep
        m_count = max(1, min(self.micro_batches, n))
        owner = [[list(range(n))[m::m_count][r::ep] for r in range(ep)] for m in range(m_count)]
        refs = []
        for m in range(m_count):
            for r in range(ep):
                seqs = owner[m][r]
                max_len = max((len(ids[i]) for i in seqs), default=0) + max_new_tokens
                for s in range(self.layout.pp):
                    refs.append(self._stage(s, r).begin.remote(m, seqs, max_len, sampling))
        self._get(refs, self.step_timeout_s, "generation set-up")
        return owner

    def _submit(self, m: int, owner_m: list[list[int]], payload_of, want: str = "sample",
                keep: list[list[int]] | None = None) -> dict:
        """Queue one step of micro-batch m on every rank; keep[r]: the cache rows that stay
        (finished sequences leave every stage's cache before the step).

        Returns ref -> (m, r, is_last_stage): the last stage's results, and with p2p
        transfer the earlier stages' refs too, so that a failure anywhere is seen at once."""
        last = {}
        calls = self._calls[m] = {}  # the refs of this round's calls, for failure reports
        for r, seqs in enumerate(owner_m):
            payload = [payload_of(i) for i in seqs]
            new_lens = [len(p) for p in payload]
            rows = keep[r] if keep is not None else None
            ref = self._stage(0, r).step.remote(m, payload, new_lens, want, rows)
            calls[ref] = (self.layout.rank_of(0, r), f"a step of micro-batch {m}")
            for s in range(1, self.layout.pp):
                if self.transfer == "p2p":  # sent by torch.distributed; watch for failures
                    last[ref] = (m, r, False)
                    ref = self._stage(s, r).step.remote(m, None, new_lens, want, rows)
                else:
                    ref = self._stage(s, r).step.remote(m, ref, new_lens, want, rows)
                calls[ref] = (self.layout.rank_of(s, r), f"a step of micro-batch {m}")
            last[ref] = (m, r, True)
        return last

    def _in_flight(self) -> dict:
        return {ref: who for calls in self._calls.values() for ref, who in calls.items()}

    def _close(self, m: int) -> None:
        self._calls.pop(m, None)
        for a in self.actors:
            a.end.remote(m)

    # ---- failure, stats, shutdown -----------------------------------------------------
    def _get(self, refs, timeout, what, ranks=None):
        """ray.get of one call per rank (ranks[i] made refs[i]; default: rank i), bounded."""
        calls = {ref: (rank, what) for ref, rank in zip(refs, ranks or range(len(refs)))}
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        try:
            out = ray.get(ready)
        except Exception as e:
            raise self._failure(f"{what} failed", e, calls) from e
        if not_ready:
            raise self._failure(f"{what} did not finish within {timeout:.0f} s", calls=calls)
        return out

    def _describe(self, rank: int) -> str:
        p = self.plans[rank]
        node = self.infos[rank]["node_ip"] if rank < len(self.infos) else "unknown node"
        return f"rank {rank} (stage {p.stage}, ep rank {p.ep_rank}) on node {node}"

    def _failure(self, what: str, cause: BaseException | None = None,
                 calls: dict | None = None) -> EngineError:
        """Name every rank's part in a failure (its error whole, dead, or stopped and behind),
        release everything, and return the EngineError to raise."""
        lines = _call_reports(calls or {})
        first = _cause_text(cause) if cause is not None else None
        if first is not None and not any(first in text for text in lines.values()):
            lines.setdefault(-1, first)
        for rank, state in self._ping().items():
            if state == "dead":
                lines[rank] = "died (its actor is gone)"
            elif state == "silent":
                note = f"did not answer a ping within {PING_TIMEOUT_S:.0f} s"
                lines[rank] = f"{lines[rank]}; {note}" if rank in lines else note
        self.shutdown()
        if not lines:
            return EngineError(f"{what}; every rank answers, none reported an error")
        body = "\n".join(f"  {self._describe(r) if r >= 0 else 'cause'}: {text}"
                         for r, text in sorted(lines.items()))
        return EngineError(f"{what}:\n{body}")

    def _ping(self) -> dict[int, str]:
        """rank -> 'ok', 'dead' (actor gone) or 'silent' (no answer: stopped, hung, or busy)."""
        pings = {a.node_info.remote(): i for i, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_TIMEOUT_S)
        state = {i: "silent" for i in pings.values()}
        for ref in ready:
            try:
                ray.get(ref)
                state[pings[ref]] = "ok"
            except Exception:
                state[pings[ref]] = "dead"
        return state

    def stats(self) -> dict:
        ranks = self._get([a.stats.remote() for a in self.actors], self.step_timeout_s, "stats")
        load: dict[int, list[int]] = {}
        for st in ranks:
            for layer_id, d in st.get("dispatch", {}).items():
                row = load.setdefault(int(layer_id), [0] * self.config.n_routed_experts)
                for e, c in enumerate(d["received_per_expert"]):
                    row[e] += c
        stage_s = [0.0] * self.layout.pp
        for st in ranks:
            stage_s[st["stage"]] = max(stage_s[st["stage"]], st["busy_seconds"])
        return {"ranks": ranks, "expert_load": dict(sorted(load.items())),
                "stage_seconds": stage_s}

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _cause_text(e: BaseException) -> str:
    """The exception raised on a rank, type and message whole (Ray's wrapper removed)."""
    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    if isinstance(e, ray.exceptions.RayActorError):
        return "died (its actor is gone)"
    return f"{type(e).__name__}: {e}".rstrip()


def _call_reports(calls: dict) -> dict[int, str]:
    """rank -> what became of its calls: its error, or that it has not finished one."""
    if not calls:
        return {}
    done, running = ray.wait(list(calls), num_returns=len(calls), timeout=0)
    out: dict[int, str] = {}
    first_with: dict[str, int] = {}  # a later stage fails with its input's error: say so
    for ref in sorted(done, key=lambda ref: calls[ref][0]):
        try:
            ray.get(ref)
        except Exception as e:
            rank, text = calls[ref][0], _cause_text(e)
            if rank in out:
                continue
            src = first_with.setdefault(text, rank)
            out[rank] = text if src == rank else f"the same error as rank {src} (an input)"
    for ref in running:
        rank, what = calls[ref]
        out.setdefault(rank, f"has not finished {what}: behind the other ranks (stopped, hung "
                             f"or waiting on an earlier stage)")
    return out
