"""Gated MLP: down(silu(gate(x)) * up(x)). Dense layers, each routed expert, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds3dist.model.linear import Linear
from ds3dist.model.options import BuildOptions


class MLP(nn.Module):
    def __init__(self, opts: BuildOptions, inter: int):
        super().__init__()
        d, fp8, dt, blk = opts.cfg.hidden_size, opts.fp8, opts.dtype, opts.cfg.block_size
        self.gate_proj = Linear(d, inter, fp8, dt, blk)
        self.up_proj = Linear(d, inter, fp8, dt, blk)
        self.down_proj = Linear(inter, d, fp8, dt, blk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
