"""Multi-token prediction head (layer num_hidden_layers of the checkpoint).

Predicts token t+2 from the main model's last hidden state h_t (before the final norm) and
the embedding of token t+1:
    u = eh_proj(cat([enorm(embed(t+1)), hnorm(h_t)]))  ->  decoder block  ->
    shared_head.norm  ->  shared_head.head.
The block is a full (MoE) decoder layer. The checkpoint stores the embedding and head again
in the layer; they are the main model's (DeepSeek-V3 shares them), so the head is always the
main one and the layer's embedding copy is loaded only by a model part without the main
embedding (the last pipeline stage).
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
    """The MTP's final norm (`shared_head.norm`); its head is the main model's."""

    def __init__(self, opts: BuildOptions):
        super().__init__()
        c = opts.cfg
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, opts.dtype)


class MTPLayer(DecoderLayer):
    def __init__(self, opts: BuildOptions, layer_id: int, own_embedding: bool):
        super().__init__(opts, layer_id)
        c, dt = opts.cfg, opts.dtype
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dt) if own_embedding else None
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.eh_proj = Linear(2 * c.hidden_size, c.hidden_size, fp8=False, dtype=dt)
        self.shared_head = SharedHead(opts)

    def block(self, embed: Embedding, hidden_td: torch.Tensor, next_tokens_t: torch.Tensor,
              tb: TokenBatch, cache: PagedCache | None = None) -> torch.Tensor:
        """The block's output hidden state (before shared_head), tokens embedded by `embed`."""
        e_td = self.enorm(embed(next_tokens_t))
        u_td = self.eh_proj(torch.cat((e_td, self.hnorm(hidden_td.to(e_td.dtype))), dim=-1))
        return super().forward(u_td, tb, cache)
