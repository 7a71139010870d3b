"""Grouped routed experts (the fused_moe scheme): every local expert of a layer in two launches.

1. `align_tokens` sorts the T*K token copies by expert (stable) and pads each expert's group
   to a multiple of block_m with a sentinel, so every block of block_m sorted copies belongs
   to one expert; all on the device with static shapes (no host read: CUDA-graph safe).
2. Kernel 1, per (block, column tile of I): gathers the block's token rows of x, computes the
   gate and up tiles of the block's expert, stores h = silu(gate) * up in x's dtype.
3. Kernel 2, per (block, column tile of D): h @ down^T of the block's expert, times the copy's
   routing weight, stored in float32 at the copy's row of y_nd [T*K, D]; torch sums each
   token's K rows (in float32, as the CPU path's combine) and rounds once to x's dtype.

h is kept in x's dtype: the down GEMM then reads half the bytes and feeds bf16 tiles straight
to the tensor cores, and it is the rounding the CPU path applies to h (the reference does too).
FP8 block-scaled weights: x and h are quantized per token per 128 channels (act_quant) in
torch, and the kernels accumulate 128-wide K blocks in float32 with both scales applied.
"""

from __future__ import annotations

import math

import torch

from ds3dist import kernels
from ds3dist.checkpoint.fp8 import BLOCK, FP8_DTYPE, act_quant, fp8_linear_emulated

tl = None  # triton.language, set by kernels.jit when a kernel is first built

BLOCK_N = 64  # output columns per program
BLOCK_K = 64  # reduction step of the plain GEMMs (FP8: one scale block, BLOCK)


