"""The DeepSeek-V3 model, possibly partial: a contiguous or arbitrary set of held layers.

Stage-by-stage use over a flat batch (what a pipeline stage calls):
    tb = model.token_batch(starts, lens, page_tables, page_size)   # once per step
    h = model.embed(tokens_t)                            # first stage, [T, D]
    h = model.forward_layers(h, tb, cache)               # the held layers
    logits = model.logits(h[tb.last_rows])               # last stage, float32 [B, vocab]
Whole model: model(tokens_bt, seq_lens_b) -> float32 logits [b, t, vocab] (causal, no cache).
Module names equal checkpoint names: `layers.i.*` is `model.layers.i.*`, `mtp.61.*` is
`model.layers.61.*` (see checkpoint_name).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.embed import Embedding
from ds3dist.model.layer import DecoderLayer
from ds3dist.model.linear import Linear
from ds3dist.model.moe import MoE
from ds3dist.model.mtp import MTPLayer
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions
from ds3dist.model.rope import Rope


def checkpoint_name(key: str) -> str:
    """State-dict key of a Transformer -> tensor name in the checkpoint."""
    if key.startswith("lm_head."):
        return key
    if key.startswith("mtp."):
        return "model.layers." + key[len("mtp."):]
    return "model." + key


class Transformer(nn.Module):
    def __init__(self, opts: BuildOptions, layer_ids: Iterable[int] | None = None,
                 embed: bool | None = None, head: bool | None = None, mtp: bool | None = None):
        super().__init__()
        c = self.cfg = opts.cfg
        self.opts = opts
        n = c.num_hidden_layers
        self.layer_ids = sorted(set(range(n) if layer_ids is None else (int(i) for i in layer_ids)))
        bad = [i for i in self.layer_ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"layer ids {bad} are outside 0..{n - 1}")
        embed = (0 in self.layer_ids) if embed is None else embed
        head = (n - 1 in self.layer_ids) if head is None else head
        mtp = (n - 1 in self.layer_ids and c.num_nextn_predict_layers > 0) if mtp is None else mtp
        if mtp and c.num_nextn_predict_layers == 0:
            raise ValueError("mtp=True but the config has num_nextn_predict_layers = 0")
        if mtp and not head:
            raise ValueError("the MTP layer needs the head: hold it on the part with the last layer")
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, opts.dtype) if embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(opts, i) for i in self.layer_ids})
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, opts.dtype) if head else None
        self.lm_head = Linear(c.hidden_size, c.vocab_size, fp8=False, dtype=opts.dtype) if head else None
        self.mtp = nn.ModuleDict({str(i): MTPLayer(opts, i, own_embedding=not embed)
                                  for i in c.mtp_layer_ids}) if mtp else None
        self.rope = Rope(c)
        self.load_stats: dict = {}

    # ---- properties ---------------------------------------------------------------------
    @property
    def config(self):
        """The ModelConfig (same object as `cfg`)."""
        return self.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.opts.dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    @property
    def mtp_layer_ids(self) -> list[int]:
        return [int(i) for i in self.mtp] if self.mtp is not None else []

    def moe_layers(self) -> dict[int, MoE]:
        """{layer id: MoE module} of every held MoE layer (MTP included); set `.dispatcher`."""
        blocks = list(self.layers.values()) + list(self.mtp.values() if self.mtp is not None else [])
        return {b.layer_id: b.mlp for b in blocks if isinstance(b.mlp, MoE)}

    def new_cache(self, num_pages: int, page_size: int, scratch: bool = False) -> PagedCache:
        """A pool of pages for the held layers (and MTP layers), allocated once (scratch: see
        PagedCache)."""
        return PagedCache(self.layer_ids + self.mtp_layer_ids, num_pages, page_size,
                          self.cache_width, self.dtype, self.device, scratch)

    @property
    def cache_width(self) -> int:
        return self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim

    def token_batch(self, starts, lens, page_tables=None, page_size: int | None = None) -> TokenBatch:
        return TokenBatch.build(starts, lens, self.rope, self.device, page_tables, page_size)

    # ---- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, tokens_t: torch.Tensor) -> torch.Tensor:
        """token ids [T] -> hidden [T, D] in the compute dtype."""
        if self.embed_tokens is None:
            raise RuntimeError("this model part does not hold the embedding")
        return self.embed_tokens(tokens_t.to(self.device))

    @torch.no_grad()
    def forward_layers(self, h_td: torch.Tensor, tb: TokenBatch,
                       cache: PagedCache | None = None) -> torch.Tensor:
        """Run the held layers over the step's tokens. With a cache each token's row is
        written at its slot and attends to its sequence's rows 0..position; without one,
        attention is causal within each sequence's own tokens. Zero tokens still pass
        through every MoE dispatcher (collective dispatchers stay in step)."""
        for layer in self.layers.values():
            h_td = layer(h_td, tb, cache)
        return h_td

    @torch.no_grad()
    def logits(self, h_nd: torch.Tensor) -> torch.Tensor:
        """Final norm + head: float32 logits [..., vocab]."""
        if self.lm_head is None:
            raise RuntimeError("this model part does not hold the head")
        return self.lm_head(self.norm(h_nd)).float()

    @torch.no_grad()
    def forward(self, tokens_bt: torch.Tensor, seq_lens_b=None) -> torch.Tensor:
        """Full causal forward of right-padded prompts without a cache: float32 logits
        [b, t, vocab] (zeros at padded positions)."""
        if self.layer_ids != list(range(self.cfg.num_hidden_layers)):
            raise RuntimeError(f"forward needs every layer; this part holds {self.layer_ids}")
        b, t = tokens_bt.shape
        lens = [t] * b if seq_lens_b is None else [int(n) for n in seq_lens_b]
        valid_bt = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
        tb = self.token_batch([0] * b, lens)
        h_td = self.forward_layers(self.embed(tokens_bt[valid_bt]), tb)
        out = torch.zeros(b, t, self.cfg.vocab_size, dtype=torch.float32, device=h_td.device)
        out[valid_bt.to(out.device)] = self.logits(h_td)
        return out

    @torch.no_grad()
    def mtp_hidden(self, hidden_td: torch.Tensor, next_tokens_t: torch.Tensor, tb: TokenBatch,
                   cache: PagedCache | None = None) -> torch.Tensor:
        """The MTP block's output (before shared_head) for hidden_td (main model's last
        hidden state, before the final norm) and next_tokens_t (token t+1 at each t)."""
        layer = self._mtp_layer()
        embed = self.embed_tokens if self.embed_tokens is not None else layer.embed_tokens
        return layer.block(embed, hidden_td, next_tokens_t.to(self.device), tb, cache)

    def _mtp_layer(self) -> MTPLayer:
        if self.mtp is None:
            raise RuntimeError("this model part does not hold the MTP layer")
        return self.mtp[str(self.mtp_layer_ids[0])]  # depth 1 (the release has one module)

    @torch.no_grad()
    def mtp_norm(self, h_nd: torch.Tensor) -> torch.Tensor:
        """The MTP block's output through its final norm (what the head reads)."""
        return self._mtp_layer().shared_head.norm(h_nd)

    @torch.no_grad()
    def mtp_head(self, h_nd: torch.Tensor) -> torch.Tensor:
        """The MTP block's output -> float32 logits: its own norm, the main head."""
        return self.lm_head(self.mtp_norm(h_nd)).float()

    @torch.no_grad()
    def mtp_logits(self, hidden_td: torch.Tensor, next_tokens_t: torch.Tensor, tb: TokenBatch,
                   cache: PagedCache | None = None) -> torch.Tensor:
        """Float32 logits for token t+2 at each position t (see mtp_hidden).

        Positions are those of h_t; rotary attention depends only on position differences,
        so any constant offset (e.g. using t+1) gives the same result."""
        return self.mtp_head(self.mtp_hidden(hidden_td, next_tokens_t, tb, cache))
