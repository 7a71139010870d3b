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
        self.inter = inter
        self.gate_up: torch.Tensor | None = None  # [2 * inter, d] once fused

    def fuse(self) -> None:
        """Plain weights: one [gate; up] matrix, one GEMM instead of two. gate_proj and up_proj
        keep their (checkpoint-named) weights as views into it, so memory does not grow."""
        if self.gate_proj.is_fp8 or self.gate_up is not None:
            return
        self.gate_up = torch.cat((self.gate_proj.weight, self.up_proj.weight))
        self.gate_proj._buffers["weight"] = self.gate_up[: self.inter]
        self.up_proj._buffers["weight"] = self.gate_up[self.inter:]

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: where to write the result (a routed expert's rows of the layer's output)."""
        if self.gate_up is None:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            return y if out is None else out.copy_(y)
        gate, up = F.linear(x, self.gate_up).split(self.inter, dim=-1)
        h = F.silu(gate).mul_(up)
        if out is None:
            return F.linear(h, self.down_proj.weight)
        return torch.mm(h, self.down_proj.weight.t(), out=out)
