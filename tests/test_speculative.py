"""Speculative decoding's math (ds3dist.rank.speculative) against hand-computed values and
exact distributions: greedy verification, and rejection sampling whose output is distributed
as the target whatever the draft distribution."""

from __future__ import annotations

import numpy as np
import pytest

from ds3dist.core.params import SamplingParams
from ds3dist.core.options import SpeculativeConfig
from ds3dist.rank.speculative import draft, probs, verify

GREEDY = SamplingParams()
# chi-square critical values at a false-alarm rate of 0.001 (tables), by degrees of freedom
CHI2_999 = {3: 16.27, 5: 20.52, 7: 24.32}


def _rows(*argmaxes: int, vocab: int = 6) -> np.ndarray:
    rows = np.zeros((len(argmaxes), vocab), dtype=np.float32)
    for i, a in enumerate(argmaxes):
        rows[i, a] = 1.0
    return rows


def test_config_is_validated():
    assert SpeculativeConfig(num_tokens=3).num_tokens == 3
    for bad in (dict(num_tokens=0), dict(num_tokens=4), dict(num_tokens=True),
                dict(method="eagle")):
        with pytest.raises(ValueError, match="sampling.speculative"):
            SpeculativeConfig(**bad)


def test_greedy_accepts_the_longest_agreeing_prefix():
    rows = _rows(3, 1, 4, 2)  # the main model's argmax after x, d1, d2, d3
    assert verify(rows, [3, 1, 4], [None] * 3, GREEDY, "r", 0) == ([3, 1, 4], 2)
    assert verify(rows, [3, 5, 4], [None] * 3, GREEDY, "r", 0) == ([3], 1)
    assert verify(rows, [0, 1, 4], [None] * 3, GREEDY, "r", 0) == ([], 3)
    assert verify(rows[:1], [], [], GREEDY, "r", 0) == ([], 3)
    assert draft(rows[2], GREEDY, "r", 0) == (4, None)


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = p * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token the target gives no mass was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_rejection_sampling_draws_from_the_target():
    """First and second output tokens of a step with one draft drawn from a very different
    distribution: each is distributed as the target's row (chi-square, false alarm 0.001)."""
    target = np.log(np.array([[0.30, 0.05, 0.20, 0.25, 0.15, 0.05],
                              [0.10, 0.40, 0.10, 0.10, 0.20, 0.10]], dtype=np.float32))
    mtp = np.log(np.array([0.05, 0.50, 0.05, 0.05, 0.05, 0.30], dtype=np.float32))
    n, first, second = 6000, np.zeros(6), np.zeros(6)
    accepted = 0
    for seed in range(n):
        p = SamplingParams(temperature=1.0, seed=seed)
        d, q = draft(mtp, p, "req", 5)
        assert np.allclose(q, np.exp(mtp) / np.exp(mtp).sum())
        acc, token = verify(target, [d], [q], p, "req", 5)
        first[acc[0] if acc else token] += 1
        if acc:
            accepted += 1
            second[token] += 1
    p0, p1 = probs(target[0], p), probs(target[1], p)
    q = np.exp(mtp) / np.exp(mtp).sum()
    assert abs(accepted / n - np.minimum(p0, q).sum()) < 0.03  # acceptance = sum min(p, q)
    assert _chi2(first, p0) < CHI2_999[5]
    assert _chi2(second, p1) < CHI2_999[5]


def test_rejection_sampling_keeps_top_k():
    """With top_k the target keeps 4 entries: drafts outside them are always rejected and
    the output follows the renormalized top 4."""
    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]], dtype=np.float32)
    mtp = np.zeros(8, dtype=np.float32)  # uniform drafts: half fall outside the top 4
    counts = np.zeros(8)
    for seed in range(4000):
        p = SamplingParams(temperature=1.0, top_k=4, seed=seed)
        d, q = draft(mtp, p, "r", 0)
        acc, token = verify(np.concatenate([logits, logits]), [d], [q], p, "r", 0)
        counts[acc[0] if acc else token] += 1
    assert counts[4:].sum() == 0
    assert _chi2(counts, probs(logits[0], SamplingParams(temperature=1.0, top_k=4))) < CHI2_999[3]


def test_draws_are_keyed_by_seed_request_and_index():
    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=7)
    d, q = draft(logits[1], p, "a", 3)
    assert draft(logits[1], p, "a", 3)[0] == d
    runs = {verify(logits, [d], [q], p, "a", 3)[1] for _ in range(3)}
    assert len(runs) == 1
    others = {draft(logits[1], SamplingParams(temperature=1.0, seed=s), "a", 3)[0] for s in range(40)}
    assert len(others) > 5
