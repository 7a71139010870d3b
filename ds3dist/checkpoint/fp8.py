"""FP8 e4m3 block math: weight (de)quantization, dynamic activation quantization, FP8 linear.

Notation: a weight W [N, K] (out, in) is stored as W_fp8 [N, K] plus scale_inv [ceil(N/128),
ceil(K/128)] (float32); W[r, c] = W_fp8[r, c] * scale_inv[r // 128, c // 128]. Edge blocks
are ragged: nothing is padded in the stored tensor. Activations x [..., K] are quantized per
token per 128 channels: s = max(amax, 1e-4) / 448, x_fp8 = x / s.

`fp8_linear` on CPU emulates the GEMM exactly as the math says (dequantize both operands,
float32 accumulate); on CUDA it runs a real FP8 GEMM with block scales (`torch` scaled_mm
where the installed build supports block scaling, else a Triton kernel), picked once per
process by a self-check against the emulation.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128
ACT_EPS = 1e-4


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[R, C] block scales -> [rows, cols] per element (ragged edges cut off)."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def _check_scale(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    want = (math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1]))
    if w.dim() != 2 or tuple(scale_inv.shape) != want:
        raise ValueError(
            f"FP8 weight {tuple(w.shape)} needs a scale_inv of shape {want} for "
            f"{block[0]}x{block[1]} blocks, got {tuple(scale_inv.shape)}"
        )


def weight_dequant(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (BLOCK, BLOCK),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W = W_fp8 * scale_inv per block, in float32 math, returned as `dtype`."""
    _check_scale(w_fp8, scale_inv, block)
    w = w_fp8.to(torch.float32) * _expand(scale_inv.to(torch.float32), tuple(w_fp8.shape), block)
    return w.to(dtype)


