"""Engine: a placement group of StageWorker actors driven by the serving loop.

The engine starts the actors (placement group, process groups, each rank loading its share),
gives every rank a paged cache (`cache_gb` per rank; the same number of pages on every stage
of an expert-parallel column), and runs `ds3dist.core.loop.serve` with a Scheduler over
`columns = ep` and an executor (compiled graph, or classic actor calls): the one loop that one
process runs too. Requests go in as a stream and come out as they end.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ds3dist.config import ModelConfig
from ds3dist.core.engine import EngineStats, Rebalance
from ds3dist.model.cache import PagedCache
from ds3dist.model.options import DEFAULT_ATTN_FORM
from ds3dist.parallel.layout import LayoutError, ParallelLayout
from ds3dist.runtime import cluster, progress
from ds3dist.runtime.control import ClassicExecutor, CompiledExecutor, cause_text, columns_of
from ds3dist.runtime.offload import remove_swap_dirs
from ds3dist.runtime.options import OffloadOptions, RuntimeOptions
from ds3dist.runtime.worker import StageWorker
from ds3dist.core.loop import serve
from ds3dist.core.options import BalanceOptions, ServingOptions
from ds3dist.runtime.handoff import P2P_ENV
from ds3dist.runtime.rebalance import RebalancingExecutor, new_placement
from ds3dist.core.params import SamplingParams
from ds3dist.core.request import Request
from ds3dist.core.scheduler import Scheduler, SchedulerConfig
from ds3dist.core.options import SpeculativeConfig, num_drafts
from ds3dist.text import GenerationResult, generate_with
from ds3dist.tokenizer import load_tokenizer

PING_TIMEOUT_S = 5.0  # a rank that cannot answer a ping in this time is stopped or hung
STEP_SLACK_S = 30.0  # a step may take the collective timeout and this much more
RESOURCE_POLL_S = 1.0
SHUTDOWN_CALL_S = 10.0  # each cluster call of a shutdown gives up after this


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
        serving: ServingOptions | None = None,
        runtime: RuntimeOptions | None = None,
        speculative: SpeculativeConfig | None = None,
        offload: OffloadOptions | None = None,
        balance: BalanceOptions | None = None,
        attn_form: str = DEFAULT_ATTN_FORM,
        fault_ids: tuple[str, ...] = (),
        resource_wait_s: float = 0.0,
        ranks_in_cluster: int | None = None,
    ):
        """ranks_in_cluster: every rank the cluster will hold (replicas x ranks; default this
        engine's), which sizes a new local cluster and each rank's share of the cores."""
        self.checkpoint = str(Path(checkpoint).resolve())
        self.layout = layout or ParallelLayout()
        self.config = ModelConfig.from_json(self.checkpoint)
        self.plans = self.layout.plan(self.config)
        self.columns = columns_of(self.layout)
        self.serving = serving or ServingOptions()
        self.speculative = speculative
        self.offload = offload
        self.balance = balance or BalanceOptions()
        self.rebalances: list[Rebalance] = []
        self.num_drafts = num_drafts(speculative)
        if self.num_drafts and not self.config.mtp_layer_ids:
            raise EngineError("sampling.speculative: the model has no MTP layer "
                              "(num_nextn_predict_layers = 0)")
        if self.serving.control == "local":
            raise EngineError("runtime.control=local runs the model in one process without Ray "
                              "(LocalEngine, which the launch uses for it), not in an Engine")
        self.runtime = runtime or RuntimeOptions()
        self.step_timeout_s = self.runtime.collective_timeout_s + STEP_SLACK_S
        self.actors: list = []
        self.infos: list[dict] = []
        self.pg = None
        self.executor = None  # a compiled graph holds the actors while it lives (stats frees it)
        self.scheduler: Scheduler | None = None  # of the last stream
        ranks = ranks_in_cluster or self.layout.world_size
        self.cpus_per_rank = self.runtime.rank_cpus(ranks)
        self.threads_per_rank = self.runtime.rank_threads(ranks, self.serving.threads)
        self.engine_id = uuid.uuid4().hex  # keys the ranks' published progress
        cluster.connect(self.runtime.address, self.runtime.cluster_cpus(ranks),
                        self.runtime.connect_timeout_s)
        self._await_resources(resource_wait_s)
        try:
            self._start(attn_form, execution, dtype, fault_ids)
            self.sched_cfg = self._setup_caches(self.runtime.startup_timeout_s)
            self.executor = self._executor()  # compiled here: not in the first step's time
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = load_tokenizer(self.checkpoint)

    # ---- start-up ---------------------------------------------------------------------
    def _await_resources(self, wait_s: float) -> None:
        """Until the cluster has a CPU or GPU for every rank, for at most wait_s (a rebuilt
        replica waits for its lost node to come back; a first start fails at once)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.layout.check_resources(ray.available_resources())
                return
            except LayoutError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(RESOURCE_POLL_S)

    def _start(self, attn_form, execution, dtype, fault_ids):
        timeout = self.runtime.startup_timeout_s
        gpu = self.layout.device == "cuda"
        cpus = self.cpus_per_rank
        bundle = {"GPU": 1, "CPU": cpus} if gpu else {"CPU": cpus}
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
                    num_cpus=cpus, num_gpus=1 if gpu else 0, max_concurrency=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=plan.rank),
                    runtime_env={"env_vars": {
                        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                        P2P_ENV: os.environ.get(P2P_ENV, "")}},
                ).remote(plan, self.layout, self.checkpoint, execution, dtype_name, attn_form,
                         self.threads_per_rank, tuple(fault_ids), self.engine_id, self.speculative,
                         self.offload)
            )
        self.infos = self._get([a.node_info.remote() for a in self.actors], timeout, "start-up")
        addr, port = self._get([self.actors[0].rendezvous_address.remote(
            self.runtime.rendezvous_port)], timeout, "rendezvous", ranks=[0])[0]
        self._get([a.init_distributed.remote(addr, port, self.runtime.collective_timeout_s)
                   for a in self.actors], timeout, "process-group set-up")
        self.load_info = self._get([a.load.remote() for a in self.actors], timeout, "loading")

    def _setup_caches(self, timeout: float) -> SchedulerConfig:
        """Pages per column: what the cache bytes hold on the stage with the most layers
        (every stage of a column uses the same page ids)."""
        opt, cfg = self.serving, self.config
        dtype = getattr(torch, self.load_info[0].dtype.removeprefix("torch."))
        free = (min(i.cuda_free_bytes for i in self.load_info)
                if self.layout.device == "cuda" else None)
        nbytes = opt.cache_bytes(free)
        layers = max(len(p.layers) + (len(cfg.mtp_layer_ids) if p.head and self.num_drafts else 0)
                     for p in self.plans)
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        pages = PagedCache.pages_for_bytes(nbytes, layers, opt.page_size, width, dtype)
        if pages < 1:
            raise EngineError(f"runtime.cache_gb: {nbytes / 1e9:.3g} GB holds no page of "
                              f"{opt.page_size} tokens x {layers} layers")
        self._get([a.setup_cache.remote(pages, opt.page_size, opt.cuda_graphs,
                                        self.balance.window)
                   for a in self.actors], timeout, "cache set-up")
        return SchedulerConfig.of(opt, columns=self.layout.ep, pages_per_column=pages,
                                  max_model_len=cfg.max_position_embeddings,
                                  num_drafts=self.num_drafts)

    def _executor(self):
        control = self.serving.control
        if control == "auto":
            control = "compiled" if self.layout.device == "cuda" else "classic"
        if control == "compiled":
            return CompiledExecutor(self.actors, self.columns, self._failure)
        return ClassicExecutor(self.actors, self.columns, self._failure)

    # ---- generation -------------------------------------------------------------------
    def stream(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Run requests (each with its own sampling parameters and stop rule) to their end;
        yield each as it ends: finished, rejected at admission, or failed on its own."""
        if not self.actors:
            raise EngineError("the engine has been shut down")
        if self.executor is None:
            self.executor = self._executor()
        overlap = self.executor.overlap and not self.num_drafts  # drafts need the step before
        self.scheduler = Scheduler(replace(self.sched_cfg, overlap=overlap))
        executor = self.executor
        if self.balance.step_interval is not None and self.layout.ep > 1:
            executor = RebalancingExecutor(executor, self.balance.step_interval,
                                           self.rebalance, self.step_timeout_s)
        yield from serve(self.scheduler, executor, requests, timeout_s=self.step_timeout_s)

    def rebalance(self, step: int):
        """Between steps (none in flight): place the experts anew from the ranks' windows of
        expert load and have every rank take its new experts. Returns the executor to go on
        with (a compiled graph, which holds the actors, is made anew)."""
        t0 = time.perf_counter()
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        timeout = self.runtime.startup_timeout_s
        ranks = self._get([a.stats.remote() for a in self.actors], timeout, "rebalance: load")
        window: dict[int, list[int]] = {}
        for st in ranks:
            for layer_id, counts in st.window_load.items():
                window[layer_id] = [a + b for a, b in zip(window.get(layer_id, [0] * len(counts)),
                                                          counts)]
        place, before, after = new_placement(window, self.layout.placement_for(self.config),
                                             self.config, self.balance)
        moved = self._get([a.apply_placement.remote(place, self.balance.transfer)
                           for a in self.actors], timeout, "rebalance: moving experts")
        self.layout = replace(self.layout, placement=place)
        self.rebalances.append(Rebalance(
            step, time.perf_counter() - t0, before, after,
            max(st.window_steps for st in ranks), sum(m["experts_read"] for m in moved),
            sum(m["bytes_read"] for m in moved), sum(m["experts_received"] for m in moved),
            self.balance.transfer, max(m["seconds"] for m in moved)))
        self.executor = self._executor()
        return self.executor

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop=None) -> list[GenerationResult]:
        """Same arguments and results as `ds3dist.generate` on one process."""
        return generate_with(self, self.tokenizer, self.config, prompts, max_new_tokens,
                             SamplingParams(temperature, top_p, top_k, seed), stop)

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
                 calls: dict | None = None, reports: dict[int, str] | None = None
                 ) -> EngineError:
        """Name every rank's part in a failure (its error whole, dead, or stopped and behind),
        release everything, and return the EngineError to raise. calls: refs of classic calls
        in flight; reports: what a compiled graph's outputs said, per rank."""
        lines = {**_call_reports(calls or {}), **(reports or {})}
        published = progress.behind(progress.read(self.engine_id, len(self.plans)),
                                    lambda r: self.plans[r].stage)
        for rank, text in published.items():  # errors already named stay as they are
            if rank not in lines or lines[rank].startswith("has not finished"):
                lines[rank] = text
        if reports is None:  # classic calls: a ping finds dead ranks
            for rank in self._dead_ranks():
                lines[rank] = "died (its actor is gone)"
        first = cause_text(cause) if cause is not None else None
        if first is not None and not any(first in text for text in lines.values()):
            lines.setdefault(-1, first)
        self.shutdown()
        if not lines:
            return EngineError(f"{what}; every rank answers, none reported an error")
        body = "\n".join(f"  {self._describe(r) if r >= 0 else 'cause'}: {text}"
                         for r, text in sorted(lines.items()))
        return EngineError(f"{what}:\n{body}")

    def _dead_ranks(self) -> list[int]:
        """Ranks whose actor is gone (a ping fails); a rank that cannot answer within
        PING_TIMEOUT_S is left to its published progress."""
        pings = {a.node_info.remote(): i for i, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_TIMEOUT_S)
        dead = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:
                dead.append(pings[ref])
        return dead

    def stats(self) -> EngineStats:
        """Per-rank figures, tokens routed per expert, busy seconds per stage, scheduler
        counters. A compiled graph is released first (its actors answer nothing else)."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        ranks = (self._get([a.stats.remote() for a in self.actors], self.step_timeout_s, "stats")
                 if self.actors else [])  # none after a failure: only the scheduler's figures
        out = EngineStats(ranks=ranks, stage_seconds=[0.0] * self.layout.pp,
                          speculating=self.num_drafts > 0)
        out.rebalances = list(self.rebalances)
        place = self.layout.placement
        out.expert_load.layout = {"pp": self.layout.pp, "ep": self.layout.ep,
                                  "placement": place.source if place is not None else None}
        for st in ranks:
            for layer_id, d in st.dispatch.items():
                out.expert_load.add(layer_id, d["received_per_expert"],
                                    st.window_load.get(layer_id))
            out.expert_load.window_steps = max(out.expert_load.window_steps, st.window_steps)
            out.stage_seconds[st.stage] = max(out.stage_seconds[st.stage], st.busy_seconds)
        if self.scheduler is not None:
            out.scheduler = self.scheduler.stats
        return out

    def shutdown(self) -> None:
        """Kill the actors, release the graph and the placement group. Each cluster call is
        bounded (SHUTDOWN_CALL_S): with the cluster going down under it (every process of a
        Slurm step signalled at once) they may never answer."""
        actors, self.actors = self.actors, []
        # first: a stopped rank must not hold up the graph's teardown
        cluster.call_within(lambda: _kill_all(actors), SHUTDOWN_CALL_S, "killing the ranks")
        if self.offload is not None and self.offload.device == "nvme":
            remove_swap_dirs(self.offload.nvme_path, self.infos)
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        cluster.call_within(lambda: progress.clear(self.engine_id, len(self.plans)),
                            SHUTDOWN_CALL_S, "clearing the ranks' progress")
        if self.pg is not None:
            pg, self.pg = self.pg, None
            cluster.call_within(lambda: remove_placement_group(pg), SHUTDOWN_CALL_S,
                                "removing the placement group")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _kill_all(actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # already gone
            pass


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
            rank, text = calls[ref][0], cause_text(e)
            if rank in out:
                continue
            src = first_with.setdefault(text, rank)
            out[rank] = text if src == rank else f"the same error as rank {src} (an input)"
    for ref in running:
        rank, what = calls[ref]
        out.setdefault(rank, f"has not finished {what}: behind the other ranks (stopped, hung "
                             f"or waiting on an earlier stage)")
    return out
