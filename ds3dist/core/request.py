"""One generation request and its scheduling state.

A request's target is `num_tokens` (prompt + outputs so far). Each step advances
`num_computed` (tokens whose cache rows are written) towards it; the step that brings
`num_computed == num_tokens` samples a token from its last position, which is appended to
`output_ids` (so the target grows by one). Preemption drops the cache (num_computed = 0)
but keeps the outputs, so recompute prefills prompt + outputs. With speculative decoding a
decode step also feeds the drafts the step before proposed; those accepted count as outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from numbers import Integral
from typing import Protocol, Sequence

from ds3dist.core.params import SamplingParams


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.FAILED)


class TextStop(Protocol):
    """A request's stop strings (ds3dist.text.StopStrings), checked by the loop as tokens
    arrive: the core itself sees token ids only."""

    strings: list[str]

    def feed(self, new_ids: Sequence[int], /) -> int | None:
        """How many of new_ids up to the one that completed a stop string; None: no stop."""
        ...

    def fresh(self) -> "TextStop":
        """The same strings, no token seen yet."""
        ...


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int] = field(repr=False)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 64
    stop_ids: frozenset[int] = frozenset()  # an output token among them ends it ('stop')
    stop_text: TextStop | None = field(default=None, repr=False)
    # state, owned by the scheduler
    output_ids: list[int] = field(default_factory=list, repr=False)
    num_computed: int = 0
    pages: list[int] = field(default_factory=list, repr=False)
    column: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    in_flight: int = 0  # plans holding it (2 only with an overlapped decode)
    sampling: bool = False  # its newest step in flight samples a token
    drafts: list[int] = field(default_factory=list, repr=False)  # to verify next step
    finish_reason: str | None = None
    error: str | None = None
    arrival: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"request id must be a non-empty string, got {self.id!r}")
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        if not self.prompt_ids:
            raise ValueError(f"request {self.id}: prompt_ids must not be empty")
        if not isinstance(self.max_new_tokens, Integral) or self.max_new_tokens < 0:
            raise ValueError(f"request {self.id}: max_new_tokens must be an integer >= 0, "
                             f"got {self.max_new_tokens!r}")
        self.params = SamplingParams.of(self.params)
        self.stop_ids = frozenset(int(t) for t in self.stop_ids)

    def fresh(self) -> "Request":
        """The request as it was submitted (same id, prompt, parameters and stops, a fresh
        copy of each): to run it again from its prompt after an engine was lost."""
        return Request(self.id, list(self.prompt_ids), self.params, self.max_new_tokens,
                       self.stop_ids, None if self.stop_text is None else self.stop_text.fresh())

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run before the next sample."""
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids."""
        p = len(self.prompt_ids)
        head = self.prompt_ids[start:stop]
        return head if stop <= p else head + self.output_ids[max(start - p, 0):stop - p]
