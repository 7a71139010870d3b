"""Expert load over a sliding window of steps, on one rank.

The dispatchers count, per MoE layer, the token copies each logical expert received here
(running totals). `LoadWindow` snapshots those totals every `steps // SLOTS` steps and keeps
the snapshots of about the last `steps` steps; the window's load is the totals now minus the
newest snapshot at least `steps` steps old, which covers exactly `covered` steps
(steps <= covered < steps + stride once the job has run that long; all steps so far before).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

SLOTS = 16


class LoadWindow:
    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"parallel.eplb.window: must be >= 1 step, got {steps}")
        self.steps, self.stride = steps, max(1, steps // SLOTS)
        self.step = 0
        self._snaps: deque[tuple[int, dict[int, list[int]]]] = deque()

    def tick(self, totals: Callable[[], dict[int, list[int]]]) -> None:
        """Before each step: snapshot the totals every stride steps."""
        if self.step % self.stride == 0:
            self._snaps.append((self.step, totals()))
            while len(self._snaps) > 1 and self._snaps[1][0] <= self.step - self.steps:
                self._snaps.popleft()
        self.step += 1

    def window(self, now: dict[int, list[int]]) -> tuple[dict[int, list[int]], int]:
        """(per layer, each expert's copies over the window; the steps it covers)."""
        if not self._snaps:
            return now, 0
        old = [s for s in self._snaps if s[0] <= self.step - self.steps]
        first, base = old[-1] if old else self._snaps[0]  # the newest old enough, else all
        return ({i: [a - b for a, b in zip(row, base.get(i, [0] * len(row)))]
                 for i, row in now.items()}, self.step - first)
