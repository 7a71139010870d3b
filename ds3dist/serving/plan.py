"""What one step runs and what it returns: plain data sent to and from workers.

A StepPlan holds, per expert-parallel column, the sequences that column runs (every rank runs
every step, so a column may have none). Workers first drop the state of the ids in `freed`,
then for each SeqStep: a step with `params` (re)introduces the request (start == 0, fresh
page table); `new_pages` extend its page table; token_ids[i] is written at position start + i;
when `sample`, a token is sampled from the last position, its noise keyed by
(params.seed, request id, output_index). A token id FILL stands for the token the worker
sampled for the request in the step before (overlapped decode: that step's result has not
reached the scheduler yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds3dist.serving.params import SamplingParams


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
    step_id: int
    sampled: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
