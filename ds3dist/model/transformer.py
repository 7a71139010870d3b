"""The DeepSeek-V3 model, possibly partial: a contiguous or arbitrary set of held layers.

Stage-by-stage use (what a pipeline stage calls):
    h = model.embed(tokens_bt)                           # first stage
    h = model.forward_layers(h, positions_bt, cache, seq_lens_b)
    logits = model.logits(h)                             # last stage, float32
Whole model: model(tokens_bt) -> float32 logits [b, t, vocab] (causal, no cache).
Module names equal checkpoint names: `layers.i.*` is `model.layers.i.*`, `mtp.61.*` is
`model.layers.61.*` (see checkpoint_name).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ds3dist.model.cache import AttnBatch, LatentCache
from ds3dist.model.embed import Embedding
from ds3dist.model.layer import DecoderLayer
from ds3dist.model.linear import Linear
from ds3dist.model.moe import MoE
from ds3dist.model.mtp import MTPLayer
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import ATTN_FORMS, BuildOptions
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
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, opts.dtype) if embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(opts, i) for i in self.layer_ids})
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, opts.dtype) if head else None
        self.lm_head = Linear(c.hidden_size, c.vocab_size, fp8=False, dtype=opts.dtype) if head else None
        self.mtp = nn.ModuleDict({str(i): MTPLayer(opts, i) for i in c.mtp_layer_ids}) if mtp else None
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

    def set_attn_form(self, form: str) -> None:
        """'absorbed' (default, latent attention) or 'naive' (per-head keys/values)."""
        if form not in ATTN_FORMS:
            raise ValueError(f"attn_form must be one of {ATTN_FORMS}, got {form!r}")
        for m in self.modules():
            if hasattr(m, "form") and hasattr(m, "kv_b_proj"):
                m.form = form

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        """An empty latent cache for the held layers (and MTP layers) of `batch` sequences."""
        c = self.cfg
        return LatentCache(self.layer_ids + self.mtp_layer_ids, batch, max_len,
                           c.kv_lora_rank + c.qk_rope_head_dim, self.dtype, self.device)

    # ---- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, tokens_bt: torch.Tensor) -> torch.Tensor:
        """tokens [b, t] -> hidden [b, t, d] in the compute dtype."""
        if self.embed_tokens is None:
            raise RuntimeError("this model part does not hold the embedding")
        return self.embed_tokens(tokens_bt.to(self.device))

    def attn_batch(self, positions_bt: torch.Tensor, seq_lens_b=None,
                   cache: LatentCache | None = None) -> AttnBatch:
        return AttnBatch.build(positions_bt.to(self.device), seq_lens_b, self.rope, cache)

    @torch.no_grad()
    def forward_layers(self, h_btd: torch.Tensor, positions_bt: torch.Tensor | None = None,
                       cache: LatentCache | None = None, seq_lens_b=None) -> torch.Tensor:
        """Run the held layers in order.

        h_btd: right-padded hidden states; positions_bt: each token's position (default
        0..t-1); seq_lens_b: real tokens per row (default all t). Without a cache attention is
        causal within the step; with one, each real token's row is written at its position
        and attends to rows 0..position (prefill and decode alike), and cache.lens advances.
        Zero tokens (b = 0 or t = 0) still pass through every MoE dispatcher.
        """
        b, t, _ = h_btd.shape
        if positions_bt is None:
            positions_bt = torch.arange(t, device=h_btd.device).expand(b, t)
        ab = self.attn_batch(positions_bt, seq_lens_b, cache)
        for layer in self.layers.values():
            h_btd = layer(h_btd, ab, cache)
        if cache is not None:
            cache.advance(ab)
        return h_btd

    @torch.no_grad()
    def logits(self, h_btd: torch.Tensor) -> torch.Tensor:
        """Final norm + head: float32 logits [b, t, vocab]."""
        if self.lm_head is None:
            raise RuntimeError("this model part does not hold the head")
        return self.lm_head(self.norm(h_btd)).float()

    @torch.no_grad()
    def forward(self, tokens_bt: torch.Tensor, seq_lens_b=None) -> torch.Tensor:
        """Full causal forward without cache: float32 logits [b, t, vocab]."""
        if self.layer_ids != list(range(self.cfg.num_hidden_layers)):
            raise RuntimeError(f"forward needs every layer; this part holds {self.layer_ids}")
        h_btd = self.forward_layers(self.embed(tokens_bt), None, None, seq_lens_b)
        return self.logits(h_btd)

    @torch.no_grad()
    def mtp_hidden(self, hidden_btd: torch.Tensor, next_tokens_bt: torch.Tensor,
                   positions_bt: torch.Tensor | None = None, cache: LatentCache | None = None,
                   seq_lens_b=None) -> torch.Tensor:
        """The MTP block's output (before shared_head) for hidden_btd (main model's last
        hidden state, before the final norm) and next_tokens_bt (token t+1 at each t)."""
        if self.mtp is None:
            raise RuntimeError("this model part does not hold the MTP layer")
        b, t, _ = hidden_btd.shape
        if positions_bt is None:
            positions_bt = torch.arange(t, device=hidden_btd.device).expand(b, t)
        ab = self.attn_batch(positions_bt, seq_lens_b, cache)
        layer = self.mtp[str(self.mtp_layer_ids[0])]  # depth 1 (the release has one module)
        h_btd = layer.block(hidden_btd, next_tokens_bt.to(self.device), ab, cache)
        if cache is not None:
            cache.advance(ab)
        return h_btd

    @torch.no_grad()
    def mtp_logits(self, hidden_btd: torch.Tensor, next_tokens_bt: torch.Tensor,
                   positions_bt: torch.Tensor | None = None, cache: LatentCache | None = None,
                   seq_lens_b=None) -> torch.Tensor:
        """Float32 logits for token t+2 at each position t (see mtp_hidden).

        Positions default to those of h_t; rotary attention depends only on position
        differences, so any constant offset (e.g. using t+1) gives the same result."""
        h_btd = self.mtp_hidden(hidden_btd, next_tokens_bt, positions_bt, cache, seq_lens_b)
        return self.mtp[str(self.mtp_layer_ids[0])].shared_head(h_btd)
