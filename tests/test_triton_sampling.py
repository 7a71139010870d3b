"""Device sampling (ds3dist.kernels.sampling): the Triton kernel against the torch reference,
under Triton's interpreter on the CPU here (compiled where there is CUDA).

- Noise: the kernel's hash of (key, j) equals the reference's bit for bit, its Gumbel noise to
  1e-6, at vocabularies that are not a multiple of the kernel's block; a key's noise is the same
  alone and in a batch, and other keys' noise differs.
- Draws: sample_device equals sample_ref row for row on a mix of parameters (greedy, ties,
  top_k, top_p, both), at vocab 1000 and 129280; a row's draw does not depend on its batch;
  the cut-offs follow the host sampler's `cutoff`.
- Exactness: on a vocabulary of 6 with hand-computed probabilities after a top_k / top_p cut,
  4000 keyed draws pass a chi-square test at a false-alarm rate of 0.001 and never draw a cut
  entry (sample_ref; sample_device equals it on a share of the keys).
- With CUDA: one call reads the device once (the ids).
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from ds3dist import kernels
from ds3dist.core.params import SamplingParams
from ds3dist.kernels import sampling
from ds3dist.kernels.sampling import (
    gumbel_noise,
    gumbel_noise_ref,
    sample_device,
    sample_ref,
)
from ds3dist.rank.sampling import cutoff, draw_key

# chi-square critical values at a false-alarm rate of 0.001 (tables), by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}
BIG_VOCAB = 129280
KEYS = [0, 1, (1 << 63) - 1, draw_key(7, "req-3", 12)]
MIX = [SamplingParams(),  # greedy
       SamplingParams(temperature=0.7),
       SamplingParams(temperature=1.0, top_k=5),
       SamplingParams(temperature=1.0, top_p=0.9),
       SamplingParams(temperature=0.8, top_k=40, top_p=0.6),
       SamplingParams(temperature=1.3, top_k=1),
       SamplingParams(temperature=0.5, top_p=0.3, seed=1),
       SamplingParams(temperature=1.0, top_k=3)]


@pytest.fixture(autouse=True)
def _triton():
    with kernels.forced():
        yield


def _logits(n: int, vocab: int, seed: int, ties: bool = False) -> torch.Tensor:
    """Random float32 logits; with ties, on a coarse grid (many equal values, cut-offs and
    maxima among them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 2
    return torch.round(x * 2) / 2 if ties else x


def _keys(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(n)]


@pytest.mark.parametrize("vocab,n", [(1000, len(KEYS)), (BIG_VOCAB, 2)])
def test_noise_matches_reference(vocab, n):
    keys_n = torch.tensor(KEYS[:n], dtype=torch.int64)
    h = sampling._hash_kernel(keys_n, vocab)
    assert h.shape == (n, vocab) and int(h.min()) >= 0 and int(h.max()) < 1 << 32
    assert torch.equal(h, sampling._hash_ref(keys_n, vocab))
    g = gumbel_noise(keys_n, vocab)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    torch.testing.assert_close(g, gumbel_noise_ref(keys_n, vocab), rtol=1e-6, atol=1e-6)


def test_noise_is_keyed():
    """Same key, same noise (alone or in a batch); other keys, other noise; Gumbel moments."""
    keys = _keys(6, 1)
    batch = gumbel_noise(torch.tensor(keys + keys[:1]), 5000)
    alone = gumbel_noise(torch.tensor(keys[2:3]), 5000)
    assert torch.equal(batch[0], batch[-1]) and torch.equal(batch[2], alone[0])
    for a in range(6):
        for b in range(a + 1, 6):
            assert (batch[a] == batch[b]).float().mean() < 1e-2
    g = gumbel_noise_ref(torch.tensor(_keys(64, 2)), 4096).double()
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - math.pi ** 2 / 6) < 0.03


@pytest.mark.parametrize("block", [None, 256])
def test_sample_device_matches_reference(block, monkeypatch):
    if block:  # several blocks per row at vocab 1000
        monkeypatch.setattr(sampling, "_block_v", lambda: block)
    params = MIX + MIX
    x = torch.cat([_logits(len(MIX), 1000, 0), _logits(len(MIX), 1000, 1, ties=True)])
    x[0, [17, 400, 17 + 256, 17 + 512]] = x[0].max() + 1  # greedy ties: the first maximum
    keys = _keys(len(params), 3)
    got = sample_device(x, params, keys)
    assert got == sample_ref(x, params, keys)
    assert got[0] == 17 and got[len(MIX)] == int(torch.argmax(x[len(MIX)]))
    if block:
        return
    wide = _logits(4, BIG_VOCAB, 4)
    wide[0, [808, 808 + 8192, 70000]] = wide[0].max() + 1  # one lane, several blocks
    wide_params = [MIX[0], MIX[1], MIX[3], MIX[4]]
    keys = KEYS[1:] + [5]
    got = sample_device(wide, wide_params, keys)
    assert got == sample_ref(wide, wide_params, keys) and got[0] == 808


