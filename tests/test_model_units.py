"""Unit tests of the model's pieces against hand-computed values and direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ds3dist.checkpoint.fp8 import FP8_DTYPE, weight_quant
from ds3dist.checkpoint.layout import expected_tensors
from ds3dist.config import ModelConfig, preset
from ds3dist.model.dispatch import LocalDispatcher
from ds3dist.model.gate import Gate, route
from ds3dist.model.linear import Linear
from ds3dist.model.options import native_bf16
from ds3dist.model.load import build_model
from ds3dist.model.norm import RMSNorm
from ds3dist.model.options import BuildOptions
from ds3dist.model.rope import Rope, apply_rope, yarn_inv_freq



def random_tensors(cfg: ModelConfig, seed: int = 0, fp8: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict with the checkpoint's names (FP8 + scales when fp8)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in expected_tensors(cfg.replace(quantization_config=None)).items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(s.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(s.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(s.shape, generator=g)
        else:
            t = torch.randn(s.shape, generator=g) / s.shape[-1] ** 0.5
        lin = len(s.shape) == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight",
                                                       "head.weight", "gate.weight", "eh_proj.weight"))
        if fp8 and lin:
            out[name], out[name + "_scale_inv"] = weight_quant(t)
        else:
            out[name] = t
    return out


def tiny_model(form="absorbed", dtype=torch.float32, **kw):
    cfg = preset("tiny")
    return build_model(BuildOptions(cfg, "bf16", dtype, attn_form=form), random_tensors(cfg), **kw)


# ---- gate ---------------------------------------------------------------------------------
# 12 experts in 4 groups of 3, keep 2 groups, top-4, scale 2.5.
S = torch.tensor([[0.9, 0.1, 0.1,   0.55, 0.45, 0.1,   0.6, 0.2, 0.2,   0.3, 0.3, 0.3]])
BIAS = torch.tensor([-0.3, -0.3, -0.3,  0.0, 0.0, 0.0,  0.0, 0.0, 0.0,  0.5, 0.5, 0.5])
# biased top-2 group sums: g0 0.6-0.2=0.4, g1 1.0, g2 0.8, g3 1.6 -> keep g3, g1
# (without the bias g0 = 1.0 and g1 = 1.0 would be kept). Biased candidates: e9-e11 0.8,
# e3 0.55, e4 0.45; e0's biased 0.6 beats e3 but its group is masked.
WANT_IDX = [3, 9, 10, 11]
WANT_W = [0.55 * 2.5 / 1.45, 0.3 * 2.5 / 1.45, 0.3 * 2.5 / 1.45, 0.3 * 2.5 / 1.45]


def _sorted(idx, w):
    order = idx[0].argsort()
    return idx[0][order].tolist(), w[0][order]


def test_gate_bias_changes_kept_groups():
    idx, w = route(S, BIAS, n_group=4, topk_group=2, top_k=4, scaling=2.5)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    got_idx, got_w = _sorted(idx, w)
    assert got_idx == WANT_IDX
    torch.testing.assert_close(got_w, torch.tensor(WANT_W), rtol=1e-6, atol=1e-7)
    # without the bias groups 0 and 1 are kept: experts 0, 3, 4 and one of the 0.1s
    idx0, _ = route(S, torch.zeros(12), n_group=4, topk_group=2, top_k=3, scaling=2.5)
    assert sorted(idx0[0].tolist()) == [0, 3, 4]


def test_masked_groups_never_chosen_when_all_scores_negative():
    # shift every biased score below zero (group order unchanged): a zero-fill mask would
    # let masked experts (score 0) beat the kept ones (all negative).
    idx, w = route(S, BIAS - 2.0, n_group=4, topk_group=2, top_k=4, scaling=2.5)
    got_idx, got_w = _sorted(idx, w)
    assert got_idx == WANT_IDX
    torch.testing.assert_close(got_w, torch.tensor(WANT_W), rtol=1e-6, atol=1e-7)


def test_gate_module_uses_sigmoid_of_float32_logits():
    cfg = preset("tiny").replace(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=4,
                                 hidden_size=4)
    gate = Gate(BuildOptions(cfg, dtype=torch.float32))
    w = torch.zeros(12, 4)
    w[:, 0] = torch.logit(S[0].double()).float()  # x = e_0 gives logits logit(S)
    gate.weight.copy_(w)
    gate.e_score_correction_bias.copy_(BIAS)
    idx, wts = gate(torch.tensor([[1.0, 0, 0, 0]]))
    got_idx, got_w = _sorted(idx, wts)
    assert got_idx == WANT_IDX
    torch.testing.assert_close(got_w, torch.tensor(WANT_W), rtol=1e-5, atol=1e-6)


# ---- rope, norm ----------------------------------------------------------------------------
def test_yarn_release_values():
    cfg = ModelConfig()  # the release
    dim, base = 64, 10000.0
    d = lambda r: dim * math.log(4096 / (r * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = math.floor(d(32)), math.ceil(d(1))
    assert (low, high) == (10, 23)
    inv, scale = yarn_inv_freq(cfg)
    k = torch.arange(32, dtype=torch.float64)
    f = base ** (-2 * k / dim)
    ramp = ((k - low) / (high - low)).clamp(0, 1)
    want = f / 40 * ramp + f * (1 - ramp)
    torch.testing.assert_close(inv.double(), want, rtol=1e-6, atol=0)
    assert scale == 1.0
    assert math.isclose(cfg.softmax_scale(), 192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert abs(cfg.softmax_scale() - 0.1352338) < 1e-7


def test_rope_rotates_interleaved_pairs():
    cfg = preset("tiny")
    rope = Rope(cfg)
    pos = torch.tensor([[0, 3, 17]])
    cos, sin = rope.tables(pos)
    x = torch.randn(1, 3, cfg.qk_rope_head_dim)
    y = apply_rope(x, cos, sin)
    zx = torch.view_as_complex(x.view(1, 3, -1, 2))
    angle = pos[..., None].double() * rope.inv_freq.double()
    zy = zx * torch.polar(torch.ones_like(angle), angle).to(torch.complex64)
    torch.testing.assert_close(y, torch.view_as_real(zy).flatten(-2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(x, *rope.tables(torch.zeros(1, 3, dtype=torch.long))), x)


def test_rmsnorm_float32_math_on_bf16_input():
    norm = RMSNorm(8, 1e-6, torch.bfloat16)
    norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


# ---- FP8 linear ----------------------------------------------------------------------------
def test_fp8_linear_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    n, k = 176, 320  # ragged blocks both ways
    w = torch.randn(n, k, generator=g) / k**0.5
    lin = Linear(k, n, fp8=True)
    lin.weight, lin.weight_scale_inv = weight_quant(w)
    assert lin.weight.dtype == FP8_DTYPE and lin.weight_scale_inv.shape == (2, 3)
    x = torch.randn(5, k, generator=g).to(torch.bfloat16)
    got = lin(x)
    # direct: per token per 128 channels s = max(amax, 1e-4) / 448, x_fp8 = x / s;
    # y = sum over K-blocks (x_fp8 * s_x) @ (W_fp8 * s_w)^T, float32 accumulate
    wq, ws = lin.weight.float(), lin.weight_scale_inv
    y = torch.zeros(5, n)
    for kb in range(3):
        cols = slice(kb * 128, min(k, (kb + 1) * 128))
        xb = x[:, cols].float()
        s = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
        xq = (xb / s).to(FP8_DTYPE).float()
        wb = wq[:, cols] * ws[:, kb].repeat_interleave(128)[:n, None]
        y += (xq * s) @ wb.T
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, y.to(torch.bfloat16), rtol=0, atol=0)


# ---- dispatch and experts -----------------------------------------------------------------
def test_local_dispatcher_groups_by_expert_stably_and_combines_in_k_order():
    x = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 3).contiguous()  # row t = t
    idx = torch.tensor([[2, 0], [0, 3], [3, 2], [1, 0]])
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    disp = LocalDispatcher(range(4), 4)
    d = disp.dispatch(x, idx, w)
    assert d.counts_e == [3, 1, 2, 2]
    # expert 0: tokens 0,1,3; expert 1: 3; expert 2: 0,2; expert 3: 1,2
    assert d.x_sd[:, 0].tolist() == [0, 1, 3, 3, 0, 2, 1, 2]
    assert d.w_s.tolist() == [0.25, 1.0, 6.0, 5.0, 0.5, 4.0, 2.0, 3.0]
    out = disp.combine(d.x_sd * d.w_s[:, None], d)
    torch.testing.assert_close(out, x * w.sum(1, keepdim=True))
    # a subset of experts gives the partial sum (what an all-reduce would add up)
    part = LocalDispatcher([0, 2], 4)
    dp = part.dispatch(x, idx, w)
    assert dp.counts_e == [3, 2]
    keep = (idx == 0) | (idx == 2)
    torch.testing.assert_close(part.combine(dp.x_sd * dp.w_s[:, None], dp),
                               x * (w * keep).sum(1, keepdim=True))


def test_experts_grouped_equals_per_token_loop():
    cfg = preset("tiny")
    model = tiny_model()
    moe = model.layers["1"].mlp
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, cfg.hidden_size, generator=g)
    idx, w = moe.gate(x)
    d = moe.dispatcher.dispatch(x, idx, w)
    y = moe.dispatcher.combine(moe.experts(d.x_sd, d.counts_e, d.w_s), d)
    want = torch.zeros_like(x)
    for t in range(7):
        for k in range(cfg.num_experts_per_tok):
            want[t] += w[t, k] * moe.experts[str(int(idx[t, k]))](x[t:t + 1])[0]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe(x), want + moe.shared_experts(x), rtol=1e-5, atol=1e-6)


def test_partial_experts_sum_to_the_full_moe():
    """Two halves of the experts (LocalDispatcher partial sums) add up to the full layer."""
    cfg = preset("tiny")
    t = random_tensors(cfg)
    full = build_model(BuildOptions(cfg, dtype=torch.float32), t, layers=[1])
    lo = build_model(BuildOptions(cfg, dtype=torch.float32, expert_ids=tuple(range(8))), t, layers=[1])
    hi = build_model(BuildOptions(cfg, dtype=torch.float32, expert_ids=tuple(range(8, 16))), t, layers=[1])
    x = torch.randn(9, cfg.hidden_size)
    m_full, m_lo, m_hi = (m.layers["1"].mlp for m in (full, lo, hi))
    got = m_lo(x) + m_hi(x) - m_full.shared_experts(x)
    torch.testing.assert_close(got, m_full(x), rtol=1e-5, atol=1e-6)


# ---- attention forms, masks, empty batches ------------------------------------------------
def test_absorbed_equals_naive_with_padding():
    a, n = tiny_model("absorbed"), tiny_model("naive")
    toks = torch.randint(0, 1000, (3, 10))
    lens = torch.tensor([10, 4, 7])
    la, ln = a(toks, lens), n(toks, lens)
    for i, L in enumerate(lens.tolist()):
        torch.testing.assert_close(la[i, :L], ln[i, :L], rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_real_positions():
    m = tiny_model()
    toks = torch.randint(0, 1000, (2, 9))
    lens = torch.tensor([9, 5])
    batch = m(toks, lens)
    alone = m(toks[1:, :5])
    torch.testing.assert_close(batch[1, :5], alone[0], rtol=1e-5, atol=1e-5)


class _Spy:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def dispatch(self, x, idx, w):
        self.calls.append(x.shape[0])
        return self.inner.dispatch(x, idx, w)

    def combine(self, y, d):
        return self.inner.combine(y, d)


@pytest.mark.parametrize("lens", [[], [0, 0], [0]])
def test_zero_tokens_still_dispatch(lens):
    m = tiny_model()
    spies = {i: _Spy(moe.dispatcher) for i, moe in m.moe_layers().items()}
    for i, moe in m.moe_layers().items():
        moe.dispatcher = spies[i]
    h = torch.zeros(0, m.cfg.hidden_size)
    out = m.forward_layers(h, m.token_batch([0] * len(lens), lens))
    assert out.shape == (0, m.cfg.hidden_size)
    cache = m.new_cache(2, 4)
    out = m.forward_layers(h, m.token_batch([0] * len(lens), lens, [[0]] * len(lens), 4), cache)
    assert out.shape == (0, m.cfg.hidden_size)
    held = [i for i in m.layer_ids if m.cfg.is_moe_layer(i)]
    assert all(spies[i].calls == [0, 0] for i in held)


def test_causal_mask_from_positions():
    """A query sees keys at its position and before: with equal scores (zero queries) it
    gets the mean of the rows it sees, hand-computed."""
    attn = tiny_model().layers["0"].self_attn
    s, c = 4, attn.r + attn.p
    kv_sc = torch.arange(s, dtype=torch.float32)[:, None].expand(s, c).contiguous()  # row j = j
    q_thc = torch.zeros(2, attn.h, c)
    out = attn._attend(q_thc, kv_sc, torch.tensor([1, 3]), absorbed=True)
    assert out.shape == (2, attn.h, attn.r)
    torch.testing.assert_close(out[0], torch.full((attn.h, attn.r), 0.5))  # keys 0, 1
    torch.testing.assert_close(out[1], torch.full((attn.h, attn.r), 1.5))  # keys 0..3


def test_auto_form_takes_the_form_with_fewer_multiplies():
    """tiny (r 160, n = v = 32): per key absorbed costs n_q * h * 256 more than naive's
    queries, naive h * 160 * 64 to expand the key -> absorbed up to 40 queries. A step with a
    60-token and a 7-token sequence takes both forms and equals each form alone."""
    forms = {f: tiny_model(f) for f in ("auto", "absorbed", "naive")}
    attn = forms["auto"].layers["0"].self_attn
    assert [attn.absorbs(k) for k in (1, 4, 40, 41, 2048)] == [True, True, True, False, False]
    assert forms["naive"].layers["0"].self_attn.absorbs(1) is False
    assert forms["absorbed"].layers["0"].self_attn.absorbs(2048) is True
    toks = torch.randint(0, 1000, (2, 60), generator=torch.Generator().manual_seed(3))
    lens = torch.tensor([60, 7])
    out = {f: m(toks, lens) for f, m in forms.items()}
    for f in ("absorbed", "naive"):
        torch.testing.assert_close(out["auto"][0], out[f][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["auto"][1, :7], out[f][1, :7], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["auto"][1, :7], out["absorbed"][1, :7])  # 7 queries: absorbed


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_attention_in_query_chunks_equals_one_pass(monkeypatch, form):
    import ds3dist.model.mla as mla

    m = tiny_model(form)
    toks = torch.randint(0, 1000, (2, 12))
    lens = torch.tensor([12, 7])
    whole = m(toks, lens)
    monkeypatch.setattr(mla, "MASK_ELEMS", 12 * 5)  # 5 queries
    chunked = m(toks, lens)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_f_linear(dtype):
    lin = Linear(64, 300, dtype=dtype)
    lin.weight.copy_(torch.randn(300, 64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = torch.nn.functional.linear(x.float(), lin.weight.float())
    bf16_native = native_bf16()
    packed = lin.pack()
    assert packed == (torch.backends.mkldnn.is_available()
                      and (dtype == torch.float32 or bf16_native))
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for rows in (1, 8, 20):
        torch.testing.assert_close(lin(x[:rows]).float(), want[:rows], **tol)
    assert lin(x[:8]).dtype == dtype
    if packed:  # a row's result does not depend on the rows beside it
        assert torch.equal(torch.cat([lin(x[i:i + 1]) for i in range(20)]), lin(x))
