"""The grouped routed-experts kernel (ds3dist.kernels.moe) against its torch reference, the
reference against a per-token oracle, and the token alignment by hand. Without CUDA the
kernels run on CPU tensors under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds3dist.checkpoint.fp8 import weight_quant
from ds3dist.kernels.moe import align_tokens, fused_experts, fused_experts_ref

pytest.importorskip("triton")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RELEASE = (256, 256, 8, 4)  # D, I, E, K: the release's layout scaled down
TINY = (192, 160, 16, 4)  # the tiny preset's: ragged 128-blocks in D and I


def _weights(d, i, e, dtype, seed=0):
    """(w1 [E, I, D], w3 [E, I, D], w2 [E, D, I]) in dtype, unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(e, i, d, generator=g) / d**0.5 for _ in range(2))
    w2 = torch.randn(e, d, i, generator=g) / i**0.5
    return tuple(w.to(DEV, dtype) for w in (w1, w3, w2))


def _fp8(w_eab):
    """Per expert weight_quant -> (w_fp8 [E, A, B], scale [E, ceil(A/128), ceil(B/128)])."""
    q, s = zip(*(weight_quant(w) for w in w_eab))
    return torch.stack(q), torch.stack(s)


def _tokens(t, d, e, k, dtype, seed=1):
    """x [T, D], idx [T, K] (K distinct experts per token), w [T, K] float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    idx = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    w = torch.rand(t, k, generator=g)
    return x.to(DEV, dtype), idx.to(DEV), w.to(DEV)


def _oracle(x_td, idx_tk, w_tk, w1, w3, w2):
    """Token by token, copy by copy: F.linear in float32, h rounded to x's dtype."""
    y_td = torch.zeros(x_td.shape, dtype=torch.float32, device=x_td.device)
    for t in range(x_td.shape[0]):
        x = x_td[t].float()
        for k in range(idx_tk.shape[1]):
            e = int(idx_tk[t, k])
            if e < 0:
                continue
            h = (F.silu(F.linear(x, w1[e].float())) * F.linear(x, w3[e].float())).to(x_td.dtype)
            y_td[t] += w_tk[t, k] * F.linear(h.float(), w2[e].float())
    return y_td.to(x_td.dtype)