def weight_quant(
    w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale_inv = amax(|block|) / 448, W_fp8 = block / scale_inv."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant takes a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    rb, cb = math.ceil(n / block[0]), math.ceil(k / block[1])
    wf = w.to(torch.float32)
    padded = torch.zeros(rb * block[0], cb * block[1], dtype=torch.float32, device=w.device)
    padded[:n, :k] = wf
    amax = padded.view(rb, block[0], cb, block[1]).abs().amax(dim=(1, 3))
    scale_inv = amax.clamp(min=1e-12) / FP8_MAX
    q = (wf / _expand(scale_inv, (n, k), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def act_quant(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K], s [..., ceil(K/128)] float32); x ~= x_fp8 * s per group."""
    k = x.shape[-1]
    g = math.ceil(k / block)
    xf = x.to(torch.float32)
    if g * block != k:
        xf_pad = torch.nn.functional.pad(xf, (0, g * block - k))
    else:
        xf_pad = xf
    groups = xf_pad.unflatten(-1, (g, block))
    s = groups.abs().amax(dim=-1).clamp(min=ACT_EPS) / FP8_MAX
    q = (groups / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :k], s


def act_dequant(x_fp8: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of act_quant, in float32."""
    k = x_fp8.shape[-1]
    return x_fp8.to(torch.float32) * s.repeat_interleave(block, dim=-1)[..., :k]


def fp8_linear_emulated(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (BLOCK, BLOCK),
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sum over K-blocks of (x_fp8 * s_x) @ (W_fp8 * s_w)^T, float32 accumulate."""
    xq, s = act_quant(x, block[1])
    y = act_dequant(xq, s, block[1]) @ weight_dequant(w_fp8, scale_inv, block).T
    return y.to(out_dtype or x.dtype)


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (BLOCK, BLOCK),
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x @ W^T with W in FP8 blocks and x quantized dynamically. Output: out_dtype or x's."""
    if x.is_cuda and block == (BLOCK, BLOCK):
        return _cuda_fp8_linear(x, w_fp8, scale_inv, out_dtype or x.dtype)
    return fp8_linear_emulated(x, w_fp8, scale_inv, block, out_dtype)


# ---- CUDA ------------------------------------------------------------------------------
_CUDA_IMPL: str | None = None  # "scaled_mm" or "triton", chosen by _select_cuda_impl


def cuda_impl() -> str:
    """Which GPU kernel fp8_linear uses in this process (runs the self-check once)."""
    global _CUDA_IMPL
    if _CUDA_IMPL is None:
        _CUDA_IMPL = _select_cuda_impl()
    return _CUDA_IMPL


def _cuda_fp8_linear(x, w_fp8, scale_inv, out_dtype):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq, s = act_quant(x2)
    if cuda_impl() == "scaled_mm" and _scaled_mm_ok(x2.shape[0], *w_fp8.shape):
        y = _scaled_mm_block(xq, s, w_fp8, scale_inv, out_dtype)
    else:
        y = triton_fp8_gemm(xq, s, w_fp8, scale_inv, out_dtype)
    return y.reshape(*lead, w_fp8.shape[0])


def _scaled_mm_ok(m: int, n: int, k: int) -> bool:
    return k % BLOCK == 0 and n % BLOCK == 0 and m % 4 == 0


def _scaled_mm_block(xq, s, w_fp8, scale_inv, out_dtype):
    """torch's block-scaled FP8 GEMM: 1x128 activation scales, 128x128 weight scales."""
    from torch.nn.functional import ScalingType, scaled_mm

    return scaled_mm(
        xq,
        w_fp8.t(),
        s.t().contiguous().t(),  # outer-dim-major scale layout
        ScalingType.BlockWise1x128,
        scale_inv.t().contiguous().t(),
        ScalingType.BlockWise128x128,
        output_dtype=out_dtype,
    )


def _select_cuda_impl() -> str:
    """Use torch's block-scaled GEMM if this build has it and it matches the emulation."""
    try:
        from torch.nn.functional import ScalingType, scaled_mm  # noqa: F401
    except ImportError:
        return "triton"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(64, 256, generator=g).cuda().to(torch.bfloat16)
        w_q, w_s = weight_quant(torch.randn(256, 256, generator=g).cuda() / 16)
        want = fp8_linear_emulated(x, w_q, w_s, out_dtype=torch.float32)
        xq, s = act_quant(x)
        got = _scaled_mm_block(xq, s, w_q, w_s, torch.float32)
        if torch.allclose(got, want, rtol=2e-2, atol=2e-2):
            return "scaled_mm"
        log.warning("torch scaled_mm block scaling disagrees with the FP8 emulation; using Triton")
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        log.info("torch scaled_mm block scaling unavailable (%s); using Triton", e)
    return "triton"


_TRITON_KERNEL = None


def _triton_kernel():
    global _TRITON_KERNEL
    if _TRITON_KERNEL is not None:
        return _TRITON_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, KB,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # a [M, K] fp8, a_s [M, KB]; b [N, K] fp8, b_s [ceil(N/128), KB]; c [M, N]
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]
        a_s_ptrs = a_s_ptr + offs_m * KB
        b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * KB
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(KB):
            k_ok = offs_k < K - i * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            a_s = tl.load(a_s_ptrs + i, mask=m_ok, other=0.0)
            b_s = tl.load(b_s_ptrs + i, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _TRITON_KERNEL = fp8_gemm_kernel
    return _TRITON_KERNEL


def triton_fp8_gemm(xq, s, w_fp8, scale_inv, out_dtype):
    """[M, K] fp8 x [N, K] fp8 with 1x128 / 128x128 block scales -> [M, N] out_dtype."""
    import triton

    m, k = xq.shape
    n = w_fp8.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    kernel = _triton_kernel()
    block_m = 64 if m > 32 else 16
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 128))
    kernel[grid](xq.contiguous(), w_fp8.contiguous(), out, s.contiguous().float(),
                 scale_inv.contiguous().float(), m, n, k, math.ceil(k / BLOCK),
                 BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=BLOCK)
    return out
