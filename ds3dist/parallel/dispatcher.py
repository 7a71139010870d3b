"""All-to-all MoE token dispatcher over one expert-parallel process group.

Notation: T tokens on this rank, K top-k, N = T*K token copies, D hidden, R ranks in the
group, E routed experts, S copies received by this rank, E_l experts this rank owns.

dispatch(x_td, idx_tk, w_tk):
  1. pick each copy's destination: an expert's copies from this rank dealt to its holders
     in turn (a placement may give an expert several copies), so each holder gets an even
     share; sort the N copies by (destination, expert id); send counts c [R, E]
  2. all_to_all the counts: every rank knows what it will receive from whom
  3. all_to_all the token rows (FP8 + per-128 scales when fp8_payload, as uint8 views so
     gloo can carry them) and their float32 routing weights
  4. regroup the S received rows by local expert (ascending id), as LocalDispatcher does
combine(y_sd, d): undo 4, all_to_all back, undo 1, sum the K rows of each token in float32.

Every rank of the group must call dispatch/combine the same number of times, T = 0 included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ds3dist.checkpoint.fp8 import FP8_DTYPE, act_dequant, act_quant
from ds3dist.model.dispatch import Dispatched


@dataclass
class CollectiveLog:
    """A rank's collectives so far, shared by its dispatchers: when one hangs, the rank can
    say which it was in, and the engine which rank is behind."""
    entered: int = 0
    last: str = ""

    def enter(self, what: str) -> None:
        self.entered += 1
        self.last = what


@dataclass
class _Handle:
    order_n: torch.Tensor  # sort permutation of the N copies (send order)
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    regroup_s: torch.Tensor  # received order -> grouped-by-expert order
    t: int
    k: int
    dtype: torch.dtype


class AllToAllDispatcher:
    def __init__(
        self,
        group: dist.ProcessGroup,
        table: tuple[torch.Tensor, torch.Tensor],
        local_experts: list[int],
        fp8_payload: bool = False,
        layer_id: int | None = None,
        log: CollectiveLog | None = None,
    ):
        """table: Placement.dest_table of this layer; local_experts: the experts this rank
        holds in it."""
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.holders_ec, self.count_e = table
        self.n_experts = len(self.count_e)
        self.local_experts = sorted(local_experts)
        self.fp8_payload = fp8_payload
        self.layer_id = layer_id
        self.log = log or CollectiveLog()
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        # statistics: copies this rank sent per (global) expert, received per local expert
        self.sent_e = torch.zeros(self.n_experts, dtype=torch.int64)
        self.received_e = torch.zeros(self.n_experts, dtype=torch.int64)

    def dest(self, idx_n: torch.Tensor) -> torch.Tensor:
        """The rank each copy goes to: an expert's copies from this rank are dealt to its
        holders in turn, starting at a holder that depends on this rank, so every holder gets
        an even share of every rank's tokens (deterministic; one holder: that one)."""
        dev = idx_n.device
        if dev not in self._on:
            self._on[dev] = tuple(t.to(dev) for t in (self.holders_ec, self.count_e))
        holders_ec, count_e = self._on[dev]
        order_n = torch.sort(idx_n, stable=True).indices
        sorted_n = idx_n[order_n]
        first_n = torch.searchsorted(sorted_n, sorted_n)  # where each expert's run begins
        nth_n = torch.empty_like(idx_n)
        nth_n[order_n] = torch.arange(idx_n.numel(), device=dev) - first_n
        turn_n = (nth_n + self.rank) % count_e[idx_n]
        return holders_ec[idx_n, turn_n]

    def dispatch(self, x_td: torch.Tensor, idx_tk: torch.Tensor, w_tk: torch.Tensor) -> Dispatched:
        dev = x_td.device
        t, k = idx_tk.shape
        idx_n = idx_tk.reshape(-1).to(torch.int64)
        # 1. sort copies by (destination rank, expert); stable: token order kept in an expert
        key_n = self.dest(idx_n) * self.n_experts + idx_n
        order_n = torch.sort(key_n, stable=True).indices
        token_n = torch.div(order_n, k, rounding_mode="floor")
        x_nd = x_td[token_n]
        w_n = w_tk.reshape(-1)[order_n].to(torch.float32)
        counts_re = torch.bincount(key_n, minlength=self.world * self.n_experts) \
            .view(self.world, self.n_experts).cpu()  # [destination, expert]
        self.sent_e += counts_re.sum(0)

        # 2. what each rank receives from each (on the payload's device: NCCL needs CUDA)
        counts_dev = counts_re.to(dev)
        got_dev = torch.empty_like(counts_dev)
        self.log.enter(f"all_to_all of expert counts, layer {self.layer_id}")
        dist.all_to_all_single(got_dev, counts_dev, group=self.group)
        got_re = got_dev.cpu()  # [source, expert]
        send_splits = [int(v) for v in counts_re.sum(1)]
        mine = torch.tensor(self.local_experts, dtype=torch.int64)
        recv_re = got_re[:, mine]  # [R, E_l]: copies from rank r for each local expert
        recv_splits = [int(v) for v in recv_re.sum(1)]
        s = sum(recv_splits)

        # 3. exchange rows and weights
        if self.fp8_payload:
            xq_nd, sc_ng = act_quant(x_nd)
            xq_sd = self._a2a(xq_nd.view(torch.uint8), recv_splits, send_splits).view(FP8_DTYPE)
            sc_sg = self._a2a(sc_ng, recv_splits, send_splits)
            x_sd = act_dequant(xq_sd, sc_sg).to(x_td.dtype)
        else:
            x_sd = self._a2a(x_nd, recv_splits, send_splits)
        w_s = self._a2a(w_n, recv_splits, send_splits)

        # 4. regroup received rows (ordered by source rank, then expert) by local expert
        expert_s = torch.repeat_interleave(mine.repeat(self.world), recv_re.reshape(-1))
        regroup_s = torch.sort(expert_s, stable=True).indices.to(dev)
        counts_local = [int(v) for v in recv_re.sum(0)]
        self.received_e[mine] += recv_re.sum(0)
        handle = _Handle(order_n, send_splits, recv_splits, regroup_s, t, k, x_td.dtype)
        assert x_sd.shape[0] == s
        return Dispatched(
            x_sd=x_sd[regroup_s], w_s=w_s[regroup_s], counts_e=counts_local, handle=handle
        )

    def combine(self, y_sd: torch.Tensor, d: Dispatched) -> torch.Tensor:
        h: _Handle = d.handle
        y_recv = torch.empty_like(y_sd)
        y_recv[h.regroup_s] = y_sd
        y_sorted = self._a2a(y_recv, h.send_splits, h.recv_splits)
        y_nd = torch.empty_like(y_sorted)
        y_nd[h.order_n] = y_sorted
        return y_nd.view(h.t, h.k, y_sd.shape[-1]).to(torch.float32).sum(1).to(h.dtype)

    def _a2a(self, src: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        out = src.new_empty((sum(recv_splits), *src.shape[1:]))
        self.log.enter(f"all_to_all, layer {self.layer_id}")
        dist.all_to_all_single(
            out, src.contiguous(), recv_splits, send_splits, group=self.group
        )
        return out

    def stats(self) -> dict:
        return {"sent_per_expert": self.sent_e.tolist(), "received_per_expert": self.received_e.tolist()}
