"""Engine: a placement group of StageWorker actors and the pipeline schedule that drives them.

Sequences are split into micro-batches (one per pipeline stage by default, so every stage
has work); inside a micro-batch each expert-parallel rank owns every ep-th sequence
(data-parallel attention). Rank (s, r) hands its hidden states to rank (s+1, r) as a Ray
object; the last stage samples and only token ids come back to feed the first stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from ds3dist.config import ModelConfig
from ds3dist.generation import GenerationResult, SamplingParams, StopChecker, encode_prompts
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime.worker import StageWorker


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
    ):
        import ray

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
        self._ray = ray
        _ensure_ray(ray_address, num_cpus or max(8, self.layout.world_size))
        self.layout.check_resources(ray.available_resources())
        try:
            self._start(attn_form, execution, dtype, rendezvous_port, startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        from ds3dist.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.checkpoint)

    # ---- start-up ---------------------------------------------------------------------
    def _start(self, attn_form, execution, dtype, port, timeout):
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
                               "rendezvous")[0]
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
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=self.step_timeout_s)
            if not ready:
                raise self._failure(f"no step finished within {self.step_timeout_s:.0f} s")
            ref = ready[0]
            m, r, is_last = pending.pop(ref)
            try:
                value = self._ray.get(ref)
            except Exception as e:  # an actor died or raised
                raise self._failure(f"micro-batch {m} failed", e) from e
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
        values = self._get(list(refs), self.step_timeout_s, "scoring")
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
        for r, seqs in enumerate(owner_m):
            payload = [payload_of(i) for i in seqs]
            new_lens = [len(p) for p in payload]
            rows = keep[r] if keep is not None else None
            ref = self._stage(0, r).step.remote(m, payload, new_lens, want, rows)
            for s in range(1, self.layout.pp):
                if self.transfer == "p2p":  # sent by torch.distributed; watch for failures
                    last[ref] = (m, r, False)
                    ref = self._stage(s, r).step.remote(m, None, new_lens, want, rows)
                else:
                    ref = self._stage(s, r).step.remote(m, ref, new_lens, want, rows)
            last[ref] = (m, r, True)
        return last

    def _close(self, m: int) -> None:
        for a in self.actors:
            a.end.remote(m)

    # ---- failure, stats, shutdown -----------------------------------------------------
    def _get(self, refs, timeout, what):
        ray = self._ray
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        try:
            out = ray.get(ready)
        except Exception as e:
            raise self._failure(f"{what} failed", e) from e
        if not_ready:
            raise self._failure(f"{what} did not finish within {timeout:.0f} s")
        return out

    def _describe(self, rank: int) -> str:
        p = self.plans[rank]
        node = self.infos[rank]["node_ip"] if rank < len(self.infos) else "unknown node"
        return f"rank {rank} (stage {p.stage}, ep rank {p.ep_rank}) on node {node}"

    def _failure(self, what: str, cause: BaseException | None = None) -> EngineError:
        """Find the dead ranks, release everything, and build the error naming them."""
        ray = self._ray
        dead = []
        pings = {a.node_info.remote(): i for i, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=10)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:
                dead.append(pings[ref])
        who = "; ".join(self._describe(i) + " died" for i in sorted(dead)) or "no rank died"
        detail = f": {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}" if cause else ""
        self.shutdown()
        return EngineError(f"{what}; {who}{detail}")

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
        ray = self._ray
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _ensure_ray(address: str | None, num_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