def _gate_up_fn(x_ptr, xs_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, ids_ptr, expert_ptr,
                npad_ptr, top_k, num_copies, D, I, stride_xt,
                stride_w1e, stride_w1n, stride_w1k, stride_w3e, stride_w3n, stride_w3k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                FP8: tl.constexpr, UPCAST: tl.constexpr):
    # x [T, D] (FP8: xs [T, KB_D]); w1, w3 [E, I, D] (FP8: s1, s3 [E, NB_I, KB_D]); h [P, I]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy_m = tl.load(ids_ptr + offs_m)
    valid_m = copy_m < num_copies
    token_m = (copy_m // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token_m[:, None] * stride_xt + offs_k[None, :]
    w1_ptrs = (w1_ptr + expert * stride_w1e + offs_n[None, :] * stride_w1n
              + offs_k[:, None] * stride_w1k)
    w3_ptrs = (w3_ptr + expert * stride_w3e + offs_n[None, :] * stride_w3n
              + offs_k[:, None] * stride_w3k)
    kb_d = tl.cdiv(D, BLOCK_K)
    s_off_n = expert * tl.cdiv(I, BLOCK_K) * kb_d + (offs_n // BLOCK_K) * kb_d
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(x_ptrs, mask=valid_m[:, None] & k_ok[None, :], other=0.0)
        b1 = tl.load(w1_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        b3 = tl.load(w3_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            kb = k0 // BLOCK_K
            a_s = tl.load(xs_ptr + token_m * kb_d + kb, mask=valid_m, other=0.0)[:, None]
            s1 = tl.load(s1_ptr + s_off_n + kb, mask=n_ok, other=0.0)[None, :]
            s3 = tl.load(s3_ptr + s_off_n + kb, mask=n_ok, other=0.0)[None, :]
            gate += tl.dot(a, b1) * (a_s * s1)
            up += tl.dot(a, b3) * (a_s * s3)
        else:
            if UPCAST:
                a = a.to(tl.float32)
                b1 = b1.to(tl.float32)
                b3 = b3.to(tl.float32)
            gate += tl.dot(a, b1, input_precision="ieee")
            up += tl.dot(a, b3, input_precision="ieee")
        x_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K * stride_w1k
        w3_ptrs += BLOCK_K * stride_w3k
    h = gate * tl.sigmoid(gate) * up
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])


def _down_fn(h_ptr, hs_ptr, w2_ptr, s2_ptr, wt_ptr, y_ptr, ids_ptr, expert_ptr, npad_ptr,
             num_copies, D, I, stride_hp, stride_w2e, stride_w2n, stride_w2k,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             FP8: tl.constexpr, UPCAST: tl.constexpr):
    # h [P, I] rows stride_hp apart (FP8: hs [P, KB_I]); w2 [E, D, I] (FP8: s2 [E, NB_D, KB_I]);
    # wt [T*K]; y [T*K, D]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy_m = tl.load(ids_ptr + offs_m)
    valid_m = copy_m < num_copies
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    row_m = offs_m.to(tl.int64)
    h_ptrs = h_ptr + row_m[:, None] * stride_hp + offs_k[None, :]
    w2_ptrs = (w2_ptr + expert * stride_w2e + offs_n[None, :] * stride_w2n
               + offs_k[:, None] * stride_w2k)
    kb_i = tl.cdiv(I, BLOCK_K)
    s_off_n = expert * tl.cdiv(D, BLOCK_K) * kb_i + (offs_n // BLOCK_K) * kb_i
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k < I - k0
        a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            kb = k0 // BLOCK_K
            a_s = tl.load(hs_ptr + row_m * kb_i + kb)[:, None]
            s2 = tl.load(s2_ptr + s_off_n + kb, mask=n_ok, other=0.0)[None, :]
            acc += tl.dot(a, b) * (a_s * s2)
        else:
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")
        h_ptrs += BLOCK_K
        w2_ptrs += BLOCK_K * stride_w2k
    wt_m = tl.load(wt_ptr + copy_m, mask=valid_m, other=0.0)
    y_ptrs = y_ptr + copy_m.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(y_ptrs, acc * wt_m[:, None], mask=valid_m[:, None] & n_ok[None, :])


_gate_up = kernels.jit(_gate_up_fn)
_down = kernels.jit(_down_fn)


def default_block_m(num_copies: int, num_experts: int) -> int:
    """Rows per block: 16 while experts get few copies each (decode), else 64 (prefill)."""
    return 16 if num_copies < 32 * num_experts else 64


def max_padded(num_copies: int, num_experts: int, block_m: int) -> int:
    """Static bound on the sorted, padded length: every expert wastes at most block_m - 1."""
    return math.ceil((num_copies + num_experts * (block_m - 1)) / block_m) * block_m


def align_tokens(idx_tk: torch.Tensor, num_experts: int,
                 block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx_tk [T, K] local expert per copy (-1: dropped) -> (sorted_ids [P] int32: flattened
    copy ids grouped by expert, each group stable and padded to a multiple of block_m with the
    sentinel T*K; expert_of_block [P // block_m] int32, -1 past the used blocks; num_padded
    [1] int32, the used length). P = max_padded(T*K, E, block_m). Device ops only."""
    n, e, dev = idx_tk.numel(), num_experts, idx_tk.device
    p = max_padded(n, e, block_m)
    flat_n = idx_tk.reshape(-1).to(torch.int64)
    key_n = torch.where((flat_n >= 0) & (flat_n < e), flat_n, e)  # e: dropped
    counts_e = torch.zeros(e + 1, dtype=torch.int64, device=dev)
    counts_e.scatter_add_(0, key_n, torch.ones_like(key_n))
    padded_e = (counts_e[:e] + block_m - 1) // block_m * block_m
    pad_end_e = padded_e.cumsum(0)
    pad_start_e = torch.cat((pad_end_e - padded_e, pad_end_e.new_full((1,), p)))
    first_e = counts_e.cumsum(0) - counts_e  # each key's first position in sorted order
    key_s, copy_s = torch.sort(key_n, stable=True)
    pos_s = torch.arange(n, device=dev) - first_e[key_s] + pad_start_e[key_s]
    pos_s = torch.where(key_s < e, pos_s, p)  # dropped copies land in a discarded slot
    sorted_ids = torch.full((p + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pos_s, copy_s.to(torch.int32))
    start_b = torch.arange(0, p, block_m, dtype=torch.int64, device=dev)
    expert_b = torch.searchsorted(pad_end_e, start_b, right=True)
    expert_b = torch.where(expert_b < e, expert_b, -1).to(torch.int32)
    return sorted_ids[:p], expert_b, pad_end_e[-1:].to(torch.int32)


def _check(x_td, idx_tk, w_tk, w1_eid, w3_eid, w2_edi, s1, s3, s2) -> bool:
    """Validate shapes and dtypes; whether the weights are FP8."""
    if x_td.dim() != 2 or idx_tk.dim() != 2 or idx_tk.shape[0] != x_td.shape[0]:
        raise ValueError(f"x {tuple(x_td.shape)} and idx {tuple(idx_tk.shape)}: need [T, D] "
                         "and [T, K]")
    if tuple(w_tk.shape) != tuple(idx_tk.shape):
        raise ValueError(f"routing weights {tuple(w_tk.shape)} differ from idx "
                         f"{tuple(idx_tk.shape)}")
    if x_td.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x_td.dtype}")
    d = x_td.shape[1]
    e, i = w1_eid.shape[:2] if w1_eid.dim() == 3 else (-1, -1)
    shapes = (tuple(w1_eid.shape), tuple(w3_eid.shape), tuple(w2_edi.shape))
    if shapes != ((e, i, d), (e, i, d), (e, d, i)):
        raise ValueError(f"expert weights w1 {shapes[0]}, w3 {shapes[1]}, w2 {shapes[2]} do not "
                         f"fit x {tuple(x_td.shape)}: need [E, I, {d}], [E, I, {d}], [E, {d}, I]")
    dtypes = {w1_eid.dtype, w3_eid.dtype, w2_edi.dtype}
    fp8 = dtypes == {FP8_DTYPE}
    if not fp8 and dtypes != {x_td.dtype}:
        raise ValueError(f"expert weights must all be {x_td.dtype} (x's dtype) or "
                         f"{FP8_DTYPE}, got {sorted(map(str, dtypes))}")
    scales = (s1, s3, s2)
    if not fp8:
        if any(s is not None for s in scales):
            raise ValueError(f"scales given with {x_td.dtype} (not FP8) expert weights")
        return False
    kb_d, kb_i = math.ceil(d / BLOCK), math.ceil(i / BLOCK)
    want = ((e, kb_i, kb_d), (e, kb_i, kb_d), (e, kb_d, kb_i))
    got = tuple(None if s is None else tuple(s.shape) for s in scales)
    if got != want:
        raise ValueError(f"FP8 expert weights w1 {shapes[0]}, w3 {shapes[1]}, w2 {shapes[2]} "
                         f"need scales s1, s3, s2 of shapes {want}, got {got}")
    return True


def fused_experts(x_td, idx_tk, w_tk, w1_eid, w3_eid, w2_edi, s1=None, s3=None, s2=None,
                  block_m: int | None = None) -> torch.Tensor:
    """y[t] = sum over k (float32) of w_tk[t, k] * down(silu(gate x_t) * up x_t) of expert
    idx_tk[t, k] (-1: none), in x's dtype. Weights in x's dtype, or FP8 with block scales."""
    fp8 = _check(x_td, idx_tk, w_tk, w1_eid, w3_eid, w2_edi, s1, s3, s2)
    t, d = x_td.shape
    k = idx_tk.shape[1]
    e, i = w1_eid.shape[:2]
    if t == 0:
        return x_td.new_empty(0, d)
    n = t * k
    block_m = block_m or default_block_m(n, e)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    sorted_ids, expert_b, num_padded = align_tokens(idx_tk, e, block_m)
    p = sorted_ids.numel()
    block_n, block_k = BLOCK_N, BLOCK if fp8 else BLOCK_K
    if kernels.interpreting():  # numpy per program: fewer, wider programs run much faster
        block_n = min(512, kernels.next_pow2(max(i, d)))
        block_k = BLOCK if fp8 else min(256, kernels.next_pow2(d))
    upcast = kernels.dot_upcast()
    x_td = x_td.contiguous()
    # the interpreter's float32 -> bf16 cast truncates: there torch rounds h instead
    h_pi = x_td.new_empty(p, i, dtype=torch.float32 if kernels.interpreting() else None)
    if fp8:
        x_in, xs = act_quant(x_td)
        s1, s3, s2 = (s.contiguous().float() for s in (s1, s3, s2))
    else:  # unused stand-ins for the scale pointers
        x_in, xs, s1, s3, s2 = x_td, x_td, w1_eid, w3_eid, w2_edi
    _gate_up()[(p // block_m, math.ceil(i / block_n))](
        x_in, xs, w1_eid, w3_eid, s1, s3, h_pi, sorted_ids, expert_b, num_padded, k, n, d, i,
        x_in.stride(0), *w1_eid.stride(), *w3_eid.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP8=fp8, UPCAST=upcast)
    h_pi = h_pi.to(x_td.dtype)
    h_in, hs = act_quant(h_pi) if fp8 else (h_pi, h_pi)
    y_nd = torch.zeros(n, d, dtype=torch.float32, device=x_td.device)
    wt_n = w_tk.reshape(-1).to(torch.float32).contiguous()
    _down()[(p // block_m, math.ceil(d / block_n))](
        h_in, hs, w2_edi, s2, wt_n, y_nd, sorted_ids, expert_b, num_padded, n, d, i,
        h_in.stride(0), *w2_edi.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP8=fp8, UPCAST=upcast)
    return y_nd.view(t, k, d).sum(1).to(x_td.dtype)


def _linear_f32(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if s is None:
        return x.float() @ w.float().T
    return fp8_linear_emulated(x, w, s, out_dtype=torch.float32)


def fused_experts_ref(x_td, idx_tk, w_tk, w1_eid, w3_eid, w2_edi, s1=None, s3=None,
                      s2=None) -> torch.Tensor:
    """The same math in plain torch, expert by expert (float32 GEMMs of the dequantized
    weights; FP8 activations quantized as fp8_linear_emulated does)."""
    fp8 = _check(x_td, idx_tk, w_tk, w1_eid, w3_eid, w2_edi, s1, s3, s2)
    t, k = idx_tk.shape
    d = x_td.shape[1]
    y_tkd = torch.zeros(t, k, d, dtype=torch.float32, device=x_td.device)
    for e in range(w1_eid.shape[0]):
        tok_s, k_s = (idx_tk == e).nonzero(as_tuple=True)
        if tok_s.numel() == 0:
            continue
        x_sd = x_td[tok_s]
        gate = _linear_f32(x_sd, w1_eid[e], s1[e] if fp8 else None)
        up = _linear_f32(x_sd, w3_eid[e], s3[e] if fp8 else None)
        h = (torch.nn.functional.silu(gate) * up).to(x_td.dtype)
        y_sd = _linear_f32(h, w2_edi[e], s2[e] if fp8 else None)
        y_tkd[tok_s, k_s] = y_sd * w_tk[tok_s, k_s].float()[:, None]
    y_td = torch.zeros(t, d, dtype=torch.float32, device=x_td.device)
    for j in range(k):
        y_td += y_tkd[:, j]
    return y_td.to(x_td.dtype)
