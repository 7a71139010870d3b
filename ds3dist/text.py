"""Text at the edge of the engine: prompts become token ids, stop strings are checked as
tokens arrive, ended requests become text. The serving core (ds3dist.core) sees token ids
only: a request ends there on a stop token id (EOS, or an id given as a stop) or at
max_new_tokens; a stop string ends it through the loop, which feeds each request's new
tokens to its StopStrings and stops the request after the token that completed one.

Stops: finish_reason 'stop' when the output emits a stop token id or its text holds a stop
string, else 'length' after max_new_tokens. token_ids keep the token that stopped it; text
leaves out special tokens and everything from a stop string on. A request that could not run
(too long for the model or the cache) or failed on its own ends with finish_reason 'error'
and its reason in `error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ds3dist.core.params import SamplingParams
from ds3dist.core.request import Request, RequestStatus

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that do not yet make a character


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (the final stop token included)
    text: str
    finish_reason: str  # 'stop', 'length' or 'error'
    prompt_tokens: int
    error: str | None = None


class StopStrings:
    """A request's stop strings, checked as its tokens arrive, in O(new text) per token.

    The output's tokens are anchored after the last one on which its text ended on a whole
    character; each new token decodes only the tokens since the anchor (a byte-level decoder
    gives the text of a prefix that ends on a character boundary, then that of the rest), and
    only that new text is searched, with as many characters of the anchored text before it as
    a stop string could start back (all that is kept of it). So every match found is one in
    tokenizer.decode(outputs so far), found at the first token that completes it."""

    def __init__(self, tokenizer: Any, strings: Iterable[str]):
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        if not self.strings:
            raise ValueError("StopStrings needs at least one non-empty string")
        self._reach = max(map(len, self.strings)) - 1  # characters a match may start before
        self._ids: list[int] = []
        self._anchor = 0  # self._ids[:anchor] decode to text ending on a whole character
        self._before = ""  # the last _reach characters of that text

    def fresh(self) -> StopStrings:
        """The same strings, no token seen yet."""
        return StopStrings(self.tokenizer, self.strings)

    def feed(self, new_ids: Sequence[int]) -> int | None:
        """The number of new_ids up to and including the first after which the output's text
        holds a stop string; None when none does."""
        for n, token in enumerate(new_ids, 1):
            self._ids.append(int(token))
            tail = self.tokenizer.decode(self._ids[self._anchor:])
            window = self._before + tail
            if any(s in window for s in self.strings):
                return n
            if not tail.endswith(REPLACEMENT):
                self._before = window[max(0, len(window) - self._reach):]
                self._anchor = len(self._ids)
        return None


def cut_at_stop(text: str, strings: Sequence[str]) -> str:
    """text up to the earliest of the stop strings (all of it when none is there)."""
    hits = [i for i in (text.find(s) for s in strings if s) if i >= 0]
    return text[:min(hits)] if hits else text


def split_stop(tokenizer: Any, stop: str | int | Iterable[str | int] | None,
               eos_token_id: int | None = None) -> tuple[frozenset[int], list[str]]:
    """(stop token ids, EOS included; stop strings) of a request's `stop` (a string, a token
    id, or a list mixing both)."""
    if stop is None:
        stop = []
    elif isinstance(stop, (str, int)):
        stop = [stop]
    stop = list(stop)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    ids = {int(s) for s in stop if not isinstance(s, str)}
    if eos_token_id is not None:
        ids.add(int(eos_token_id))
    return frozenset(ids), [s for s in stop if isinstance(s, str) and s]


def make_request(tokenizer: Any, req_id: str, prompt_ids: Sequence[int],
                 params: SamplingParams, max_new_tokens: int,
                 stop: str | int | Iterable[str | int] | None = None,
                 eos_token_id: int | None = None) -> Request:
    """The engine's request: its stop token ids go to the scheduler, its stop strings to a
    StopStrings the loop feeds (they need the tokenizer)."""
    ids, strings = split_stop(tokenizer, stop, eos_token_id)
    if strings and tokenizer is None:
        raise ValueError(f"request {req_id}: stop strings need a tokenizer")
    return Request(req_id, list(prompt_ids), params, max_new_tokens, stop_ids=ids,
                   stop_text=StopStrings(tokenizer, strings) if strings else None)


def result_of(req: Request, tokenizer: Any) -> GenerationResult:
    """An ended request as text: the outputs decoded without a final stop token id, cut at
    the earliest stop string."""
    ids = [int(t) for t in req.output_ids]
    if req.status is not RequestStatus.FINISHED:
        return GenerationResult(ids, "", "error", len(req.prompt_ids),
                                req.error or req.status.value)
    reason = req.finish_reason or "length"
    if tokenizer is None:
        return GenerationResult(ids, "", reason, len(req.prompt_ids))
    body = ids[:-1] if reason == "stop" and ids and ids[-1] in req.stop_ids else ids
    text = tokenizer.decode(body)
    if req.stop_text is not None:
        text = cut_at_stop(text, req.stop_text.strings)
    return GenerationResult(ids, text, reason, len(req.prompt_ids))


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int],
                  bos_token_id: int | None = None) -> list[int]:
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


def special_ids(tokenizer: Any, cfg) -> tuple[int | None, int | None]:
    """(BOS, EOS): the tokenizer's, else the model config's."""
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return (cfg.bos_token_id if bos is None else bos), (cfg.eos_token_id if eos is None else eos)


def generate_with(engine: Any, tokenizer: Any, cfg, prompts: Sequence[str | Sequence[int]],
                  max_new_tokens: int, params: SamplingParams, stop=None) -> list[GenerationResult]:
    """Prompts through an engine's `stream` (one process or ranks): request i has id str(i);
    results in prompt order."""
    bos, eos = special_ids(tokenizer, cfg)
    reqs = [make_request(tokenizer, str(i), ids, params, max_new_tokens, stop, eos)
            for i, ids in enumerate(encode_prompts(tokenizer, prompts, bos))]
    ended = {r.id: r for r in engine.stream(reqs)}
    return [result_of(ended[r.id], tokenizer) for r in reqs]
