"""Multi-token prediction head (layer num_hidden_layers of the checkpoint).

Predicts token t+2 from the main model's last hidden state h_t (before the final norm) and
the embedding of token t+1:
    u = eh_proj(cat([enorm(embed(t+1)), hnorm(h_t)]))  ->  decoder block  ->
    shared_head.norm  ->  shared_head.head.
The block is a full (MoE) decoder layer; the layer holds its own copies of the embedding
and head, as the checkpoint stores them.
"""

from __future__ import annotations

import torch
from torch import nn

from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.embed import Embedding
from ds3dist.model.layer import DecoderLayer
from ds3dist.model.linear import Linear
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions


class SharedHead(nn.Module):
    def __init__(self, opts: BuildOptions):
        super().__init__()
        c = opts.cfg
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, opts.dtype)
        self.head = Linear(c.hidden_size, c.vocab_size, fp8=False, dtype=opts.dtype)

    def forward(self, h_td: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h_td)).float()


class MTPLayer(DecoderLayer):
    def __init__(self, opts: BuildOptions, layer_id: int):
        super().__init__(opts, layer_id)
        c, dt = opts.cfg, opts.dtype
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dt)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.eh_proj = Linear(2 * c.hidden_size, c.hidden_size, fp8=False, dtype=dt)
        self.shared_head = SharedHead(opts)

    def block(self, hidden_td: torch.Tensor, next_tokens_t: torch.Tensor, tb: TokenBatch,
              cache: PagedCache | None = None) -> torch.Tensor:
        """The block's output hidden state (before shared_head)."""
        e_td = self.enorm(self.embed_tokens(next_tokens_t))
        u_td = self.eh_proj(torch.cat((e_td, self.hnorm(hidden_td.to(e_td.dtype))), dim=-1))
        return super().forward(u_td, tb, cache)