def test_draws_do_not_depend_on_the_batch():
    params = MIX + MIX
    x = torch.cat([_logits(len(MIX), 1000, 5), _logits(len(MIX), 1000, 6, ties=True)])
    keys = _keys(len(params), 7)
    batch = sample_device(x, params, keys)
    for i in range(len(params)):
        assert sample_device(x[i:i + 1], params[i:i + 1], keys[i:i + 1]) == [batch[i]]
    order = list(reversed(range(len(params))))
    flipped = sample_device(x[order], [params[i] for i in order], [keys[i] for i in order])
    assert flipped == [batch[i] for i in order]


def test_cutoffs_follow_the_host_rule():
    params = MIX[1:] + MIX[1:]
    x = torch.cat([_logits(len(MIX) - 1, 1000, 8), _logits(len(MIX) - 1, 1000, 9, ties=True)])
    temp_n = torch.tensor([p.temperature for p in params])
    cut_n = sampling._cutoffs(x, temp_n, params)
    for x_v, p, cut in zip(x.numpy(), params, cut_n.tolist()):
        want = cutoff(x_v / np.float32(p.temperature), p)
        assert cut == (-math.inf if want is None else float(want)), p


# (logits, params, the kept entries' probabilities, computed by hand)
_S = [2.0, 0.4, 1.2, -0.6, 0.0, 0.8]  # scaled by T = 0.5: top 3 are entries 0, 2, 5
_Q = [0.06, 0.4, 0.1, 0.25, 0.04, 0.15]  # top_p 0.75 keeps 0.4, 0.25, 0.15 (mass before: 0.65)
EXACT = {
    "top_k": ([s * 0.5 for s in _S], SamplingParams(temperature=0.5, top_k=3),
              {0: math.exp(2.0), 2: math.exp(1.2), 5: math.exp(0.8)}),
    # the top 3's probabilities .571, .257, .172: top_p 0.7 keeps the first two
    "top_k+top_p": ([s * 0.5 for s in _S], SamplingParams(temperature=0.5, top_k=3, top_p=0.7),
                    {0: math.exp(2.0), 2: math.exp(1.2)}),
    "top_p": ([math.log(q) * 0.8 for q in _Q], SamplingParams(temperature=0.8, top_p=0.75),
              {1: 0.4, 3: 0.25, 5: 0.15}),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_sampler(case):
    logits, p, weights = EXACT[case]
    n = 4000
    keys = {"top_k": list(range(n)),  # consecutive keys, as well as random ones
            "top_k+top_p": [draw_key(5, "req", i) for i in range(n)],
            "top_p": _keys(n, 11)}[case]
    x = torch.tensor([logits] * n, dtype=torch.float32)
    drawn = sample_ref(x, [p] * n, keys)
    counts = np.bincount(drawn, minlength=6)
    kept = sorted(weights)
    assert counts[[j for j in range(6) if j not in weights]].sum() == 0
    total = sum(weights.values())
    expected = np.array([n * weights[j] / total for j in kept])
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[len(kept) - 1], (counts, expected)
    m = 300
    assert sample_device(x[:m], [p] * m, keys[:m]) == drawn[:m]


def test_same_key_same_draw():
    x = _logits(1, 1000, 12).expand(4, -1).contiguous()
    p = [SamplingParams(temperature=1.0)] * 4
    got = sample_device(x, p, [9, 10, 9, 11])
    assert got[0] == got[2] and len({got[0], got[1], got[3]}) == 3
    assert sample_device(x[:1], p[:1], [9]) == got[:1]


def test_import_needs_no_triton():
    code = ("import sys; sys.modules['triton'] = None; "
            "import ds3dist.kernels.sampling as s; print(s.BLOCK_V)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_device_to_host_read():
    x = _logits(len(MIX), BIG_VOCAB, 13).cuda()
    keys = _keys(len(MIX), 14)
    sample_device(x, MIX, keys)  # builds the kernel
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            got = sample_device(x, MIX, keys)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) == 1
    assert got == sample_ref(x, MIX, keys)
