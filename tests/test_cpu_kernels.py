"""The CPU decode kernels (ds3dist.model.cpu_kernel) against the torch ops they replace: the
per-expert GEMM pairs, the per-sequence attention of the absorbed form and torch's linear, on
each instruction set's build this CPU runs (AVX-512 and AVX2 on an AVX-512 machine)."""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from ds3dist.config import preset
from ds3dist.model import cpu_kernel
from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.rope import Rope
from test_model_units import tiny_model

needs_kernels = pytest.mark.ops("cpu_kernels")  # skips saying why they are not built here
ISAS = cpu_kernel.variants()
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
TINY_ROPE = Rope(preset("tiny"))


@pytest.fixture(autouse=True, params=ISAS)
def isa(request):
    """Each test on each build this CPU runs."""
    with cpu_kernel.use_isa(request.param):
        assert cpu_kernel.kernel() is None or cpu_kernel.kernel().isa() == request.param
        yield request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@needs_kernels
def test_grouped_experts_match_per_expert_gemms(monkeypatch):
    experts = tiny_model(dtype=torch.bfloat16).layers["1"].mlp.experts
    assert experts.stacked is not None  # bf16 CPU weights are stacked for the kernel
    counts = [1, 0, 2, 3, 4, 5, 1, 0, 7, 1, 2, 0, 4, 1, 1, 6]  # 16 local experts; > 4: GEMMs
    x = torch.randn(sum(counts), 192, generator=_gen(0)).bfloat16()
    w = torch.rand(sum(counts), generator=_gen(1))
    got = experts(x, counts, w)
    monkeypatch.setattr(experts, "stacked", None)  # every expert through its GEMM pair
    want = experts(x, counts, w)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.float(), want.float(), **BF16_TOL)
    ends = torch.tensor(counts).cumsum(0).tolist()
    for e, c in enumerate(counts):
        if c > cpu_kernel.MAX_ROWS:  # those rows took the same path both times
            assert torch.equal(got[ends[e] - c:ends[e]], want[ends[e] - c:ends[e]])


@needs_kernels
def test_grouped_experts_rows_do_not_depend_on_their_neighbours():
    experts = tiny_model(dtype=torch.bfloat16).layers["1"].mlp.experts
    counts = [2, 1, 0, 3] + [1] * 12
    x = torch.randn(sum(counts), 192, generator=_gen(2)).bfloat16()
    w = torch.ones(sum(counts))
    together = experts(x, counts, w)
    alone = experts(x[:2], [2] + [0] * 15, w[:2])  # expert 0's rows without the others
    assert torch.equal(together[:2], alone)


