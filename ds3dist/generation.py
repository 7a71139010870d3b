"""Stop rules, prompt encoding and generate() for one process.

`generate(model, tokenizer, prompts, ...)` runs the serving loop (ds3dist.serving: scheduler,
paged cache, per-request sampling) over the whole model in this process; the Ray engine runs
the same loop over its ranks, so the two cannot drift. `requests_for` and `result_of` turn
prompts into requests and ended requests into results for both.

Stops: a sequence ends with finish_reason 'stop' when it emits the EOS token or a stop token
id, or its text contains a stop string; else 'length' after max_new_tokens. token_ids keep
the final stop token; text leaves out special tokens and anything from a stop string on. A
request that cannot run (too long for the model or the cache) or fails on its own ends with
finish_reason 'error' and its reason in `error`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from ds3dist.model.cache import PagedCache
from ds3dist.serving.executor import LocalExecutor
from ds3dist.serving.loop import serve
from ds3dist.serving.options import DEFAULT_CPU_CACHE_GB
from ds3dist.serving.params import SamplingParams
from ds3dist.serving.request import Request, RequestStatus
from ds3dist.serving.scheduler import Scheduler, SchedulerConfig
from ds3dist.serving.speculative import SpeculativeConfig, num_drafts

PAGE_SIZE = 64


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (the final stop token included)
    text: str
    finish_reason: str  # 'stop', 'length' or 'error'
    prompt_tokens: int
    error: str | None = None


class StopChecker:
    """The stop rules of one sequence: EOS, stop token ids, stop strings, max_new_tokens.

    `stop` may be a string, a token id, or a list mixing both. Call update(token_ids) after
    each new token (token_ids: everything generated so far); `done` then says whether the
    sequence has finished; result() builds its GenerationResult.
    """

    def __init__(self, tokenizer: Any, stop: str | int | Iterable[str | int] | None = None,
                 max_new_tokens: int = 64, eos_token_id: int | None = None):
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        if stop is None:
            stop = []
        elif isinstance(stop, (str, int)):
            stop = [stop]
        stop = list(stop)
        self.stop_strings = [s for s in stop if isinstance(s, str) and s]
        self.stop_ids = {int(s) for s in stop if not isinstance(s, str)}
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is not None:
            self.stop_ids.add(int(eos_token_id))
        self.finish_reason: str | None = "length" if max_new_tokens == 0 else None

    def fresh(self) -> StopChecker:
        """The same rules, not yet applied to any token."""
        out = copy.copy(self)
        out.finish_reason = "length" if self.max_new_tokens == 0 else None
        return out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cut(self, text: str) -> str | None:
        """text up to the earliest stop string, or None when it holds none."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return text[: min(hits)] if hits else None

    def update(self, token_ids: Sequence[int]) -> bool:
        """Apply the rules to the newest token; True when the sequence has finished."""
        if self.done or not token_ids:
            return self.done
        if int(token_ids[-1]) in self.stop_ids:
            self.finish_reason = "stop"
        elif self.stop_strings and self.tokenizer is not None:
            if self.cut(self.tokenizer.decode(list(token_ids))) is not None:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.done

    def result(self, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> GenerationResult:
        ids = [int(t) for t in token_ids]
        body = ids[:-1] if self.finish_reason == "stop" and ids and ids[-1] in self.stop_ids else ids
        text = self.tokenizer.decode(body) if self.tokenizer is not None else ""
        cut = self.cut(text)
        return GenerationResult(ids, text if cut is None else cut, self.finish_reason or "length",
                                len(prompt_ids))


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int], bos_token_id: int | None = None) -> list[int]:
    """Token ids of a prompt. Text gets BOS (default: the tokenizer's) prepended unless it
    already starts with it; token-id lists are used as given. ValueError when empty."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        if bos_token_id is None:
            bos_token_id = getattr(tokenizer, "bos_token_id", None)
        ids = list(tokenizer.encode(prompt))
        if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
            ids = [int(bos_token_id)] + ids
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Sequence[int]],
                   bos_token_id: int | None = None) -> list[list[int]]:
    return [encode_prompt(tokenizer, p, bos_token_id) for p in prompts]


def right_pad(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, max_len] right-padded with `pad`, lengths [b]."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    toks = torch.full((len(seqs), int(lens.max()) if seqs else 0), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return toks, lens


def requests_for(tokenizer: Any, prompts: Sequence[str | Sequence[int]], max_new_tokens: int,
                 params: SamplingParams, stop=None, eos_token_id: int | None = None,
                 bos_token_id: int | None = None) -> list[Request]:
    """One request per prompt, id str(i), each with its own stop rules."""
    ids = encode_prompts(tokenizer, prompts, bos_token_id)
    return [Request(str(i), p, params, max_new_tokens,
                    StopChecker(tokenizer, stop, max_new_tokens, eos_token_id))
            for i, p in enumerate(ids)]


def special_ids(tokenizer: Any, cfg) -> tuple[int | None, int | None]:
    """(BOS, EOS): the tokenizer's, else the model config's."""
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return (cfg.bos_token_id if bos is None else bos), (cfg.eos_token_id if eos is None else eos)


def generate_with(engine: Any, tokenizer: Any, cfg, prompts: Sequence[str | Sequence[int]],
                  max_new_tokens: int, params: SamplingParams, stop=None) -> list[GenerationResult]:
    """Prompts through any engine's `stream` (one process or ranks); results in prompt order."""
    bos, eos = special_ids(tokenizer, cfg)
    reqs = requests_for(tokenizer, prompts, max_new_tokens, params, stop, eos, bos)
    ended = {r.id: r for r in engine.stream(reqs)}
    return [result_of(ended[r.id]) for r in reqs]


