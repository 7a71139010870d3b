"""Rebalancing the routed experts during a job (parallel.eplb.step_interval).

Every step_interval steps the engine drains the plans in flight (their results are kept and
handed to the loop in order), sums the ranks' windows of expert load, places the experts anew
with ds3dist.balance, has every rank take its new experts between steps (kept experts stay,
new ones are read from the checkpoint on the receiving rank) and route by the new placement,
then goes on. The expert math of a token does not depend on which rank computes it, so no
output changes; the pause is recorded (`Rebalance`).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from ds3dist.config import ModelConfig
from ds3dist.core.options import BalanceOptions
from ds3dist.core.plan import StepPlan, StepResult
from ds3dist.parallel.placement import Placement


def new_placement(window: dict[int, list[int]], current: Placement, cfg: ModelConfig,
                  opts: BalanceOptions) -> tuple[Placement, float, float]:
    """The balancer's placement for the window's load; (placement, before, after)."""
    from ds3dist import balance

    layers = sorted(window)
    load_le = np.array([window[i] for i in layers], dtype=np.float64)
    rpn = opts.ranks_per_node
    nodes = 1 if rpn is None or rpn >= current.ep else current.ep // rpn
    slots_lrs = balance.balance(load_le, current.ep, opts.redundant_experts, cfg.n_group, nodes)
    cur_lrs = [[list(current.layers[i][r]) for r in range(current.ep)] for i in layers]
    before = balance.overall_max_over_mean(balance.predicted_load(cur_lrs, load_le))
    after = balance.overall_max_over_mean(balance.predicted_load(slots_lrs, load_le))
    place = Placement(current.n_experts, current.ep,
                      {**current.layers, **{i: tuple(tuple(int(x) for x in r) for r in s)
                                            for i, s in zip(layers, slots_lrs)}},
                      source="rebalanced")
    return place, before, after


class RebalancingExecutor:
    """The engine's executor, with a rebalance before every step_interval-th plan."""

    def __init__(self, executor, interval: int, rebalance: Callable[[int], object],
                 timeout_s: float | None):
        """rebalance(step) moves the experts and returns the executor to go on with;
        timeout_s bounds each drained step."""
        self.inner, self.interval, self.rebalance = executor, interval, rebalance
        self.timeout_s = timeout_s
        self.max_in_flight, self.overlap = executor.max_in_flight, executor.overlap
        self._done: deque[StepResult] = deque()
        self._in_flight = 0

    def submit(self, plan: StepPlan) -> None:
        if plan.step_id and plan.step_id % self.interval == 0:
            while self._in_flight:  # the plans in flight end under the old placement
                self._done.append(self.inner.result(self.timeout_s))
                self._in_flight -= 1
            self.inner = self.rebalance(plan.step_id)
        self.inner.submit(plan)
        self._in_flight += 1

    def result(self, timeout_s: float | None = None) -> StepResult:
        if self._done:
            return self._done.popleft()
        self._in_flight -= 1
        return self.inner.result(timeout_s)