def _assert_near(got, want, rel, same=0.0):
    """Max error within rel of the result's scale (same shape and dtype), and at least a
    fraction `same` of the elements equal (the same math rounds the same way but for a few
    last bits: a biased rounding of h would move most of them)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"
    equal = got.eq(want).float().mean().item() if got.numel() else 1.0
    assert equal >= same, f"{equal:.1%} of the elements equal, want {same:.0%}"


def _tol(dtype):
    return {"rel": 1e-5} if dtype == torch.float32 else {"rel": 5e-3, "same": 0.95}


def test_align_tokens_by_hand():
    # copies (flattened): 0->e1 1->e0 2->e1 3->dropped 4->e3 5->e1; sentinel 6
    idx_tk = torch.tensor([[1, 0], [1, -1], [3, 1]], device=DEV)
    sorted_ids, expert_b, num_padded = align_tokens(idx_tk, num_experts=4, block_m=4)
    # max_padded: 6 + 4 * 3 = 18 -> 20
    assert sorted_ids.tolist() == [1, 6, 6, 6, 0, 2, 5, 6, 4, 6, 6, 6] + [6] * 8
    assert expert_b.tolist() == [0, 1, 3, -1, -1]
    assert num_padded.tolist() == [12]
    assert sorted_ids.dtype == expert_b.dtype == num_padded.dtype == torch.int32


def test_align_tokens_nothing_held():
    sorted_ids, expert_b, num_padded = align_tokens(torch.full((2, 2), -1, device=DEV), 3, 2)
    assert sorted_ids.tolist() == [4] * 8  # 4 + 3 * 1 = 7 -> 8
    assert expert_b.tolist() == [-1] * 4
    assert num_padded.tolist() == [0]


def test_align_tokens_groups_every_copy_once():
    _, idx_tk, _ = _tokens(29, 8, 16, 4, torch.float32, seed=5)
    idx_tk[::3, 2] = -1
    n, bm = idx_tk.numel(), 16
    sorted_ids, expert_b, num_padded = (v.cpu() for v in align_tokens(idx_tk, 16, bm))
    flat, used = idx_tk.reshape(-1).cpu(), int(num_padded)
    assert used % bm == 0 and sorted_ids[used:].eq(n).all()
    assert expert_b[used // bm:].eq(-1).all()
    want = []
    for e in range(16):  # each expert's copies in flattened order, padded to a block multiple
        ids = (flat == e).nonzero().flatten().tolist()
        want += ids + [n] * (-len(ids) % bm)
    assert sorted_ids[:used].tolist() == want
    block_e = [int(flat[c]) for c in sorted_ids[:used:bm]]  # each block's first copy is real
    assert expert_b[: used // bm].tolist() == block_e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_oracle(dtype):
    d, i, e, k = TINY
    w = _weights(d, i, e, dtype)
    x, idx, wt = _tokens(7, d, e, k, dtype)
    idx[2, 1] = idx[5] = -1  # held elsewhere: one copy, and a whole token
    _assert_near(fused_experts_ref(x, idx, wt, *w), _oracle(x, idx, wt, *w), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t", [1, 3, 37])
@pytest.mark.parametrize("dims", [RELEASE, TINY], ids=["release", "tiny"])
def test_fused_matches_reference(dims, t, dtype):
    d, i, e, k = dims
    w = _weights(d, i, e, dtype)
    x, idx, wt = _tokens(t, d, e, k, dtype)
    _assert_near(fused_experts(x, idx, wt, *w), fused_experts_ref(x, idx, wt, *w), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t", [3, 37])
def test_fused_fp8_matches_reference(t, dtype):
    d, i, e, k = TINY  # ragged edge blocks: D = 128 + 64, I = 128 + 32
    (w1, s1), (w3, s3), (w2, s2) = map(_fp8, _weights(d, i, e, torch.float32))
    x, idx, wt = _tokens(t, d, e, k, dtype)
    idx[0, 0] = -1
    args = (x, idx, wt, w1, w3, w2, s1, s3, s2)
    # a last-bit difference in h may move an element of h to the next FP8 value
    _assert_near(fused_experts(*args), fused_experts_ref(*args),
                 **({"rel": 1e-4} if dtype == torch.float32 else {"rel": 1e-2, "same": 0.95}))


def _one_expert(idx):
    return torch.full_like(idx, 3)


def _few_experts(idx):
    return torch.where(idx % 2 == 0, 0, 5)  # experts other than 0 and 5 get nothing


def _held_elsewhere(idx):
    idx = idx.clone()
    idx[::4, 1:] = -1
    idx[7] = -1
    return idx


@pytest.mark.parametrize("route,block_m", [(_one_expert, None), (_few_experts, None),
                                           (_held_elsewhere, None), (_held_elsewhere, 64)],
                         ids=["one-expert", "empty-experts", "held-elsewhere", "block_m-64"])
def test_fused_routing_edge_cases(route, block_m):
    d, i, e, k = RELEASE
    w = _weights(d, i, e, torch.float32)
    x, idx, wt = _tokens(37, d, e, k, torch.float32)
    idx = route(idx)
    got = fused_experts(x, idx, wt, *w, block_m=block_m)
    _assert_near(got, fused_experts_ref(x, idx, wt, *w), 1e-5)
    if route is _held_elsewhere:
        assert got[7].eq(0).all()


def test_fused_weight_views():
    """Strided weights: gate and up as views into one stacked [E, 2I, D] tensor (the CPU
    path's layout), down as a transposed view."""
    d, i, e, k = TINY
    w1, w3, w2 = _weights(d, i, e, torch.float32)
    w13 = torch.cat((w1, w3), dim=1)
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    x, idx, wt = _tokens(3, d, e, k, torch.float32)
    _assert_near(fused_experts(x, idx, wt, w13[:, :i], w13[:, i:], w2_t),
                 fused_experts_ref(x, idx, wt, w1, w3, w2), 1e-5)


def test_fused_no_tokens():
    d, i, e, k = TINY
    w = _weights(d, i, e, torch.bfloat16)
    x, idx, wt = _tokens(0, d, e, k, torch.bfloat16)
    y = fused_experts(x, idx, wt, *w)
    assert y.shape == (0, d) and y.dtype == torch.bfloat16


def test_shape_errors():
    d, i, e, k = TINY
    w1, w3, w2 = _weights(d, i, e, torch.float32)
    x, idx, wt = _tokens(3, d, e, k, torch.float32)
    with pytest.raises(ValueError, match=r"w1 \(16, 160, 192\), w3 \(16, 128, 192\)"):
        fused_experts(x, idx, wt, w1, w3[:, :128], w2)
    with pytest.raises(ValueError, match=r"w2 \(16, 160, 192\)"):
        fused_experts(x, idx, wt, w1, w3, w2.transpose(1, 2))
    with pytest.raises(ValueError, match=r"x \(3, 192\) and idx \(2, 4\)"):
        fused_experts(x, idx[:2], wt[:2], w1, w3, w2)
    (q1, s1), (q3, s3), (q2, s2) = map(_fp8, (w1, w3, w2))
    with pytest.raises(ValueError, match=r"need scales .* got \(None, None, None\)"):
        fused_experts(x, idx, wt, q1, q3, q2)
    with pytest.raises(ValueError, match=r"need scales s1, s3, s2 of shapes \(\(16, 2, 2\)"):
        fused_experts_ref(x, idx, wt, q1, q3, q2, s1, s3, s2[:, :1])
    with pytest.raises(ValueError, match="power of two"):
        fused_experts(x, idx, wt, w1, w3, w2, block_m=24)