def _decode_batch(mla, kv_lens, lens, page_size=4, num_pages=40, seed=3):
    """A cache of random rows and a step whose sequence i feeds lens[i] tokens ending at
    kv_lens[i], its pages scattered over the pool."""
    dtype = mla.o_proj.weight.dtype
    cache = PagedCache([mla.layer_id], num_pages, page_size, mla.r + mla.p, dtype)
    cache.pools[mla.layer_id].copy_(torch.randn(cache.pools[mla.layer_id].shape,
                                                generator=_gen(seed)).to(dtype))
    perm = torch.randperm(num_pages, generator=_gen(seed + 1)).tolist()
    tables, used = [], 0
    for kv in kv_lens:
        need = -(-kv // page_size)
        tables.append(perm[used:used + need])
        used += need
    tb = TokenBatch.build([kv - n for kv, n in zip(kv_lens, lens)], lens, TINY_ROPE,
                          page_tables=tables, page_size=page_size)
    q = torch.randn(sum(lens), mla.h, mla.r + mla.p, generator=_gen(seed + 2)).to(dtype)
    return q, tb, cache


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_matches_per_sequence_attention(monkeypatch, dtype):
    mla = tiny_model(dtype=dtype).layers["0"].self_attn
    # four decode rows, a 3-token step (a speculative verify) and a 6-token prefill chunk
    kv_lens, lens = [1, 5, 8, 13, 9, 14], [1, 1, 1, 1, 3, 6]
    q, tb, cache = _decode_batch(mla, kv_lens, lens)
    calls = []
    real = cpu_kernel.mla_decode
    monkeypatch.setattr(cpu_kernel, "mla_decode", lambda *a: calls.append(a[1:3]) or real(*a))
    got = mla.attend_latents(q, None, tb, cache)
    # rows of sequences of up to KERNEL_MAX_LEN tokens in one call, each with its own keys
    assert calls == [([0, 1, 2, 3, 4, 5, 6], [1, 5, 8, 13, 7, 8, 9])]
    monkeypatch.setattr(cpu_kernel, "kernel", lambda: None)  # sequence by sequence
    want = mla.attend_latents(q, None, tb, cache)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert torch.equal(got[7:], want[7:])  # the chunk took the same path both times


@needs_kernels
def test_mla_decode_rows_do_not_depend_on_their_neighbours():
    mla = tiny_model().layers["0"].self_attn
    q, tb, cache = _decode_batch(mla, [3, 17, 6], [1, 1, 1])
    together = mla.attend_latents(q, None, tb, cache)
    alone = TokenBatch.build([16], [1], TINY_ROPE, page_tables=[tb.pages[1].tolist()],
                             page_size=4)
    assert torch.equal(together[1:2], mla.attend_latents(q[1:2], None, alone, cache))


@needs_kernels
def test_kernels_reject_out_of_range_arguments():
    mla = tiny_model().layers["0"].self_attn
    q, tb, cache = _decode_batch(mla, [5], [1])
    out = torch.empty(1, mla.h, mla.r)
    pool = cache.pools[0]
    with pytest.raises(RuntimeError, match="page id out of range"):
        cpu_kernel.mla_decode(q, [0], [5], [0], torch.tensor([0, 99]), pool, mla.r, 1.0, out)
    with pytest.raises(RuntimeError, match="group 0 out of range"):  # 9 keys need 3 pages
        cpu_kernel.mla_decode(q, [0], [9], [0], torch.tensor([0, 1]), pool, mla.r, 1.0, out)
    experts = tiny_model(dtype=torch.bfloat16).layers["1"].mlp.experts
    x = torch.zeros(5, 192, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="group 0 out of range"):  # 5 rows > MAX_ROWS
        cpu_kernel.grouped_experts(x, [0], [0], [5], *experts.stacked, torch.empty_like(x))


def test_build_lock_wait_times_out(tmp_path):
    path = tmp_path / "build.lock"
    with open(path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another build holds it
        with pytest.raises(TimeoutError, match="held by another build"):
            with cpu_kernel._exclusive(path, 0.3):
                pass
    with cpu_kernel._exclusive(path, 0.3):  # released: taken at once
        pass


def _moe_inputs(t: int, seed: int):
    moe = tiny_model(dtype=torch.bfloat16).layers["1"].mlp
    assert moe.dispatcher.holds_all and moe.experts.stacked is not None
    return moe, torch.randn(t, 192, generator=_gen(seed)).bfloat16()


@needs_kernels
@pytest.mark.parametrize("t", [1, 5, cpu_kernel.MOE_TOKENS])
def test_moe_decode_matches_gate_dispatch_experts_combine(monkeypatch, t):
    moe, x = _moe_inputs(t, seed=7)
    calls = []
    fused = cpu_kernel.moe_decode
    monkeypatch.setattr(cpu_kernel, "moe_decode", lambda *a: calls.append(1) or fused(*a))
    got = moe(x)
    got_counts = moe.dispatcher.received_e.clone()
    assert calls == [1]
    monkeypatch.setattr(moe, "_fused", lambda x_td: False)  # gate, dispatch, experts, combine
    moe.dispatcher.received_e.zero_()
    want = moe(x)
    assert torch.equal(got_counts, moe.dispatcher.received_e)  # the same experts chosen
    assert got_counts.sum() == t * moe.gate.top_k
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.float(), want.float(), **BF16_TOL)


@needs_kernels
def test_moe_decode_tokens_do_not_depend_on_their_neighbours():
    moe, x = _moe_inputs(9, seed=8)
    together = moe(x)
    assert all(torch.equal(together[i:i + 1], moe(x[i:i + 1])) for i in (0, 4, 8))


@needs_kernels
def test_moe_decode_takes_only_what_it_can():
    moe, x = _moe_inputs(cpu_kernel.MOE_TOKENS + 1, seed=9)
    assert not moe._fused(x)  # prefill-sized: the GEMM path
    assert moe._fused(x[:4]) and not moe._fused(x[:4].float())
    moe.dispatcher = type(moe.dispatcher)(moe.experts.expert_ids[:8], 16)  # half the experts
    assert not moe._fused(x[:4])


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 8, 11])
def test_int8_logits_approximate_the_head(m):
    from ds3dist.model.draft_head import _quantize

    w = torch.randn(3000, 192, generator=_gen(20)).bfloat16()
    x = torch.randn(m, 192, generator=_gen(21))
    q, scale, sums = _quantize(w)
    assert torch.equal(sums, q.sum(1, dtype=torch.int32)) and q.abs().max() == 127
    got = cpu_kernel.int8_logits(x, q, scale, sums)
    want = x @ w.float().T
    err = (got - want).abs().max() / want.abs().max()
    assert err < 0.03, err  # about 1% per operand from 8-bit rounding
    assert (got.argmax(1) == want.argmax(1)).all()
    assert torch.equal(got[-1:], cpu_kernel.int8_logits(x[-1:], q, scale, sums))  # row alone


