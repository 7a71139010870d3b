"""Paged absorbed-MLA decode attention: a Triton kernel and a torch reference.

Layout: query rows q_rhc [R, H, C] in the absorbed form, C = r + p (the query projected into
the latent space, then its rotated rope part). One layer's page pool pool_psc [P, page, C]
holds key rows [latent r | k_rope p]; key j of row i's sequence is
pool[page_ids_n[page_start_r[i] + j // page], j % page], and row i attends to keys
0 .. kv_len_r[i] - 1. The result [R, H, r] is softmax(scale * q . key) over those keys times
the keys' latent parts (keys are their own values), in float32 math.

Split-KV, two launches, no host reads (so the call can be captured in a CUDA graph):
- stage 1, grid (R, head blocks, splits): a block of heads of one row walks its split of the
  keys (cdiv(kv_len, splits) keys each, computed in the kernel) in BLOCK_N-key tiles gathered
  through the page table, with an online softmax; it writes the split's normalized partial
  output [R, H, splits, r] and log-sum-exp [R, H, splits] (-inf where the split is empty).
- stage 2, grid (R, head blocks): merges the splits by their log-sum-exps.
"""

from __future__ import annotations

import torch

from ds3dist import kernels

BLOCK_H = 16  # heads per program: tl.dot wants every tile dimension >= 16 (masked past H)
BLOCK_N = 32  # keys per tile
MIN_DOT = 16

tl = None  # triton.language, set by kernels.jit when a kernel is first built


