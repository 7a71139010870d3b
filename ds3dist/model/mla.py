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

from ds3dist.model import cpu_kernel
from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.linear import Linear
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions
from ds3dist.model.rope import apply_rope

SCORE_ELEMS = 1 << 26  # attention scores held at once (256 MB in float32)
KERNEL_MAX_LEN = 4  # sequences feeding up to this many tokens (decode, speculative verify)


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

    def forward(self, x_td: torch.Tensor, tb: TokenBatch, cache: PagedCache | None) -> torch.Tensor:
        t = x_td.shape[0]
        if t == 0:
            return x_td.new_zeros(0, self.o_proj.out_features)
        q_thq = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_td))).view(t, self.h, -1)
        q_nope, q_rope = q_thq.split([self.n, self.p], dim=-1)
        q_rope = apply_rope(q_rope, tb.cos_tf[:, None], tb.sin_tf[:, None])
        kv_tc = self.kv_a_proj_with_mqa(x_td)
        latent, k_rope = kv_tc.split([self.r, self.p], dim=-1)
        kv_tc = torch.cat((self.kv_a_layernorm(latent), apply_rope(k_rope, tb.cos_tf, tb.sin_tf)), -1)
        if cache is not None:
            cache.write(self.layer_id, kv_tc, tb)
        if self.form == "absorbed":  # fold kv_b's key part into the queries once per step
            w_hnr = self.wkv_b(q_nope.dtype)[:, : self.n]
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_hnr).transpose(0, 1)  # [t, h, r]
            q_thc = torch.cat((q_lat, q_rope), -1)
        else:
            q_thc = torch.cat((q_nope, q_rope), -1)
        o_th = self._attention(q_thc, kv_tc, tb, cache)
        if self.form == "absorbed":  # kv_b's value part, once for every sequence's latents
            w_hrv = self.wkv_b(o_th.dtype)[:, self.n:].transpose(1, 2)
            o_th = torch.bmm(o_th.transpose(0, 1), w_hrv).transpose(0, 1)  # [t, h, v]
        return self.o_proj(o_th.reshape(t, -1))

    def _attention(self, q_thc: torch.Tensor, kv_tc: torch.Tensor, tb: TokenBatch,
                   cache: PagedCache | None) -> torch.Tensor:
        """Every sequence's attention -> [T, h, r] (absorbed) or [T, h, v] (naive). Queries of
        the absorbed form in sequences of up to KERNEL_MAX_LEN tokens go through the CPU decode
        kernel in one call where it is built (cpu_kernel), each row with its own causal key
        count; the others sequence by sequence."""
        out = q_thc.new_empty(q_thc.shape[0], self.h, self.r if self.form == "absorbed" else self.v)
        decode = []
        if (cache is not None and self.form == "absorbed" and q_thc.device.type == "cpu"
                and q_thc.dtype in (torch.bfloat16, torch.float32) and cpu_kernel.kernel()):
            decode = [i for i, n in enumerate(tb.lens) if 0 < n <= KERNEL_MAX_LEN]
        offsets = tb.offsets
        if decode:
            page_ids, page_starts = tb.flat_pages()
            kv_lens, lens = tb.kv_lens, tb.lens
            rows = [(offsets[i] + j, kv_lens[i] - lens[i] + j + 1, page_starts[i])
                    for i in decode for j in range(lens[i])]  # (row, its keys, its pages)
            cpu_kernel.mla_decode(q_thc, *map(list, zip(*rows)), page_ids,
                                  cache.pools[self.layer_id], self.r, self.scale, out)
        done = set(decode)
        for i, (o, n) in enumerate(zip(offsets, tb.lens)):
            if n == 0 or i in done:
                continue
            kv_sc = cache.keys(self.layer_id, tb, i) if cache is not None else kv_tc[o:o + n]
            out[o:o + n] = self._attend(q_thc[o:o + n], kv_sc, tb.positions_t[o:o + n])
        return out

    def _attend(self, q_thc: torch.Tensor, kv_sc: torch.Tensor, pos_t: torch.Tensor) -> torch.Tensor:
        """One sequence: queries at positions pos_t over its keys 0..s-1 -> [t, h, v] (naive)
        or the attended latents [t, h, r] (absorbed)."""
        t, s = q_thc.shape[0], kv_sc.shape[0]
        if self.form == "naive":
            k_hcs, v_hsv = self._naive_kv(kv_sc)
        step = max(1, SCORE_ELEMS // (self.h * s))  # bound the float32 scores [chunk, h, s]
        out = []
        for i in range(0, t, step):
            q, pos = q_thc[i:i + step], pos_t[i:i + step]
            if self.form == "naive":
                scores_ths = torch.einsum("thc,hcs->ths", q, k_hcs)
            else:
                scores_ths = (q.reshape(-1, q.shape[-1]) @ kv_sc.T).view(q.shape[0], self.h, s)
            probs = self._softmax(scores_ths, pos, s, kv_sc.dtype)
            if self.form == "naive":
                out.append(torch.einsum("ths,hsv->thv", probs, v_hsv))
            else:
                out.append((probs.view(-1, s) @ kv_sc[:, : self.r]).view(q.shape[0], self.h, self.r))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _softmax(self, scores_ths: torch.Tensor, pos_t: torch.Tensor, s: int,
                 dtype: torch.dtype) -> torch.Tensor:
        """Scaled softmax in float32; key j is hidden from a query at position q < j. The
        scores are overwritten."""
        x = scores_ths.float().mul_(self.scale)  # in place: the scores are this step's own
        if int(pos_t[0]) < s - 1:  # some query is before the last key: causal mask
            future_ts = torch.arange(s, device=x.device)[None, :] > pos_t[:, None]
            x.masked_fill_(future_ts[:, None, :], float("-inf"))
        return x.softmax(dim=-1).to(dtype)

    def _naive_kv(self, kv_sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [h, n+p, s] and values [h, s, v] from the latent rows."""
        s = kv_sc.shape[0]
        kvb_she = self.kv_b_proj(kv_sc[:, : self.r]).view(s, self.h, self.n + self.v)
        k_nope, v_shv = kvb_she.split([self.n, self.v], dim=-1)
        k_rope = kv_sc[:, self.r:].unsqueeze(1).expand(s, self.h, self.p)
        return torch.cat((k_nope, k_rope), -1).permute(1, 2, 0), v_shv.transpose(0, 1)
