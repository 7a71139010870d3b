"""Hidden states from one pipeline stage to the next over the process group, device to device.

On CUDA a non-last stage sends its hidden states to the same expert-parallel rank of the next
stage with an NCCL send (torch.distributed point-to-point on the world group) and hands the
driver only a `HiddenRef` (shape, dtype); the next stage receives into its own buffer. The
states never touch host memory or Ray's object store. Sends and receives between a pair are
matched in the order they are issued, and every stage runs the steps in plan order, so steps in
flight pair up. A send's tensor is held until its work completes. The CPU path keeps Ray's
channels; DS3DIST_STAGE_P2P=1 (tests) uses this hand-off there too, over gloo.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

P2P_ENV = "DS3DIST_STAGE_P2P"
MAX_PENDING = 8  # sends in flight before the oldest is waited for


@dataclass(frozen=True)
class HiddenRef:
    """What travels through the driver in place of a stage's hidden states."""
    shape: tuple[int, ...]
    dtype: str


def wanted(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get(P2P_ENV, "") == "1"


class StageHandoff:
    def __init__(self, prev_rank: int | None, next_rank: int | None, device: torch.device):
        self.prev_rank, self.next_rank, self.device = prev_rank, next_rank, device
        self._pending: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.sent = self.received = 0

    def send(self, h_td: torch.Tensor) -> HiddenRef:
        ref = HiddenRef(tuple(h_td.shape), str(h_td.dtype).removeprefix("torch."))
        if h_td.numel():
            h_td = h_td.contiguous()
            self._pending.append((dist.isend(h_td, dst=self.next_rank), h_td))
            self.sent += 1
        while self._pending and (len(self._pending) > MAX_PENDING
                                 or self._pending[0][0].is_completed()):
            self._pending.popleft()[0].wait()  # bounded by the group's timeout
        return ref

    def recv(self, ref: HiddenRef) -> torch.Tensor:
        h_td = torch.empty(ref.shape, dtype=getattr(torch, ref.dtype), device=self.device)
        if h_td.numel():
            dist.recv(h_td, src=self.prev_rank)
            self.received += 1
        return h_td