@needs_kernels
def test_draft_head_int8_and_exact():
    from ds3dist.model.draft_head import DraftHead

    model = tiny_model(dtype=torch.bfloat16, mtp=True)
    h = torch.randn(4, 192, generator=_gen(22)).bfloat16()
    exact = DraftHead(model, "exact")(h)
    int8 = DraftHead(model, "int8")(h)
    assert DraftHead(model, "auto").int8 is not None and DraftHead(model, "exact").int8 is None
    torch.testing.assert_close(exact, model.mtp_head(h))
    assert (int8 - exact).abs().max() < 0.05 * exact.abs().max()


@needs_kernels
def test_int8_logits_are_the_same_on_every_build():
    """Integer sums are exact: VNNI, vpmaddubsw, sdot and plain C++ agree bit for bit."""
    from ds3dist.model.draft_head import _quantize

    q, scale, sums = _quantize(torch.randn(500, 256, generator=_gen(23)).bfloat16())
    x = torch.randn(5, 256, generator=_gen(24))
    per_build = []
    for isa in ISAS:
        with cpu_kernel.use_isa(isa):
            per_build.append(cpu_kernel.int8_logits(x, q, scale, sums))
    assert all(torch.equal(per_build[0], got) for got in per_build[1:])


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 4, 8, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kernel_matches_torch(m, dtype):
    w = torch.randn(300, 200, generator=_gen(25)).bfloat16()  # 200: not a multiple of the lanes
    x = torch.randn(m, 200, generator=_gen(26)).to(dtype)
    got = cpu_kernel.linear(x, w)
    want = x.float() @ w.float().T
    assert got.dtype == dtype and got.shape == (m, 300)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # rounded once from the float32 sum
        torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(got[-1:], cpu_kernel.linear(x[-1:], w))  # a row alone


@needs_kernels
def test_matmul_takes_the_measured_paths(monkeypatch):
    from ds3dist.model import linear

    w = torch.randn(64, 128, generator=_gen(27)).bfloat16()
    x = torch.randn(3, 128, generator=_gen(28)).bfloat16()
    paths = linear.choose_paths(w)
    assert paths is not None and linear.choose_paths(w.float()) is None  # float32: torch's
    assert linear.choose_paths(w) is paths  # timed once per shape
    want = F.linear(x, w)
    for kernel in (False, True):
        monkeypatch.setitem(linear._paths, linear._key(w), linear.MatmulPaths(kernel=kernel))
        torch.testing.assert_close(linear.matmul(x, w), want, rtol=1e-2, atol=1e-2)
    monkeypatch.setitem(linear._paths, linear._key(w), linear.MatmulPaths(upcast=True))
    many = torch.randn(cpu_kernel.LINEAR_ROWS + 1, 128, generator=_gen(29)).bfloat16()
    got = linear.matmul(many, w)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (many.float() @ w.float().T).bfloat16())


# an AVX-512 instruction names a zmm or mask register, or an xmm/ymm register above 15
_AVX512_OPERAND = re.compile(r"%(zmm\d+|k[1-7]\b|[xy]mm(1[6-9]|2\d|3[01])\b)")


@needs_kernels
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_each_build_holds_only_its_instruction_set(isa):
    """The AVX2 build runs on a CPU without AVX-512: not one AVX-512 instruction in it (and the
    AVX-512 build does use them: the builds differ)."""
    so = cpu_kernel.kernel().__file__
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    avx512 = [line for line in asm.splitlines() if _AVX512_OPERAND.search(line)]
    if isa == "avx512":
        assert len(avx512) > 100, f"{so}: {len(avx512)} AVX-512 instructions"
    else:
        assert not avx512, f"{so} holds AVX-512 instructions: {avx512[:5]}"
        if isa == "avx2":
            assert re.search(r"\bv\w+\s+.*%ymm", asm), f"{so}: no AVX2 (ymm) instruction"
