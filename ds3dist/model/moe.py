"""MoE layer: gate -> dispatcher.dispatch -> experts -> dispatcher.combine -> + shared expert.

`dispatcher` is a plain attribute the runtime may replace (LocalDispatcher by default).
It is called even for zero tokens, so collective dispatchers stay in step across ranks.
"""

from __future__ import annotations

import torch
from torch import nn

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
        self.experts = Experts(opts)
        self.shared_experts = MLP(opts, c.moe_intermediate_size * c.n_shared_experts) \
            if c.n_shared_experts else None
        self.dispatcher = LocalDispatcher(self.experts.expert_ids, c.n_routed_experts)

    def forward(self, x_td: torch.Tensor) -> torch.Tensor:
        idx_tk, w_tk = self.gate(x_td)
        d = self.dispatcher.dispatch(x_td, idx_tk, w_tk)
        y_sd = self.experts(d.x_sd, d.counts_e, d.w_s)
        out_td = self.dispatcher.combine(y_sd, d)
        if self.shared_experts is not None:
            out_td = out_td + self.shared_experts(x_td)
        return out_td
