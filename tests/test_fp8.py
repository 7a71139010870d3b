"""FP8 e4m3 block math against hand-computed values and direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds3dist.checkpoint import fp8
from ds3dist.checkpoint.fp8 import (
    FP8_DTYPE,
    act_dequant,
    act_quant,
    fp8_linear,
    fp8_linear_emulated,
    weight_dequant,
    weight_quant,
)

# e4m3fn: 3 mantissa bits -> round-to-nearest relative error <= 2^-4 for normal values;
# below the smallest normal (2^-6) the grid step is the smallest subnormal 2^-9, so the
# absolute error there is <= 2^-10. In weight units (times the block scale):
#   |w - dequant(quant(w))| <= 2^-4 |w| + 2^-10 * scale  (+ float32 rounding of w / scale).
REL = 2.0**-4
SUBNORMAL = 2.0**-9


def _bound(w: torch.Tensor, scale_per_elem: torch.Tensor) -> torch.Tensor:
    return (REL * w.abs() + SUBNORMAL / 2 * scale_per_elem) * (1 + 1e-6) + 1e-30


def _per_elem(scale: torch.Tensor, shape, block=(128, 128)) -> torch.Tensor:
    """Block scale -> per element, by explicit index arithmetic (not fp8._expand)."""
    r = torch.arange(shape[0]) // block[0]
    c = torch.arange(shape[1]) // block[1]
    return scale[r[:, None], c[None, :]]


def _pattern(r: int, c: int) -> float:
    # values 0, 0.5, ..., 3.5 are exact in e4m3
    return ((r + c) % 8) * 0.5


def test_dequant_ragged_by_hand():
    n, k = 130, 129  # blocks: rows 0..127 | 128..129, cols 0..127 | 128
    w = torch.tensor([[_pattern(r, c) for c in range(k)] for r in range(n)]).to(FP8_DTYPE)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = weight_dequant(w, scale)
    assert got.dtype == torch.float32 and got.shape == (130, 129)
    # a few elements computed by hand: value(r, c) * scale[r // 128, c // 128]
    assert got[0, 0] == 0.0
    assert got[1, 2] == 1.5  # (3 % 8) * 0.5 * 1
    assert got[127, 127] == 3.0  # (254 % 8 = 6) * 0.5 * 1
    assert got[127, 128] == 7.0  # (255 % 8 = 7) * 0.5 * 2
    assert got[128, 127] == 10.5  # (255 % 8 = 7) * 0.5 * 3
    assert got[129, 128] == 2.0  # (257 % 8 = 1) * 0.5 * 4
    assert got[128, 0] == 0.0  # (128 % 8 = 0)
    assert got[129, 0] == 1.5  # (129 % 8 = 1) * 0.5 * 3
    # and every element by the formula
    s = [[1.0, 2.0], [3.0, 4.0]]
    want = torch.tensor([[_pattern(r, c) * s[r // 128][c // 128] for c in range(k)]
                         for r in range(n)])
    assert torch.equal(got, want)
    assert torch.equal(weight_dequant(w, scale, dtype=torch.bfloat16), want.to(torch.bfloat16))


def test_dequant_rejects_wrong_scale_shape():
    w = torch.zeros(130, 129).to(FP8_DTYPE)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        weight_dequant(w, torch.ones(1, 1))


def test_quant_ragged_scales_by_hand():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(130, 129, generator=g)
    w[5, 7] = 10.0  # block (0, 0) amax
    w[129, 128] = -3.0  # the 1x1 corner block (rows 128..129, col 128): amax from 2 values
    w[128, 128] = 0.5
    q, scale = weight_quant(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 2)
    assert scale[0, 0] == pytest.approx(10.0 / 448)
    assert scale[1, 1] == pytest.approx(3.0 / 448)
    assert scale[0, 1] == pytest.approx(w[:128, 128:].abs().max().item() / 448)
    assert scale[1, 0] == pytest.approx(w[128:, :128].abs().max().item() / 448)
    # the block maximum lands on +-448 exactly and comes back exactly (up to float32 rounding)
    assert q[5, 7].float() == 448.0 and q[129, 128].float() == -448.0
    deq = weight_dequant(q, scale)
    assert deq[5, 7] == pytest.approx(10.0, rel=1e-6)
    assert deq[129, 128] == pytest.approx(-3.0, rel=1e-6)


def test_quant_dequant_error_bound_is_tight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-4, 1, 200)  # spans subnormals
    q, scale = weight_quant(w)
    err = (weight_dequant(q, scale) - w).abs()
    se = _per_elem(scale, w.shape)
    assert (err <= _bound(w, se)).all()
    # the bound is nearly reached (the test would catch a coarser format or a wrong scale)
    normal = (w.abs() / se) >= 2.0**-6
    assert (err[normal] / w.abs()[normal]).max() > 0.9 * REL
    # a 10% larger scale (wrong amax) breaks the exactness of block maxima
    assert not torch.equal(weight_dequant(q, scale * 1.1), weight_dequant(q, scale))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 300),
    log_mag=st.floats(-12, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_quant_dequant_property(n, k, log_mag, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 10.0**log_mag
    q, scale = weight_quant(w)
    assert scale.shape == (math.ceil(n / 128), math.ceil(k / 128))
    deq = weight_dequant(q, scale)
    se = _per_elem(scale, w.shape)
    assert ((deq - w).abs() <= _bound(w, se)).all()
    # each block's largest |q| is exactly 448 (the block amax maps to the top of the range)
    qa = q.float().abs()
    for rb in range(scale.shape[0]):
        for cb in range(scale.shape[1]):
            rows, cols = slice(rb * 128, (rb + 1) * 128), slice(cb * 128, (cb + 1) * 128)
            if w[rows, cols].abs().max() > 1e-12:  # weight_quant floors amax at 1e-12
                assert qa[rows, cols].max() == 448.0


def test_act_quant_per_128_groups():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 300, generator=g)
    x[0, 0, 128:256] = 0.0  # an all-zero group: scale floors at 1e-4 / 448
    x[1, 2, 256:] *= 1000.0  # a loud ragged last group (44 channels)
    q, s = act_quant(x)
    assert q.shape == x.shape and q.dtype == FP8_DTYPE
    assert s.shape == (3, 5, 3) and s.dtype == torch.float32
    for gi, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
        amax = x[..., a:b].abs().amax(-1)
        assert torch.allclose(s[..., gi], amax.clamp(min=1e-4) / 448, rtol=1e-6, atol=0)
    assert s[0, 0, 1] == pytest.approx(1e-4 / 448)
    deq = act_dequant(q, s)
    se = s.repeat_interleave(128, -1)[..., :300]
    assert ((deq - x).abs() <= _bound(x, se)).all()
    # groups are independent: changing one group's values moves only that group's scale
    x2 = x.clone()
    x2[2, 1, 130] = 50.0
    _, s2 = act_quant(x2)
    changed = (s2 != s).nonzero().tolist()
    assert changed == [[2, 1, 1]]


def _direct_fp8_linear(x, w_q, w_s):
    """sum over K blocks of (x_fp8 * s_x) @ (W_fp8 * s_w)^T, one block at a time, float64."""
    xq, sx = act_quant(x)
    n, k = w_q.shape
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for kb in range(math.ceil(k / 128)):
        cols = slice(kb * 128, min(k, (kb + 1) * 128))
        xa = xq[:, cols].double() * sx[:, kb : kb + 1].double()
        wrows = w_s[torch.arange(n) // 128, kb].double()[:, None]
        wa = w_q[:, cols].double() * wrows
        y += xa @ wa.T
    return y


@pytest.mark.parametrize("m,n,k", [(7, 130, 300), (4, 256, 256), (1, 176, 192)])
def test_emulated_linear_equals_direct_formula(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w_q, w_s = weight_quant(torch.randn(n, k, generator=g) / math.sqrt(k))
    want = _direct_fp8_linear(x, w_q, w_s)
    got = fp8_linear_emulated(x, w_q, w_s, out_dtype=torch.float32)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    # default output dtype is x's; fp8_linear on CPU is the emulation
    assert fp8_linear_emulated(x, w_q, w_s).dtype == torch.bfloat16
    assert torch.equal(fp8_linear(x, w_q, w_s), fp8_linear_emulated(x, w_q, w_s))
    # and close to the unquantized product (sanity: quantization error only)
    ref = x.float() @ weight_dequant(w_q, w_s).T
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_emulated_linear_batched_leading_dims():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 192, generator=g)
    w_q, w_s = weight_quant(torch.randn(64, 192, generator=g))
    y = fp8_linear_emulated(x, w_q, w_s)
    assert y.shape == (2, 3, 64)
    # same math per token; only the float32 summation order of the GEMM may differ
    torch.testing.assert_close(y[1, 2], fp8_linear_emulated(x[1, 2:3], w_q, w_s)[0],
                               rtol=1e-5, atol=1e-4)


# ---- GPU ------------------------------------------------------------------------------------
def _impls():
    out = []
    try:
        import triton  # noqa: F401

        out.append("triton")
    except ImportError:
        pass
    try:
        from torch.nn.functional import ScalingType, scaled_mm  # noqa: F401

        out.append("scaled_mm")
    except ImportError:
        pass
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["triton", "scaled_mm"])
# (64, 256, 512) suits scaled_mm's block layout; the ragged / m % 4 != 0 shapes take the Triton
# kernel even when scaled_mm is selected (fp8._scaled_mm_ok), as in production.
@pytest.mark.parametrize("m,n,k", [(64, 256, 512), (16, 176, 192), (5, 384, 512)])
def test_cuda_fp8_linear_matches_emulation(monkeypatch, impl, m, n, k):
    if impl not in _impls():
        pytest.skip(f"{impl} not available in this build")
    monkeypatch.setattr(fp8, "_CUDA_IMPL", impl)
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w_q, w_s = weight_quant(torch.randn(n, k, generator=g) / math.sqrt(k))
    want = fp8_linear_emulated(x, w_q, w_s, out_dtype=torch.float32)
    got = fp8_linear(x.cuda(), w_q.cuda(), w_s.cuda(), out_dtype=torch.float32).cpu()
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (got - want).abs().max()
    got_bf16 = fp8_linear(x.cuda(), w_q.cuda(), w_s.cuda()).cpu()
    assert got_bf16.dtype == torch.bfloat16
    assert torch.allclose(got_bf16.float(), want, rtol=1e-2, atol=1e-2)
