"""What every rank does with its column's share of a step plan (run_column): drop freed
requests, leave out requests that fail on their own, embed (first stage), run the held
layers, sample (last stage). The Ray worker and the one-process executor both call it."""

from __future__ import annotations

import torch

from ds3dist.core.plan import SeqStep, StepPlan
from ds3dist.rank.runner import StepRunner


def run_column(runner: StepRunner, plan: StepPlan, seqs: list[SeqStep], first: bool, last: bool,
               payload: tuple[dict[str, str], torch.Tensor] | None = None):
    """One rank's part of a step. payload: (requests failed so far -> reason, hidden states)
    from the previous stage. Returns the next stage's payload, or on the last stage the
    column's StepResult."""
    if first:
        failed, h_td = runner.failing(seqs), None
    else:
        failed, h_td = payload
    seqs = [s for s in seqs if s.req_id not in failed]
    tb = runner.begin(plan.freed, seqs)
    h_td = runner.layers(seqs, tb, h_td)
    if not last:
        return failed, h_td
    res = runner.sample(plan.step_id, seqs, tb, h_td)
    res.failed.update(failed)
    return res
