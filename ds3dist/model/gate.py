"""noaux_tc router: sigmoid scores, bias for selection only, group-limited top-k.

s = sigmoid(x @ W^T) (float32); selection uses s + bias. Group score = sum of the top-2
biased scores of each group; the best topk_group groups are kept, the others masked with
-inf (so they are never chosen, even when every kept score is negative); top-k experts by
biased score; weights = unbiased s of the chosen / their sum * routed_scaling_factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds3dist.model.options import BuildOptions


def route(scores_te: torch.Tensor, bias_e: torch.Tensor, n_group: int, topk_group: int,
          top_k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores_te: sigmoid scores (float32) -> idx_tk int64 (best first), w_tk float32."""
    t, e = scores_te.shape
    biased_te = scores_te + bias_e
    group_tg = biased_te.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    keep_tg = torch.zeros_like(group_tg, dtype=torch.bool)
    keep_tg.scatter_(1, group_tg.topk(topk_group, dim=-1).indices, True)
    masked_te = biased_te.view(t, n_group, e // n_group).masked_fill(~keep_tg[..., None], float("-inf")).view(t, e)
    idx_tk = masked_te.topk(top_k, dim=-1).indices
    w_tk = scores_te.gather(1, idx_tk)
    w_tk = w_tk / w_tk.sum(-1, keepdim=True) * scaling
    return idx_tk, w_tk


class Gate(nn.Module):
    def __init__(self, opts: BuildOptions):
        super().__init__()
        c = opts.cfg
        self.n_group, self.topk_group, self.top_k = c.n_group, c.topk_group, c.num_experts_per_tok
        self.scaling = float(c.routed_scaling_factor)
        self.register_buffer("weight", torch.empty(c.n_routed_experts, c.hidden_size, dtype=opts.dtype))
        self.register_buffer("e_score_correction_bias", torch.empty(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x_td: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores_te = F.linear(x_td.float(), self.weight.float()).sigmoid()
        return route(scores_te, self.e_score_correction_bias, self.n_group, self.topk_group,
                     self.top_k, self.scaling)
