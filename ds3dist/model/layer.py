"""Decoder layer: h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))."""

from __future__ import annotations

import torch
from torch import nn

from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.mla import MLA
from ds3dist.model.mlp import MLP
from ds3dist.model.moe import MoE
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions


class DecoderLayer(nn.Module):
    def __init__(self, opts: BuildOptions, layer_id: int):
        super().__init__()
        c = opts.cfg
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, opts.dtype)
        self.self_attn = MLA(opts, layer_id)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, opts.dtype)
        self.mlp = MoE(opts, layer_id) if c.is_moe_layer(layer_id) else MLP(opts, c.intermediate_size)

    def forward(self, x_td: torch.Tensor, tb: TokenBatch, cache: PagedCache | None = None) -> torch.Tensor:
        h_td = x_td + self.self_attn(self.input_layernorm(x_td), tb, cache)
        return h_td + self.mlp(self.post_attention_layernorm(h_td))