def result_of(req: Request) -> GenerationResult:
    if req.status is not RequestStatus.FINISHED:
        return GenerationResult(list(req.output_ids), "", "error", len(req.prompt_ids),
                                req.error or req.status.value)
    if req.stop is None:
        return GenerationResult(list(req.output_ids), "", req.finish_reason or "length",
                                len(req.prompt_ids))
    return req.stop.result(req.prompt_ids, req.output_ids)


class LocalEngine:
    """The whole model in this process behind the engine interface (`stream`, `generate`):
    the serving loop with a LocalExecutor, as the Ray engine runs it with its ranks.
    speculative: draft with the MTP layer (the model must hold it: load_model(mtp=True))."""

    def __init__(self, model, tokenizer: Any = None, cache_pages: int | None = None,
                 page_size: int = PAGE_SIZE, max_tokens_per_step: int = 2048,
                 max_seqs: int = 64, cache_gb: float = DEFAULT_CPU_CACHE_GB,
                 prefill_chunk: int | None = None, speculative: SpeculativeConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        k = num_drafts(speculative)
        if k and model.mtp is None:
            raise ValueError("speculative decoding needs the MTP layer: load the model with "
                             "mtp=True (the checkpoint must have it)")
        width = model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim
        pages = cache_pages or PagedCache.pages_for_bytes(
            cache_gb * 1e9, len(model.layer_ids) + len(model.mtp_layer_ids), page_size, width,
            model.dtype)
        self.sched_cfg = SchedulerConfig(
            pages_per_column=pages, page_size=page_size, max_tokens_per_step=max_tokens_per_step,
            max_seqs=max_seqs, prefill_chunk=prefill_chunk,
            max_model_len=model.cfg.max_position_embeddings, num_drafts=k)
        self.executor = LocalExecutor(model, pages, page_size, speculative)
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

    def stats(self) -> dict:
        load = {i: moe.dispatcher.stats()["received_per_expert"]
                for i, moe in self.model.moe_layers().items()}
        stats = self.scheduler.stats if self.scheduler is not None else None
        return {"expert_load": load, "scheduler": asdict(stats) if stats else {},
                "speculative": stats.speculative() if stats and self.sched_cfg.num_drafts else None}


def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop=None, *, cache_pages: int | None = None,
             page_size: int = PAGE_SIZE, max_tokens_per_step: int = 2048,
             max_seqs: int = 64, speculative: SpeculativeConfig | None = None
             ) -> list[GenerationResult]:
    """Generate for prompts with the whole model in this process: continuous batching over a
    paged cache (cache_pages pages of page_size tokens; default: enough for every prompt at
    its longest, so nothing is preempted). Request i samples with noise keyed by
    (seed, str(i), token index). speculative: draft with the MTP layer."""
    if cache_pages is None:
        extra = num_drafts(speculative)
        ids = encode_prompts(tokenizer, prompts, special_ids(tokenizer, model.cfg)[0])
        cache_pages = max(1, sum(-(-(len(p) + max_new_tokens + extra) // page_size) for p in ids))
    engine = LocalEngine(model, tokenizer, cache_pages, page_size, max_tokens_per_step, max_seqs,
                         speculative=speculative)
    return engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop)
