"""What one step runs and what it returns: plain data sent to and from workers.

A StepPlan holds, per expert-parallel column, the sequences that column runs (every rank runs
every step, so a column may have none). Workers first drop the state of the ids in `freed`,
then for each SeqStep: a step with `params` (re)introduces the request (start == 0, fresh
page table); `new_pages` extend its page table; token_ids[i] is written at position start + i;
when `sample`, a token is sampled from the last position, its noise keyed by
(params.seed, request id, output_index). With speculative decoding the last `drafts` token
ids are drafts to verify (ds3dist.rank.speculative), and a step that does not sample
carries `next_token`, the token after its last, for the MTP module. A token id FILL stands
for the token the worker sampled for the request in the step before (overlapped decode: that
step's result has not reached the scheduler yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds3dist.core.params import SamplingParams


FILL = -1


@dataclass(slots=True)
class SeqStep:
    req_id: str
    token_ids: list[int]
    start: int
    new_pages: list[int]
    sample: bool
    params: SamplingParams | None
    output_index: int
    drafts: int = 0  # trailing token ids that are drafts to verify
    next_token: int | None = None  # the token after the last (steps that do not sample)


@dataclass(slots=True)
class StepPlan:
    step_id: int
    columns: list[list[SeqStep]]
    freed: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for col in self.columns for s in col)

    def seqs(self) -> list[SeqStep]:
        return [s for col in self.columns for s in col]


@dataclass(slots=True)
class StepResult:
    """sampled: the step's own token per sampling request; accepted: the drafts it accepted
    before that token; drafts: the next step's drafts (speculative decoding)."""
    step_id: int
    sampled: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    accepted: dict[str, list[int]] = field(default_factory=dict)
    drafts: dict[str, list[int]] = field(default_factory=dict)

    def merge(self, other: StepResult) -> None:
        """Add another column's part of the same step."""
        self.sampled.update(other.sampled)
        self.failed.update(other.failed)
        self.accepted.update(other.accepted)
        self.drafts.update(other.drafts)
