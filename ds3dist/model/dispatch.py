"""Token dispatch for the MoE layer: the `Dispatched` record and the single-process dispatcher.

Contract (docs/architecture.md): T tokens, K = top-k, D hidden, S token copies for this
process's experts, E_l local experts.

    dispatcher.dispatch(x_td, idx_tk, w_tk) -> Dispatched(x_sd, w_s, counts_e, handle)
    experts(x_sd, counts_e, w_s)            -> y_sd
    dispatcher.combine(y_sd, d)             -> out_td

Copies are grouped by local expert (ascending global id); within an expert they keep the
order of the flattened [T, K] routing table (a stable sort), so every dispatcher produces
the same grouping. `combine` sums the K rows of each token in float32, in k order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch


@dataclass
class Dispatched:
    x_sd: torch.Tensor  # token copies grouped by local expert
    w_s: torch.Tensor  # their routing weights, float32
    counts_e: list[int]  # rows per local expert [E_l]
    handle: Any  # whatever combine needs


@dataclass
class _LocalHandle:
    rows_s: torch.Tensor  # position of each grouped row in the flattened [T*K] table
    t: int
    k: int
    dtype: torch.dtype


class LocalDispatcher:
    """Dispatch with no communication.

    With every routed expert local this is the whole MoE. With a subset (`local_experts`),
    copies routed elsewhere are dropped and `combine` returns this process's partial sum
    (what the reference code's all-reduce scheme sums across ranks).
    """

    def __init__(self, local_experts: Iterable[int], n_experts: int):
        self.local_experts = sorted(int(e) for e in local_experts)
        self.n_experts = int(n_experts)
        self.holds_all = self.local_experts == list(range(self.n_experts))
        cpu = torch.device("cpu")  # explicit: models are built under a meta-device context
        lut = torch.full((self.n_experts,), -1, dtype=torch.int64, device=cpu)
        lut[torch.tensor(self.local_experts, dtype=torch.int64, device=cpu)] = \
            torch.arange(len(self.local_experts), device=cpu)
        self.local_of_e = lut  # global id -> local index, -1 when not held
        self._lut_on: dict[torch.device, torch.Tensor] = {cpu: lut}
        self.received_e = torch.zeros(self.n_experts, dtype=torch.int64, device=cpu)
        self._count_on: dict[torch.device, torch.Tensor] = {}  # local_ids' counts, per device
        self.rows_valid: torch.Tensor | None = None  # [1]: rows counted (set by rank.graphs)

    def _lut(self, device: torch.device) -> torch.Tensor:
        if device not in self._lut_on:
            self._lut_on[device] = self.local_of_e.to(device)
        return self._lut_on[device]

    def local_ids(self, idx_tk: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> local indices (-1: not held), counted on the ids' device with
        no host read (the grouped Triton kernel's input; a CUDA graph may replay this)."""
        dev = idx_tk.device
        if dev not in self._count_on:
            self._count_on[dev] = torch.zeros(self.n_experts, dtype=torch.int64, device=dev)
        ones_tk = torch.ones_like(idx_tk)
        if self.rows_valid is not None:  # a graph step's padding rows are not counted
            ones_tk *= (torch.arange(idx_tk.shape[0], device=dev) < self.rows_valid)[:, None]
        self._count_on[dev].index_add_(0, idx_tk.reshape(-1), ones_tk.reshape(-1))
        return self._lut(dev)[idx_tk]

    def dispatch(self, x_td: torch.Tensor, idx_tk: torch.Tensor, w_tk: torch.Tensor) -> Dispatched:
        t, k = idx_tk.shape
        local_n = self._lut(x_td.device)[idx_tk.reshape(-1)]
        if self.holds_all:
            key_n = local_n
        else:  # drop copies for experts not held: sort them to the end, then cut
            key_n = torch.where(local_n < 0, len(self.local_experts), local_n)
        order_n = torch.sort(key_n, stable=True).indices
        counts = torch.bincount(key_n, minlength=len(self.local_experts) + 1).tolist()
        counts_e = counts[: len(self.local_experts)]
        self.received_e[self.local_experts] += torch.tensor(counts_e, dtype=torch.int64)
        rows_s = order_n[: sum(counts_e)]
        token_s = torch.div(rows_s, k, rounding_mode="floor")
        return Dispatched(
            x_sd=x_td[token_s],
            w_s=w_tk.reshape(-1)[rows_s].to(torch.float32),
            counts_e=counts_e,
            handle=_LocalHandle(rows_s, t, k, x_td.dtype),
        )

    def combine(self, y_sd: torch.Tensor, d: Dispatched) -> torch.Tensor:
        h: _LocalHandle = d.handle
        y_nd = y_sd.new_zeros((h.t * h.k, y_sd.shape[-1]), dtype=torch.float32)
        y_nd[h.rows_s] = y_sd.to(torch.float32)
        return y_nd.view(h.t, h.k, y_sd.shape[-1]).sum(1).to(h.dtype)

    def stats(self) -> dict:
        """Token copies received per (global) expert so far; same keys as AllToAllDispatcher."""
        got = self.received_e.clone()
        for counts in self._count_on.values():  # held experts only, as dispatch counts
            got[self.local_experts] += counts.cpu()[self.local_experts]
        return {"received_per_expert": got.tolist()}
