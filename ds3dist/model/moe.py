"""MoE layer: gate -> dispatcher.dispatch -> experts -> dispatcher.combine -> + shared expert.

`dispatcher` is a plain attribute the runtime may replace (LocalDispatcher by default).
It is called even for zero tokens, so collective dispatchers stay in step across ranks.
With every routed expert local (LocalDispatcher) and stacked bf16 CPU experts, a few tokens
take cpu_kernel.moe_decode instead: the same gate, dispatch, experts and combine in one call.
Where the Triton kernels run (CUDA) and the dispatcher is local, the held experts run in one
grouped launch (kernels.moe.fused_experts), with no host read: a decode step can be a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ds3dist import kernels
from ds3dist.kernels.moe import fused_experts
from ds3dist.model import cpu_kernel
from ds3dist.model.dispatch import LocalDispatcher
from ds3dist.model.experts import Experts
from ds3dist.model.gate import Gate
from ds3dist.model.mlp import MLP
from ds3dist.model.options import BuildOptions


class MoE(nn.Module):
    def __init__(self, opts: BuildOptions, layer_id: int):
        super().__init__()
        c = opts.cfg
        self.layer_id = layer_id
        self.gate = Gate(opts)
        self.experts = Experts(opts, layer_id)
        self.shared_experts = MLP(opts, c.moe_intermediate_size * c.n_shared_experts) \
            if c.n_shared_experts else None
        self.dispatcher = LocalDispatcher(self.experts.expert_ids, c.n_routed_experts)

    def forward(self, x_td: torch.Tensor) -> torch.Tensor:
        if kernels.use_triton(x_td) and isinstance(self.dispatcher, LocalDispatcher):
            idx_tk, w_tk = self.gate(x_td)  # every held expert in one launch, no host read
            out_td = fused_experts(x_td, self.dispatcher.local_ids(idx_tk), w_tk,
                                   *self.experts.grouped())
        elif self._fused(x_td):
            g = self.gate
            out_td = cpu_kernel.moe_decode(x_td, g.weight, g.e_score_correction_bias, g.n_group,
                                           g.topk_group, g.top_k, g.scaling, *self.experts.stacked,
                                           self.dispatcher.received_e)
        else:
            idx_tk, w_tk = self.gate(x_td)
            d = self.dispatcher.dispatch(x_td, idx_tk, w_tk)
            y_sd = self.experts(d.x_sd, d.counts_e, d.w_s)
            out_td = self.dispatcher.combine(y_sd, d)
        if self.shared_experts is not None:
            out_td = out_td + self.shared_experts(x_td)
        return out_td

    def _fused(self, x_td: torch.Tensor) -> bool:
        return (self.experts.stacked is not None and x_td.dtype == torch.bfloat16
                and x_td.shape[0] <= cpu_kernel.MOE_TOKENS
                and self.gate.weight.dtype == torch.bfloat16
                and isinstance(self.dispatcher, LocalDispatcher) and self.dispatcher.holds_all)
