"""Gated MLP: down(silu(gate(x)) * up(x)). Dense layers, each routed expert, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds3dist.model.linear import Linear, matmul, packed_weight
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
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate_up, down) packed

    def fuse(self) -> None:
        """Plain weights: one [gate; up] matrix, one GEMM instead of two."""
        if not self.gate_proj.is_fp8 and self.gate_up is None:
            self.use_weights(torch.cat((self.gate_proj.weight, self.up_proj.weight)),
                             self.down_proj.weight)

    def use_weights(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Hold plain [gate; up] and down weights given from outside (e.g. views into a layer's
        stacked experts); gate_proj and up_proj keep their (checkpoint-named) weights as views
        into gate_up, so memory does not grow."""
        self.gate_up = gate_up
        self.gate_proj._buffers["weight"] = gate_up[: self.inter]
        self.up_proj._buffers["weight"] = gate_up[self.inter:]
        self.down_proj._buffers["weight"] = down

    def pack(self) -> bool:
        """oneDNN-packed copies of the fused [gate; up] and down weights (linear.packed_weight),
        used for every input: routed experts run at 1-2 rows a step in decode, where they are
        about 2x faster than F.linear. Costs the weights' bytes again; whether it packed."""
        if self.gate_up is None:
            return False
        gate_up, down = packed_weight(self.gate_up), packed_weight(self.down_proj.weight)
        self.packed = (gate_up, down) if gate_up is not None and down is not None else None
        return self.packed is not None

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: where to write the result (a routed expert's rows of the layer's output)."""
        if self.gate_up is None:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        else:
            packed_gu, packed_down = self.packed or (None, None)
            gate, up = matmul(x, self.gate_up, packed_gu).split(self.inter, dim=-1)
            y = matmul(F.silu(gate).mul_(up), self.down_proj.weight, packed_down)
        return y if out is None else out.copy_(y)
