"""Routed experts computed grouped by expert: one MLP call per expert on its contiguous rows,
or, for bf16 weights on a CPU with the grouped kernel (cpu_kernel), every expert with 1-4 rows
in one kernel call per layer (decode), or, where the Triton kernels run (CUDA), every expert
in one grouped launch (kernels.moe.fused_experts).

Children are named by global expert id ("3" -> `mlp.experts.3.*`, the checkpoint's names).
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from ds3dist import kernels
from ds3dist.kernels.moe import fused_experts
from ds3dist.model import cpu_kernel
from ds3dist.model.mlp import MLP
from ds3dist.model.options import BuildOptions


class Experts(nn.ModuleDict):
    def __init__(self, opts: BuildOptions, layer_id: int):
        held = sorted(opts.experts(layer_id))
        super().__init__({str(e): MLP(opts, opts.cfg.moe_intermediate_size) for e in held})
        self.expert_ids = held
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # ([E, 2I, D], [E, D, I])
        self._grouped: tuple[torch.Tensor | None, ...] | None = None  # grouped()

    def stack(self) -> bool:
        """Fused bf16 CPU experts, where the grouped kernel is available: their weights become
        views into one [E_l, 2I, D] and one [E_l, D, I] tensor (the kernel's operands; memory
        does not grow). Whether it stacked."""
        mlps = list(self.values())
        first = mlps[0].gate_up if mlps else None
        if (first is None or any(m.gate_up is None for m in mlps) or first.device.type != "cpu"
                or first.dtype != torch.bfloat16 or cpu_kernel.kernel() is None):
            return False
        w13 = torch.stack([m.gate_up for m in mlps])
        w2 = torch.stack([m.down_proj.weight for m in mlps])
        for m, gate_up, down in zip(mlps, w13, w2):
            m.use_weights(gate_up, down)
        self.stacked = (w13, w2)
        return True

    def grouped(self) -> tuple[torch.Tensor, ...]:
        """The grouped Triton kernel's operands (w1 [E_l, I, D], w3, w2 [E_l, D, I], then
        their block scales or Nones), stacked on first use; each expert's Linears then hold
        views into them, so memory does not grow."""
        if self._grouped is None:
            mlps = list(self.values())
            lins = [[m.gate_proj for m in mlps], [m.up_proj for m in mlps],
                    [m.down_proj for m in mlps]]
            ws = [torch.stack([lin.weight for lin in group]) for group in lins]
            fp8 = mlps[0].gate_proj.is_fp8
            ss = [torch.stack([lin.weight_scale_inv for lin in group]) if fp8 else None
                  for group in lins]
            for group, w, sc in zip(lins, ws, ss):
                for e, lin in enumerate(group):
                    lin._buffers["weight"] = w[e]
                    if fp8:
                        lin._buffers["weight_scale_inv"] = sc[e]
            for m in mlps:  # computed through the Linears now
                m.gate_up, m.packed = None, None
            self._grouped = (*ws, *ss)
        return self._grouped

    def forward(self, x_sd: torch.Tensor, counts_e: list[int], w_s: torch.Tensor) -> torch.Tensor:
        """x_sd grouped by local expert (ascending id), counts_e rows each -> w_s * expert(x)."""
        if len(counts_e) != len(self.expert_ids):
            raise ValueError(f"{len(counts_e)} counts for {len(self.expert_ids)} local experts")
        if kernels.use_triton(x_sd):  # one launch for every local expert
            e_s = torch.repeat_interleave(torch.arange(len(counts_e), device=x_sd.device),
                                          torch.tensor(counts_e, device=x_sd.device))
            return fused_experts(x_sd, e_s[:, None], w_s[:, None], *self.grouped())
        y_sd = torch.empty_like(x_sd)
        starts_e = [0, *accumulate(counts_e)]
        few = 0 if self.stacked is None or x_sd.dtype != torch.bfloat16 else cpu_kernel.MAX_ROWS
        small_e = [e for e, c in enumerate(counts_e) if 0 < c <= few]
        if small_e:
            cpu_kernel.grouped_experts(x_sd, small_e, [starts_e[e] for e in small_e],
                                       [counts_e[e] for e in small_e], *self.stacked, y_sd)
        for e, (mlp, c) in enumerate(zip(self.values(), counts_e)):  # ascending id, as grouped
            if c > few:
                mlp(x_sd[starts_e[e]:starts_e[e + 1]], out=y_sd[starts_e[e]:starts_e[e + 1]])
        return y_sd.mul_(w_s[:, None])  # in float32, rounded once to the compute dtype
