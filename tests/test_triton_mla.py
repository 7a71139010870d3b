"""The Triton paged absorbed-MLA decode kernel against its torch reference, and the reference
against an oracle over each sequence's keys as written (no page table). Without CUDA the
kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1); shapes are the
release's (128 heads, latent 512 + rope 64) scaled down to keep the interpreter quick."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from ds3dist.kernels.mla_decode import mla_decode, mla_decode_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.fixture(autouse=True)
def _interpreted():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"


def make_case(lens, rows, h, r, p, page, dtype, seed=0, index_dtype=torch.int64):
    """Sequences of lens keys, sequence k feeding rows[k] query rows (causal counts L-n+1 ..
    L), written into a pool through shuffled page ids. Slots no sequence owns hold NaN, so a
    kernel reading past a row's keys shows. -> (kernel args, keys per sequence, each row's
    (sequence, count))."""
    g = torch.Generator().manual_seed(seed)
    c = r + p
    n_pages = [-(-n // page) for n in lens]
    pool_psc = torch.full((sum(n_pages) + 3, page, c), float("nan"), dtype=dtype)
    free = torch.randperm(pool_psc.shape[0], generator=g).tolist()
    keys, page_ids, page_start, kv_len, row_of = [], [], [], [], []
    for k, (n, m) in enumerate(zip(lens, rows)):
        ids = [free.pop() for _ in range(n_pages[k])]
        k_sc = torch.randn(n, c, generator=g).to(dtype)
        for j in range(n):
            pool_psc[ids[j // page], j % page] = k_sc[j]
        for count in range(n - m + 1, n + 1):
            kv_len.append(count)
            page_start.append(len(page_ids))
            row_of.append((k, count))
        keys.append(k_sc)
        page_ids += ids
    q_rhc = torch.randn(len(kv_len), h, c, generator=g).to(dtype)
    idx = {"dtype": index_dtype, "device": DEVICE}
    args = (q_rhc.to(DEVICE), torch.tensor(kv_len, **idx), torch.tensor(page_start, **idx),
            torch.tensor(page_ids, **idx), pool_psc.to(DEVICE), r, c ** -0.5)
    return args, keys, row_of


def oracle(q_rhc, keys, row_of, r, scale) -> torch.Tensor:
    """Each row over its sequence's first `count` keys, as written: [R, H, r] float32."""
    out = []
    for q_hc, (k, count) in zip(q_rhc.float().cpu(), row_of):
        k_sc = keys[k][:count].float()
        out.append(torch.softmax(scale * q_hc @ k_sc.T, dim=-1) @ k_sc[:, :r])
    return torch.stack(out)


def close(got, want, dtype):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[dtype])


def test_reference_matches_oracle():
    args, keys, row_of = make_case([1, 17, 40], [1, 3, 2], h=4, r=160, p=16, page=16,
                                   dtype=torch.float32)
    want = oracle(args[0], keys, row_of, args[5], args[6])
    ref = mla_decode_ref(*args)
    assert ref.dtype == torch.float32 and ref.shape == (6, 4, 160)
    torch.testing.assert_close(ref.cpu(), want, rtol=1e-6, atol=1e-6)
    close(mla_decode(*args), want, torch.float32)


CASES = {  # name: (lens, rows per sequence, heads, r, p, page, num_splits)
    # 16 heads of latent 128 + rope 32; sequences crossing 16-row pages
    "h16-lat128": ([5, 33, 70], [1, 2, 4], 16, 128, 32, 16, 4),
    # tiny's 4 heads of 160 + 16 (not powers of two), 64-row pages, one split per key range
    "tiny-page64": ([3, 65, 130], [2, 1, 3], 4, 160, 16, 64, 1),
    # 8 heads of the release's 512 + 64, few keys: kv_len 1 and more splits than keys
    "lat512-few-keys": ([1, 2, 6], [1, 2, 3], 8, 512, 64, 16, 8),
    # 24 heads: a second, partly masked head block; splits not aligned to tiles or pages
    "h24-two-head-blocks": ([50, 150], [1, 4], 24, 128, 32, 16, 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, dtype):
    lens, rows, h, r, p, page, splits = CASES[name]
    index_dtype = torch.int32 if dtype == torch.bfloat16 else torch.int64
    args, _, _ = make_case(lens, rows, h, r, p, page, dtype, seed=len(name),
                           index_dtype=index_dtype)
    got = mla_decode(*args, num_splits=splits)
    assert got.dtype == dtype and got.shape == (sum(rows), h, r)
    close(got, mla_decode_ref(*args), dtype)


def test_strided_query_and_given_output():
    args, _, _ = make_case([9, 20], [2, 2], h=4, r=128, p=32, page=16, dtype=torch.float32)
    q_rhc = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # heads outermost in memory
    assert not q_rhc.is_contiguous()
    out_rhx = torch.full((4, 4, 136), 7.0, device=DEVICE)
    out_rhr = out_rhx[:, :, 8:]  # a view with its own strides
    got = mla_decode(q_rhc, *args[1:], out_rhr=out_rhr, num_splits=3)
    assert got is out_rhr
    close(out_rhr, mla_decode_ref(*args), torch.float32)
    assert (out_rhx[:, :, :8] == 7.0).all()


def test_row_without_keys_gives_zeros():
    args, _, _ = make_case([1, 12], [1, 1], h=4, r=128, p=32, page=16, dtype=torch.float32)
    kv_len_r = args[1].clone()
    kv_len_r[0] = 0  # a padding row
    got = mla_decode(args[0], kv_len_r, *args[2:])
    assert (got[0] == 0).all()
    close(got[1:], mla_decode_ref(*args)[1:], torch.float32)


def test_bad_inputs_raise():
    args, _, _ = make_case([4], [1], h=4, r=128, p=32, page=16, dtype=torch.float32)
    q_rhc, kv_len_r, page_start_r, page_ids_n, pool_psc, r, scale = args
    with pytest.raises(ValueError, match=r"q \(1, 4, 160\).*pool \(4, 16, 144\)"):
        mla_decode(q_rhc, kv_len_r, page_start_r, page_ids_n, pool_psc[..., :144], r, scale)
    with pytest.raises(ValueError, match=r"kv_len_r must have shape \(1,\)"):
        mla_decode(q_rhc, kv_len_r.repeat(2), page_start_r, page_ids_n, pool_psc, r, scale)
    with pytest.raises(ValueError, match=r"out_rhr must be \(1, 4, 128\)"):
        mla_decode(*args, out_rhr=q_rhc.new_empty(1, 4, 160))


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import ds3dist.kernels.mla_decode as m; print(m.mla_decode.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "mla_decode", done.stderr
