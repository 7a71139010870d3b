"""Sampling, stop rules and generate() for one process.

`sample_next` and `StopRule`/`Sequence` are what a distributed engine reuses on its last
pipeline stage: given float32 logits [b, vocab] and the same generator state they draw the
same tokens, and the same rules end the same sequences.

Sampling (float32): temperature 0 -> argmax. Otherwise logits / temperature, keep the top_k
largest (0 = all), then the smallest prefix (by probability, descending) whose mass reaches
top_p, renormalize, and invert the CDF at one uniform draw per row from `generator`.

Stops: a sequence ends with finish_reason 'stop' when it emits the EOS token or a stop token
id, or its text contains a stop string; else 'length' after max_new_tokens. token_ids keep
the final stop token; text leaves out special tokens and anything from a stop string on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence as Seq

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """A generator seeded with `seed` (None: use torch's global RNG)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))


def sample_next(logits_bv: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: int64 [b]. Greedy at temperature 0 (first maximum on ties)."""
    logits = logits_bv.float()
    if params.temperature == 0 or logits.shape[0] == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    v = logits.shape[-1]
    if 0 < params.top_k < v:
        vals_bk, idx_bk = logits.topk(params.top_k, dim=-1)  # sorted, descending
    elif params.top_p < 1:
        vals_bk, idx_bk = logits.sort(dim=-1, descending=True)
    else:
        vals_bk, idx_bk = logits, None
    probs = vals_bk.softmax(-1)
    if params.top_p < 1:  # drop a token when the mass before it already reaches top_p
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    cdf = probs.cumsum(-1)
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(logits.shape[0], 1, generator=generator, device=dev).to(cdf.device)
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    return j.squeeze(1) if idx_bk is None else idx_bk.gather(1, j).squeeze(1)


class StopRule:
    """EOS, stop token ids and stop strings. `stop` may mix strings and token ids."""

    def __init__(self, eos_token_id: int | None, stop: str | int | Iterable[str | int] | None = None):
        if stop is None:
            stop = []
        elif isinstance(stop, (str, int)):
            stop = [stop]
        self.stop_strings = [s for s in stop if isinstance(s, str) and s]
        self.stop_ids = {int(s) for s in stop if not isinstance(s, str)}
        if eos_token_id is not None:
            self.stop_ids.add(int(eos_token_id))

    def cut(self, text: str) -> str | None:
        """text up to the earliest stop string, or None when it holds none."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return text[: min(hits)] if hits else None


@dataclass
class Sequence:
    """One request's generation state."""

    prompt_ids: list[int]
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, rule: StopRule, tokenizer: Any = None) -> bool:
        """Add a generated token, apply the stop rules; True when the sequence has finished."""
        self.token_ids.append(int(token))
        if int(token) in rule.stop_ids:
            self.finish_reason = "stop"
        elif rule.stop_strings and tokenizer is not None:
            if rule.cut(tokenizer.decode(self.token_ids)) is not None:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finished

    def finish(self, rule: StopRule, tokenizer: Any = None) -> "GenerationResult":
        ids = self.token_ids
        body = ids[:-1] if ids and self.finish_reason == "stop" and ids[-1] in rule.stop_ids else ids
        text = tokenizer.decode(body) if tokenizer is not None else ""
        cut = rule.cut(text)
        self.text = text if cut is None else cut
        return GenerationResult(list(ids), self.text, self.finish_reason or "length", len(self.prompt_ids))


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (the final stop token included)
    text: str
    finish_reason: str  # 'stop' or 'length'
    prompt_tokens: int


def encode_prompt(tokenizer: Any, prompt: str | Seq[int], bos_token_id: int | None) -> list[int]:
    """Token ids of a prompt; text gets BOS prepended unless it already starts with it."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        ids = list(tokenizer.encode(prompt))
        if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
            ids = [bos_token_id] + ids
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    return ids


def right_pad(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, max_len] right-padded with `pad`, lengths [b]."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    toks = torch.full((len(seqs), int(lens.max()) if seqs else 0), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return toks, lens


@torch.no_grad()
def generate(model, tokenizer, prompts: Seq[str | Seq[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop=None) -> list[GenerationResult]:
    """Generate for a batch of prompts: one prefill, then one cached decode step per token.

    Finished sequences leave the batch (their cache rows are dropped).
    """
    params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed)
    cfg = model.cfg
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos = cfg.eos_token_id if eos is None else eos
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    bos = cfg.bos_token_id if bos is None else bos
    rule = StopRule(eos, stop)
    seqs = [Sequence(encode_prompt(tokenizer, p, bos), max_new_tokens) for p in prompts]
    if max_new_tokens == 0 or not seqs:
        return [s.finish(rule, tokenizer) for s in seqs]
    generator = params.generator()

    toks_bt, lens_b = right_pad([s.prompt_ids for s in seqs])
    cache = model.new_cache(len(seqs), int(lens_b.max()) + max_new_tokens)
    positions_bt = torch.arange(toks_bt.shape[1]).expand_as(toks_bt)
    h_btd = model.forward_layers(model.embed(toks_bt), positions_bt, cache, lens_b)
    last_bd = h_btd[torch.arange(len(seqs)), (lens_b - 1).to(h_btd.device)]
    logits_bv = model.logits(last_bd[:, None])[:, 0]
    active = list(range(len(seqs)))  # cache row -> sequence index
    while True:
        next_b = sample_next(logits_bv, params, generator).cpu()
        keep = [r for r, si in enumerate(active) if not seqs[si].append(int(next_b[r]), rule, tokenizer)]
        if not keep:
            break
        if len(keep) < len(active):
            cache.select(keep)
            active = [active[r] for r in keep]
            next_b = next_b[keep]
        h_btd = model.forward_layers(model.embed(next_b[:, None]), cache.lens[:, None], cache)
        logits_bv = model.logits(h_btd)[:, 0]
    return [s.finish(rule, tokenizer) for s in seqs]
