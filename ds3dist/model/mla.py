"""Multi-head latent attention (MLA), naive and absorbed forms.

q = q_b(rmsnorm(q_a(x))) -> per head [nope n | rope p]; kv_a(x) -> [latent r | k_rope p];
latent -> kv_a_layernorm; the rope parts rotate (interleaved YaRN). Keys/values per token
are the row [latent | k_rope] (what the cache holds).

naive:    kv_b(latent) -> per head [k_nope n | v]; k = [k_nope | k_rope]; softmax(q.k) v.
absorbed: fold kv_b's k_nope part into q (q_lat = q_nope @ W_k, [h, r]) so that
          scores = [q_lat | q_rope] . [latent | k_rope]; attend over latents and apply
          kv_b's v part after attention. Same numbers, no per-head keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ds3dist.model.cache import AttnBatch, LatentCache
from ds3dist.model.linear import Linear
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions
from ds3dist.model.rope import apply_rope

SCORE_ELEMS = 1 << 26  # attention scores held at once (256 MB in float32)


class MLA(nn.Module):
    def __init__(self, opts: BuildOptions, layer_id: int):
        super().__init__()
        c, dt, fp8, blk = opts.cfg, opts.dtype, opts.fp8, opts.cfg.block_size
        self.layer_id = layer_id
        self.h, self.n, self.p, self.v = (c.num_attention_heads, c.qk_nope_head_dim,
                                          c.qk_rope_head_dim, c.v_head_dim)
        self.r = c.kv_lora_rank
        self.scale = c.softmax_scale()
        self.form = opts.attn_form
        self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, fp8, dt, blk)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dt)
        self.q_b_proj = Linear(c.q_lora_rank, self.h * (self.n + self.p), fp8, dt, blk)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, self.r + self.p, fp8, dt, blk)
        self.kv_a_layernorm = RMSNorm(self.r, c.rms_norm_eps, dt)
        self.kv_b_proj = Linear(self.r, self.h * (self.n + self.v), fp8, dt, blk)
        self.o_proj = Linear(self.h * self.v, c.hidden_size, fp8, dt, blk)
        self._wkv_b_dense = None  # [h, n + v, r] for the absorbed form, made on first use

    def wkv_b(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b as [h, n + v, r] (FP8 weights dequantized once and kept)."""
        if not self.kv_b_proj.is_fp8:
            return self.kv_b_proj.weight.view(self.h, self.n + self.v, self.r)
        w = self._wkv_b_dense
        if w is None or w.dtype != dtype or w.device != self.kv_b_proj.weight.device:
            w = self.kv_b_proj.dense_weight(dtype)
            self._wkv_b_dense = w.view(self.h, self.n + self.v, self.r)
        return self._wkv_b_dense

    def forward(self, x_btd: torch.Tensor, ab: AttnBatch, cache: LatentCache | None) -> torch.Tensor:
        b, t, _ = x_btd.shape
        if b * t == 0:
            return x_btd.new_zeros(b, t, self.o_proj.out_features)
        q_bthq = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_btd))).view(b, t, self.h, -1)
        q_nope, q_rope = q_bthq.split([self.n, self.p], dim=-1)
        q_rope = apply_rope(q_rope, ab.cos_btf[:, :, None], ab.sin_btf[:, :, None])
        kv_btc = self.kv_a_proj_with_mqa(x_btd)
        latent, k_rope = kv_btc.split([self.r, self.p], dim=-1)
        kv_btc = torch.cat((self.kv_a_layernorm(latent), apply_rope(k_rope, ab.cos_btf, ab.sin_btf)), -1)
        if cache is not None:
            cache.write(self.layer_id, kv_btc, ab)
            kv_bsc = cache.read(self.layer_id, ab.n_keys)
        else:
            kv_bsc = kv_btc
        if ab.n_keys == 0:  # only padding in this step
            return x_btd.new_zeros(b, t, self.o_proj.out_features)
        if self.form == "naive":
            k_bhcs, v_bhsv = self._naive_kv(kv_bsc)
            attend = lambda qn, qr, m: self._naive(qn, qr, k_bhcs, v_bhsv, m)  # noqa: E731
        else:
            attend = lambda qn, qr, m: self._absorbed(qn, qr, kv_bsc, m)  # noqa: E731
        # bound the float32 score tensor [b, chunk, h, s] by attending in query chunks
        step = max(1, SCORE_ELEMS // (b * self.h * ab.n_keys))
        o_bthv = torch.cat([attend(q_nope[:, i:i + step], q_rope[:, i:i + step], ab.mask_bts[:, i:i + step])
                            for i in range(0, t, step)], 1) if t > step else \
            attend(q_nope, q_rope, ab.mask_bts)
        return self.o_proj(o_bthv.flatten(2))

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (scores.float() * self.scale + mask).softmax(dim=-1).to(dtype)

    def _naive_kv(self, kv_bsc):
        """Per-head keys [b, h, n+p, s] and values [b, h, s, v] from the latent rows."""
        b, s = kv_bsc.shape[:2]
        kvb_bshe = self.kv_b_proj(kv_bsc[..., : self.r]).view(b, s, self.h, self.n + self.v)
        k_nope, v_bshv = kvb_bshe.split([self.n, self.v], dim=-1)
        k_rope = kv_bsc[..., self.r:].unsqueeze(2).expand(b, s, self.h, self.p)
        return torch.cat((k_nope, k_rope), -1).permute(0, 2, 3, 1), v_bshv.transpose(1, 2)

    def _naive(self, q_nope, q_rope, k_bhcs, v_bhsv, mask_bts):
        q_bhtc = torch.cat((q_nope, q_rope), -1).transpose(1, 2)
        probs = self._softmax(q_bhtc @ k_bhcs, mask_bts[:, None], v_bhsv.dtype)  # [b, h, t, s]
        return (probs @ v_bhsv).transpose(1, 2)  # [b, t, h, v]

    def _absorbed(self, q_nope, q_rope, kv_bsc, mask_bts):
        b, t, s = q_nope.shape[0], q_nope.shape[1], kv_bsc.shape[1]
        w = self.wkv_b(q_nope.dtype)
        w_k, w_v = w[:, : self.n], w[:, self.n:]  # [h, n, r], [h, v, r]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_k)
        q_bxc = torch.cat((q_lat, q_rope), -1).view(b, t * self.h, self.r + self.p)
        scores = (q_bxc @ kv_bsc.transpose(1, 2)).view(b, t, self.h, s)
        probs = self._softmax(scores, mask_bts[:, :, None], kv_bsc.dtype)
        o_lat = probs.view(b, t * self.h, s) @ kv_bsc[..., : self.r]  # [b, t*h, r]
        return torch.einsum("bthr,hvr->bthv", o_lat.view(b, t, self.h, self.r), w_v)
