"""Routed experts computed grouped by expert: one MLP call per expert on its contiguous rows.

Children are named by global expert id ("3" -> `mlp.experts.3.*`, the checkpoint's names).
"""

from __future__ import annotations

import torch
from torch import nn

from ds3dist.model.mlp import MLP
from ds3dist.model.options import BuildOptions


class Experts(nn.ModuleDict):
    def __init__(self, opts: BuildOptions):
        super().__init__({str(e): MLP(opts, opts.cfg.moe_intermediate_size) for e in sorted(opts.experts)})
        self.expert_ids = sorted(opts.experts)

    def forward(self, x_sd: torch.Tensor, counts_e: list[int], w_s: torch.Tensor) -> torch.Tensor:
        """x_sd grouped by local expert (ascending id), counts_e rows each -> w_s * expert(x)."""
        if len(counts_e) != len(self.expert_ids):
            raise ValueError(f"{len(counts_e)} counts for {len(self.expert_ids)} local experts")
        y_sd = torch.empty_like(x_sd)
        start = 0
        for mlp, c in zip(self.values(), counts_e):  # ascending id, as the rows are grouped
            if c:
                mlp(x_sd[start:start + c], out=y_sd[start:start + c])
                start += c
        return y_sd.mul_(w_s[:, None])  # in float32, rounded once to the compute dtype