def _stage1_fn(q_ptr, pool_ptr, page_ids_ptr, page_start_ptr, kv_len_ptr, o_ptr, lse_ptr,
               sq_r, sq_h, sq_c, sp_p, sp_s, sp_c, H, R_LAT, P_ROPE, scale,
               PAGE: tl.constexpr, SPLITS: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets into [R, H, splits, r] may pass 2**31
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    h_ok, r_ok, p_ok = offs_h < H, offs_r < R_LAT, offs_p < P_ROPE

    q_base = q_ptr + row * sq_r + offs_h[:, None] * sq_h
    q_lat = tl.load(q_base + offs_r[None, :] * sq_c, mask=h_ok[:, None] & r_ok[None, :],
                    other=0.0)  # [BLOCK_H, BLOCK_R]
    q_rope = tl.load(q_base + (R_LAT + offs_p[None, :]) * sq_c,
                     mask=h_ok[:, None] & p_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_P]
    if UPCAST:
        q_lat, q_rope = q_lat.to(tl.float32), q_rope.to(tl.float32)

    kv_len = tl.load(kv_len_ptr + row).to(tl.int32)
    page_start = tl.load(page_start_ptr + row).to(tl.int64)
    split_len = tl.cdiv(kv_len, SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page = tl.load(page_ids_ptr + page_start + offs_n // PAGE, mask=n_ok, other=0)
        key = pool_ptr + page.to(tl.int64) * sp_p + (offs_n % PAGE) * sp_s  # [BLOCK_N]
        k_lat = tl.load(key[None, :] + offs_r[:, None] * sp_c,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        k_rope = tl.load(key[None, :] + (R_LAT + offs_p[:, None]) * sp_c,
                         mask=p_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_P, BLOCK_N]
        if UPCAST:
            k_lat, k_rope = k_lat.to(tl.float32), k_rope.to(tl.float32)
        s = tl.dot(q_lat, k_lat, input_precision=PREC)
        s += tl.dot(q_rope, k_rope, input_precision=PREC)
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), tl.trans(k_lat),
                                            input_precision=PREC)
        m = m_new

    l_safe = tl.where(l_sum > 0, l_sum, 1.0)  # an empty split: acc 0, lse -inf
    o_base = (row * H + offs_h) * SPLITS + split  # [BLOCK_H]
    tl.store(o_ptr + o_base[:, None] * R_LAT + offs_r[None, :], acc / l_safe[:, None],
             mask=h_ok[:, None] & r_ok[None, :])
    tl.store(lse_ptr + o_base, m + tl.log(l_safe), mask=h_ok)

def _stage2_fn(o_ptr, lse_ptr, out_ptr, so_r, so_h, so_c, H, R_LAT,
               SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    h_ok, r_ok = offs_h < H, offs_r < R_LAT
    hr_ok = h_ok[:, None] & r_ok[None, :]
    base = (row * H + offs_h) * SPLITS  # [BLOCK_H]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for split in tl.static_range(SPLITS):
        lse = tl.load(lse_ptr + base + split, mask=h_ok, other=float("-inf"))
        o = tl.load(o_ptr + (base + split)[:, None] * R_LAT + offs_r[None, :], mask=hr_ok,
                    other=0.0)
        m_new = tl.maximum(m, lse)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # no -inf - -inf
        alpha = tl.exp(m - m_ref)
        w = tl.exp(lse - m_ref)
        w_sum = w_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    w_safe = tl.where(w_sum > 0, w_sum, 1.0)
    out = acc / w_safe[:, None]
    tl.store(out_ptr + row * so_r + offs_h[:, None] * so_h + offs_r[None, :] * so_c,
             out.to(out_ptr.dtype.element_ty), mask=hr_ok)


_stage1 = kernels.jit(_stage1_fn)
_stage2 = kernels.jit(_stage2_fn)


def _check(q_rhc, kv_len_r, page_start_r, page_ids_n, pool_psc, r, out_rhr) -> None:
    if q_rhc.dim() != 3 or pool_psc.dim() != 3:
        raise ValueError(f"mla_decode takes q [R, H, C] and a pool [P, page, C], got q "
                         f"{tuple(q_rhc.shape)} and pool {tuple(pool_psc.shape)}")
    rows, h, c = q_rhc.shape
    if pool_psc.shape[2] != c or pool_psc.dtype != q_rhc.dtype:
        raise ValueError(f"the pool's rows must match the queries' width and dtype: q "
                         f"{tuple(q_rhc.shape)} {q_rhc.dtype}, pool {tuple(pool_psc.shape)} "
                         f"{pool_psc.dtype}")
    if q_rhc.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mla_decode runs float32 or bfloat16, got {q_rhc.dtype}")
    if not 0 < r < c:
        raise ValueError(f"latent width r={r} must be in 1 .. C-1 for rows of width C={c}")
    for name, t in (("kv_len_r", kv_len_r), ("page_start_r", page_start_r)):
        if tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must have shape ({rows},) for q {tuple(q_rhc.shape)}, "
                             f"got {tuple(t.shape)}")
    if page_ids_n.dim() != 1:
        raise ValueError(f"page_ids_n must be 1-D, got shape {tuple(page_ids_n.shape)}")
    for t in (kv_len_r, page_start_r, page_ids_n):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"row and page indices must be int32 or int64, got {t.dtype}")
    if out_rhr is not None and (tuple(out_rhr.shape) != (rows, h, r)
                                or out_rhr.dtype != q_rhc.dtype):
        raise ValueError(f"out_rhr must be {(rows, h, r)} {q_rhc.dtype}, got "
                         f"{tuple(out_rhr.shape)} {out_rhr.dtype}")


def mla_decode(q_rhc: torch.Tensor, kv_len_r: torch.Tensor, page_start_r: torch.Tensor,
               page_ids_n: torch.Tensor, pool_psc: torch.Tensor, r: int, scale: float,
               out_rhr: torch.Tensor | None = None, num_splits: int = 8,
               block_n: int = BLOCK_N) -> torch.Tensor:
    """Attended latents [R, H, r] (q's dtype) of absorbed query rows over their paged keys
    (see the module docstring); written into out_rhr where given. A row with kv_len 0 gets
    zeros. block_n: keys per tile (a power of two >= 16). No host reads."""
    _check(q_rhc, kv_len_r, page_start_r, page_ids_n, pool_psc, r, out_rhr)
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    rows, h, c = q_rhc.shape
    out = out_rhr if out_rhr is not None else q_rhc.new_empty(rows, h, r)
    if rows == 0 or h == 0:
        return out
    block_r = max(MIN_DOT, kernels.next_pow2(r))
    block_p = max(MIN_DOT, kernels.next_pow2(c - r))
    heads = -(-h // BLOCK_H)
    o_rhsr = torch.empty(rows, h, num_splits, r, dtype=torch.float32, device=q_rhc.device)
    lse_rhs = torch.empty(rows, h, num_splits, dtype=torch.float32, device=q_rhc.device)
    prec = "ieee" if q_rhc.dtype == torch.float32 else "tf32"
    _stage1()[(rows, heads, num_splits)](
        q_rhc, pool_psc, page_ids_n, page_start_r, kv_len_r, o_rhsr, lse_rhs,
        *q_rhc.stride(), *pool_psc.stride(), h, r, c - r, scale,
        PAGE=pool_psc.shape[1], SPLITS=num_splits, BLOCK_H=BLOCK_H, BLOCK_N=block_n,
        BLOCK_R=block_r, BLOCK_P=block_p, PREC=prec, UPCAST=kernels.dot_upcast(),
        num_warps=4, num_stages=2)
    _stage2()[(rows, heads)](
        o_rhsr, lse_rhs, out, *out.stride(), h, r,
        SPLITS=num_splits, BLOCK_H=BLOCK_H, BLOCK_R=block_r)
    return out


def mla_decode_ref(q_rhc, kv_len_r, page_start_r, page_ids_n, pool_psc, r, scale) -> torch.Tensor:
    """The same attention in plain torch, row by row: gather the row's keys through the page
    table, float32 softmax, matmul. Returned in q's dtype."""
    page = pool_psc.shape[1]
    out = []
    for i in range(q_rhc.shape[0]):
        j = torch.arange(int(kv_len_r[i]), device=pool_psc.device)
        pages = page_ids_n[int(page_start_r[i]) + j // page]
        k_sc = pool_psc[pages, j % page].float()
        w_hs = torch.softmax(scale * (q_rhc[i].float() @ k_sc.T), dim=-1)
        out.append(w_hs @ k_sc[:, :r])
    return torch.stack(out).to(q_rhc.dtype) if out else q_rhc.new_empty(0, q_rhc.shape[1], r)
