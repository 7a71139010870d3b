"""The whole model in this process: LocalExecutor (the rank side's column step, run as plans
are submitted), LocalEngine (the serving loop over it, the engine interface of one process)
and generate(). The Ray engine runs the same loop over its ranks, so the two cannot drift.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import torch

from ds3dist.core.loop import serve
from ds3dist.core.engine import EngineStats, ExpertLoad
from ds3dist.core.options import BalanceOptions, ServingOptions, SpeculativeConfig, num_drafts
from ds3dist.core.params import SamplingParams
from ds3dist.core.plan import StepPlan, StepResult
from ds3dist.core.request import Request
from ds3dist.core.scheduler import Scheduler, SchedulerConfig, SchedulerStats
from ds3dist.model.cache import PagedCache
from ds3dist.rank.column import run_column
from ds3dist.rank.runner import StepRunner
from ds3dist.text import GenerationResult, encode_prompts, generate_with, special_ids

class LocalExecutor:
    """The whole model in this process, one column: plans run as they are submitted."""

    max_in_flight, overlap = 1, False

    def __init__(self, model, num_pages: int, page_size: int,
                 speculative: SpeculativeConfig | None = None, cuda_graphs: bool = False,
                 load_window: int = BalanceOptions().window):
        self.runner = StepRunner(model, num_pages, page_size, speculative, cuda_graphs,
                                 load_window)
        self._done: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        if len(plan.columns) != 1:
            raise ValueError(f"one process runs one column, the plan has {len(plan.columns)}")
        self._done.append(run_column(self.runner, plan, plan.columns[0], True, True))

    def result(self, timeout_s: float | None = None) -> StepResult:
        return self._done.popleft()


class LocalEngine:
    """The whole model in this process behind the engine interface (ds3dist.core.engine):
    the serving loop with a LocalExecutor, as the Ray engine runs it with its ranks.
    serving: cache size, page size and the scheduler's limits; cache_pages overrides the size
    in pages. speculative: draft with the MTP layer (the model must hold it:
    load_model(mtp=True))."""

    def __init__(self, model, tokenizer: Any = None, serving: ServingOptions | None = None, *,
                 cache_pages: int | None = None, speculative: SpeculativeConfig | None = None,
                 balance: BalanceOptions | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.serving = serving = serving or ServingOptions()
        k = num_drafts(speculative)
        if k and model.mtp is None:
            raise ValueError("speculative decoding needs the MTP layer: load the model with "
                             "mtp=True (the checkpoint must have it)")
        width = model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim
        pages = cache_pages or PagedCache.pages_for_bytes(
            serving.cache_bytes(), len(model.layer_ids) + len(model.mtp_layer_ids),
            serving.page_size, width, model.dtype)
        self.sched_cfg = SchedulerConfig.of(serving, columns=1, pages_per_column=pages,
                                            max_model_len=model.cfg.max_position_embeddings,
                                            num_drafts=k)
        self.executor = LocalExecutor(model, pages, serving.page_size, speculative,
                                      serving.cuda_graphs, (balance or BalanceOptions()).window)
        self.scheduler: Scheduler | None = None

    def stream(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Run requests to their end; yield each as it ends."""
        self.scheduler = Scheduler(self.sched_cfg)
        with torch.inference_mode():
            yield from serve(self.scheduler, self.executor, requests)

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop=None) -> list[GenerationResult]:
        return generate_with(self, self.tokenizer, self.model.cfg, prompts, max_new_tokens,
                             SamplingParams(temperature, top_p, top_k, seed), stop)

    def stats(self) -> EngineStats:
        runner = self.executor.runner
        totals = runner.expert_totals()
        window, covered = runner.load.window(totals)
        load = ExpertLoad(totals, window, covered, {"pp": 1, "ep": 1, "placement": None})
        return EngineStats(expert_load=load, scheduler=self._scheduler_stats(),
                           speculating=self.sched_cfg.num_drafts > 0)

    def _scheduler_stats(self) -> SchedulerStats:
        return self.scheduler.stats if self.scheduler is not None else SchedulerStats()

    def shutdown(self) -> None:
        """Nothing to release: the model lives as long as this process holds it."""


def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop=None, *, cache_pages: int | None = None,
             serving: ServingOptions | None = None,
             speculative: SpeculativeConfig | None = None) -> list[GenerationResult]:
    """Generate for prompts with the whole model in this process: continuous batching over a
    paged cache (cache_pages pages of serving.page_size tokens; default: enough for every
    prompt at its longest, so nothing is preempted). Request i samples with noise keyed by
    (seed, str(i), token index). speculative: draft with the MTP layer."""
    serving = serving or ServingOptions()
    if cache_pages is None:
        extra, page = num_drafts(speculative), serving.page_size
        ids = encode_prompts(tokenizer, prompts, special_ids(tokenizer, model.cfg)[0])
        cache_pages = max(1, sum(-(-(len(p) + max_new_tokens + extra) // page) for p in ids))
    engine = LocalEngine(model, tokenizer, serving, cache_pages=cache_pages,
                         speculative=speculative)
    return engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop)
