"""Sampling, stop rules and generate() for one process.

What a distributed engine reuses on its last pipeline stage: `sample_next` (float32 logits
[b, vocab] -> tokens, one generator per sequence from `sequence_generator(seed, index)`, so a
sequence draws the same tokens whatever batch it shares), `StopChecker` (one per sequence)
and `encode_prompts`.

Sampling (float32): temperature 0 -> argmax. Otherwise logits / temperature, keep the top_k
largest (0 = all), then the smallest prefix (by probability, descending) whose mass reaches
top_p, renormalize, and invert the CDF at one uniform draw per row.

Stops: a sequence ends with finish_reason 'stop' when it emits the EOS token or a stop token
id, or its text contains a stop string; else 'length' after max_new_tokens. token_ids keep
the final stop token; text leaves out special tokens and anything from a stop string on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, params: "SamplingParams | dict") -> "SamplingParams":
        return params if isinstance(params, cls) else cls(**params)


def sequence_generator(seed: int | None, index: int,
                       device: str | torch.device = "cpu") -> torch.Generator | None:
    """The generator of sequence `index` of a request seeded with `seed` (None: global RNG)."""
    if seed is None:
        return None
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9) % (1 << 63)
    return torch.Generator(device=device).manual_seed(mixed)


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def _uniform(b: int, generators: Generators) -> torch.Tensor:
    """One U[0, 1) draw per row: from one shared generator, or each row from its own."""
    if generators is None or isinstance(generators, torch.Generator):
        dev = generators.device if generators is not None else torch.device("cpu")
        return torch.rand(b, generator=generators, device=dev).cpu()
    if len(generators) != b:
        raise ValueError(f"{len(generators)} generators for {b} rows")
    return torch.cat([torch.rand(1, generator=g, device=g.device if g is not None else "cpu").cpu()
                      for g in generators])


def sample_next(logits_bv: torch.Tensor, params: SamplingParams | dict,
                generators: Generators = None) -> torch.Tensor:
    """Next token per row: int64 [b]. Greedy at temperature 0 (first maximum on ties).

    generators: None (torch's global RNG), one generator for the batch, or one per row."""
    params = SamplingParams.of(params)
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
    u = _uniform(logits.shape[0], generators).to(cdf.device)[:, None]
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    return j.squeeze(1) if idx_bk is None else idx_bk.gather(1, j).squeeze(1)


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (the final stop token included)
    text: str
    finish_reason: str  # 'stop' or 'length'
    prompt_tokens: int


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


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop=None) -> list[GenerationResult]:
    """Generate for a batch of prompts: one prefill, then one cached decode step per token.

    Sequence i samples from sequence_generator(seed, i); finished sequences leave the batch
    (their cache rows are dropped).
    """
    params = SamplingParams(temperature, top_p, top_k, seed)
    cfg = model.cfg
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    ids = encode_prompts(tokenizer, prompts, cfg.bos_token_id if bos is None else bos)
    eos = cfg.eos_token_id if eos is None else eos
    checkers = [StopChecker(tokenizer, stop, max_new_tokens, eos) for _ in ids]
    out = [[] for _ in ids]
    if max_new_tokens == 0 or not ids:
        return [c.result(p, o) for c, p, o in zip(checkers, ids, out)]
    gens = [sequence_generator(seed, i) for i in range(len(ids))]

    toks_bt, lens_b = right_pad(ids)
    cache = model.new_cache(len(ids), int(lens_b.max()) + max_new_tokens)
    positions_bt = torch.arange(toks_bt.shape[1]).expand_as(toks_bt)
    h_btd = model.forward_layers(model.embed(toks_bt), positions_bt, cache, lens_b)
    last_bd = h_btd[torch.arange(len(ids)), (lens_b - 1).to(h_btd.device)]
    logits_bv = model.logits(last_bd[:, None])[:, 0]
    active = list(range(len(ids)))  # cache row -> sequence index
    while True:
        next_b = sample_next(logits_bv, params, [gens[i] for i in active]).cpu()
        keep = []
        for r, i in enumerate(active):
            out[i].append(int(next_b[r]))
            if not checkers[i].update(out[i]):
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(active):
            cache.select(keep)
            active = [active[r] for r in keep]
            next_b = next_b[keep]
        h_btd = model.forward_layers(model.embed(next_b[:, None]), cache.lens[:, None], cache)
        logits_bv = model.logits(h_btd)[:, 0]
    return [c.result(p, o) for c, p, o in zip(checkers, ids, out)]
