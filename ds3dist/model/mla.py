"""Multi-head latent attention (MLA), naive and absorbed forms.

q = q_b(rmsnorm(q_a(x))) -> per head [nope n | rope p]; kv_a(x) -> [latent r | k_rope p];
latent -> kv_a_layernorm; the rope parts rotate (interleaved YaRN). Keys/values per token
are the row [latent | k_rope] (what the cache holds).

naive:    kv_b(latent) -> per head [k_nope n | v]; k = [k_nope | k_rope]; softmax(q.k) v.
absorbed: fold kv_b's k_nope part into q (q_lat = q_nope @ W_k, [h, r]) so that
          scores = [q_lat | q_rope] . [latent | k_rope]; attend over latents and apply
          kv_b's v part after attention. Same numbers, no per-head keys.
auto:     per sequence and step, the form with fewer multiplies (MLA.absorbs): absorbed for
          decode and verify, naive for long prefill chunks, both from the dense kv_b.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from ds3dist import kernels
from ds3dist.kernels.mla_decode import mla_decode
from ds3dist.model import cpu_kernel
from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.linear import Linear
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions
from ds3dist.model.rope import apply_rope

MASK_ELEMS = 1 << 26  # causal-mask entries held at once (64 MB)
KERNEL_MAX_LEN = 4  # sequences feeding up to this many tokens (decode, speculative verify)


def _decode_tiling() -> dict:
    """The Triton decode kernel's key splits and tile: under the interpreter (numpy per
    program, tests on a CPU) fewer, wider programs run much faster."""
    return {"num_splits": 2, "block_n": 128} if kernels.interpreting() else {}


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
        seqs = [(i, o, n) for i, (o, n) in enumerate(zip(tb.offsets, tb.lens)) if n]
        naive = [s for s in seqs if not self.absorbs(s[2])]
        if not naive:  # decode steps: every row at once
            return self.o_proj(self._absorbed(q_nope, q_rope, kv_tc, tb, cache, seqs).reshape(t, -1))
        o_thv = q_nope.new_empty(t, self.h, self.v)
        for i, o, n in naive:
            kv_sc = cache.keys(self.layer_id, tb, i) if cache is not None else kv_tc[o:o + n]
            q_thc = torch.cat((q_nope[o:o + n], q_rope[o:o + n]), -1)
            o_thv[o:o + n] = self._attend(q_thc, kv_sc, tb.positions_t[o:o + n], absorbed=False)
        absorbed = [s for s in seqs if s not in naive]
        if absorbed:
            rows = torch.cat([torch.arange(o, o + n) for _, o, n in absorbed]).to(q_nope.device)
            o_thv[rows] = self._absorbed(q_nope[rows], q_rope[rows], kv_tc, tb, cache, absorbed)
        return self.o_proj(o_thv.reshape(t, -1))

    def absorbs(self, n_q: int) -> bool:
        """Whether a sequence feeding n_q queries this step attends in the absorbed form: as
        the form says, or ("auto") where that takes fewer multiplies. Per key, absorbed costs
        n_q * h * (2r + p) (scores and latents over [latent | k_rope]); naive costs
        n_q * h * (n + p + v) plus h * r * (n + v) to expand the key through kv_b once. So decode
        and verify steps are absorbed and long prefill chunks naive."""
        if self.form != "auto":
            return self.form == "absorbed"
        return n_q * (2 * self.r - self.n - self.v) <= self.r * (self.n + self.v)

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_tc: torch.Tensor,
                  tb: TokenBatch, cache: PagedCache | None, seqs: list[tuple[int, int, int]]
                  ) -> torch.Tensor:
        """The absorbed form for sequences seqs (i, offset in the step, tokens), whose query
        rows, in order, are q_nope/q_rope -> [rows, h, v]: kv_b's key part folded into the
        queries and its value part applied to the attended latents, once for all rows."""
        w_hnr = self.wkv_b(q_nope.dtype)[:, : self.n]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_hnr).transpose(0, 1)  # [rows, h, r]
        lat_thr = self.attend_latents(torch.cat((q_lat, q_rope), -1), kv_tc, tb, cache, seqs)
        w_hrv = self.wkv_b(lat_thr.dtype)[:, self.n:].transpose(1, 2)
        return torch.bmm(lat_thr.transpose(0, 1), w_hrv).transpose(0, 1)  # [rows, h, v]

    def attend_latents(self, q_thc: torch.Tensor, kv_tc: torch.Tensor | None, tb: TokenBatch,
                       cache: PagedCache | None, seqs: list[tuple[int, int, int]] | None = None
                       ) -> torch.Tensor:
        """Absorbed queries [rows, h, r + p] of sequences seqs (default: every sequence of tb
        with tokens) -> their attended latents [rows, h, r]. Sequences of up to
        KERNEL_MAX_LEN tokens go through the CPU decode kernel in one call where it is built
        (cpu_kernel), or on CUDA the Triton kernel (kernels.mla_decode), each row with its own
        causal key count; the others one by one."""
        if seqs is None:
            seqs = [(i, o, n) for i, (o, n) in enumerate(zip(tb.offsets, tb.lens)) if n]
        out = q_thc.new_empty(q_thc.shape[0], self.h, self.r)
        local = [0, *accumulate(n for _, _, n in seqs)]  # each sequence's first row in q_thc
        triton = cache is not None and kernels.use_triton(q_thc)
        decode = []
        if triton or (cache is not None and q_thc.device.type == "cpu"
                      and q_thc.dtype in (torch.bfloat16, torch.float32) and cpu_kernel.kernel()):
            decode = [k for k, (_, _, n) in enumerate(seqs) if n <= KERNEL_MAX_LEN]
        if triton and tb.kernel_rows is not None:  # a CUDA-graph step: every row, in order
            mla_decode(q_thc, *tb.kernel_rows, cache.pools[self.layer_id], self.r, self.scale,
                       out_rhr=out, **_decode_tiling())
            return out
        if decode:
            page_ids, page_starts = tb.flat_pages()
            kv_lens = tb.kv_lens
            rows = [(local[k] + j, kv_lens[i] - n + j + 1, page_starts[i])
                    for k in decode for i, _, n in [seqs[k]] for j in range(n)]
            if triton:
                self._triton_rows(q_thc, rows, page_ids, cache, out)
            else:
                cpu_kernel.mla_decode(q_thc, *map(list, zip(*rows)), page_ids,
                                      cache.pools[self.layer_id], self.r, self.scale, out)
        done = set(decode)
        for k, (i, o, n) in enumerate(seqs):
            if k in done:
                continue
            kv_sc = cache.keys(self.layer_id, tb, i) if cache is not None else kv_tc[o:o + n]
            a = local[k]
            out[a:a + n] = self._attend(q_thc[a:a + n], kv_sc, tb.positions_t[o:o + n],
                                        absorbed=True)
        return out

    def _triton_rows(self, q_thc: torch.Tensor, rows: list[tuple[int, int, int]],
                     page_ids: torch.Tensor, cache: PagedCache, out: torch.Tensor) -> None:
        """The Triton decode kernel over rows (row in q_thc, key count, first page)."""
        idx, kv_len, start = (torch.tensor(v, dtype=torch.int32, device=q_thc.device)
                              for v in zip(*rows))
        pool = cache.pools[self.layer_id]
        if len(rows) == q_thc.shape[0]:  # every row, in order
            mla_decode(q_thc, kv_len, start, page_ids, pool, self.r, self.scale, out_rhr=out,
                       **_decode_tiling())
        else:
            out[idx] = mla_decode(q_thc[idx], kv_len, start, page_ids, pool, self.r, self.scale,
                                  **_decode_tiling())

    def _attend(self, q_thc: torch.Tensor, kv_sc: torch.Tensor, pos_t: torch.Tensor,
                absorbed: bool) -> torch.Tensor:
        """One sequence: queries at positions pos_t over its keys 0..s-1 -> [t, h, v] (naive)
        or the attended latents [t, h, r] (absorbed), key j hidden from a query at position
        q < j. torch's fused attention (flash on CPU and GPU) holds no [t, h, s] scores; it
        wants one width for keys and values, so the absorbed form attends over the whole row
        [latent | k_rope] (its rope columns dropped after) and the naive values are padded."""
        t, s = q_thc.shape[0], kv_sc.shape[0]
        if absorbed:
            k_1hsc = v_1hsc = kv_sc[None, None].expand(1, self.h, s, kv_sc.shape[1])
            width = self.r
        else:
            k_1hsc, v_1hsc = self._naive_kv(kv_sc)
            width = self.v
        step = max(1, MASK_ELEMS // s)  # bound the [chunk, s] causal mask
        out = []
        for i in range(0, t, step):
            q_1htc, pos = q_thc[i:i + step].transpose(0, 1)[None], pos_t[i:i + step]
            mask_ts = None
            if int(pos[0]) < s - 1:  # some query is before the last key
                mask_ts = torch.arange(s, device=pos.device)[None, :] <= pos[:, None]
            o_1htc = F.scaled_dot_product_attention(q_1htc, k_1hsc, v_1hsc, attn_mask=mask_ts,
                                                    scale=self.scale)
            out.append(o_1htc[0, :, :, :width].transpose(0, 1))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _naive_kv(self, kv_sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [1, h, s, n + p] and values [1, h, s, n + p] (v, then zeros) from the
        latent rows."""
        s, latent = kv_sc.shape[0], kv_sc[:, : self.r]
        if self.form == "naive":
            kvb = self.kv_b_proj(latent)
        else:  # the dense kv_b the absorbed rows read: one set of weights per model
            kvb = latent @ self.wkv_b(latent.dtype).reshape(-1, self.r).T
        k_nope, v_shv = kvb.view(s, self.h, self.n + self.v).split([self.n, self.v], dim=-1)
        k_rope = kv_sc[:, self.r:].unsqueeze(1).expand(s, self.h, self.p)
        k_shc = torch.cat((k_nope, k_rope), -1)
        v_shc = F.pad(v_shv, (0, k_shc.shape[-1] - self.v))
        return k_shc.transpose(0, 1)[None], v_shc.transpose(0, 1)[None]
