"""The paged latent cache: cached decode equals full recomputation (float32, prompts of
different lengths, scattered page tables), chunked prefill equals one prefill, and a mixed
step (prefill chunks and decodes together) equals each sequence run alone."""

from __future__ import annotations

import random

import pytest
import torch

from padding import right_pad
from ds3dist.model.load import load_model

STEPS = 32
PAGE = 4


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 129280, (n,), generator=g).tolist() for n in (3, 9, 6)]


def scattered_tables(n_seqs: int, pages_each: int, seed: int = 0) -> list[list[int]]:
    """Disjoint page tables whose pages are shuffled across the pool."""
    ids = list(range(n_seqs * pages_each))
    random.Random(seed).shuffle(ids)
    return [ids[i * pages_each:(i + 1) * pages_each] for i in range(n_seqs)]


def _recompute_greedy(model, prompts, steps):
    seqs = [list(p) for p in prompts]
    logits = []
    for _ in range(steps):
        toks, lens = right_pad(seqs)
        last = model(toks, lens)[torch.arange(len(seqs)), lens - 1]
        logits.append(last)
        for s, t in zip(seqs, last.argmax(-1).tolist()):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)], torch.stack(logits, 1)


def _cached_greedy(model, prompts, steps):
    pages_each = -(-(max(map(len, prompts)) + steps) // PAGE)
    tables = scattered_tables(len(prompts), pages_each)
    cache = model.new_cache(len(prompts) * pages_each, PAGE)
    feed, starts = [list(p) for p in prompts], [0] * len(prompts)
    out, logits = [[] for _ in prompts], []
    for _ in range(steps):
        lens = [len(f) for f in feed]
        tb = model.token_batch(starts, lens, tables, PAGE)
        h = model.forward_layers(model.embed(torch.tensor(sum(feed, []))), tb, cache)
        last = model.logits(h[tb.last_rows])
        logits.append(last)
        nxt = last.argmax(-1).tolist()
        for o, t in zip(out, nxt):
            o.append(t)
        starts = [s + n for s, n in zip(starts, lens)]
        feed = [[t] for t in nxt]
    return out, torch.stack(logits, 1)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_cached_decode_equals_recompute(tiny_bf16_dir, prompts, form):
    model = load_model(tiny_bf16_dir, dtype=torch.float32, attn_form=form)
    want_tok, want_logits = _recompute_greedy(model, prompts, STEPS)
    got_tok, got_logits = _cached_greedy(model, prompts, STEPS)
    assert got_tok == want_tok
    diff = (got_logits - want_logits).abs().max().item()
    print(f"paged cached vs recompute ({form}): max |diff| = {diff:.3g}")
    assert diff <= 1e-4


def test_chunked_prefill_equals_one_prefill(tiny_bf16_dir, prompts):
    model = load_model(tiny_bf16_dir, dtype=torch.float32)
    tables = scattered_tables(len(prompts), 4, seed=1)
    lens = [len(p) for p in prompts]
    one = model.new_cache(len(prompts) * 4, PAGE)
    tb = model.token_batch([0] * 3, lens, tables, PAGE)
    h_one = model.forward_layers(model.embed(torch.tensor(sum(prompts, []))), tb, one)
    two = model.new_cache(len(prompts) * 4, PAGE)
    cut = [min(n, 4) for n in lens]  # first chunk; sequence 0 (3 tokens) is done after it
    parts = []
    for starts, chunk in ([0] * 3, cut), (cut, [n - c for n, c in zip(lens, cut)]):
        toks = [p[s:s + n] for p, s, n in zip(prompts, starts, chunk)]
        tb = model.token_batch(starts, chunk, tables, PAGE)
        h = model.forward_layers(model.embed(torch.tensor(sum(toks, []))), tb, two)
        parts.append(h.split(chunk))
    h_two = torch.cat([torch.cat([a, b]) for a, b in zip(*parts)])
    torch.testing.assert_close(h_two, h_one, rtol=1e-5, atol=1e-5)
    for lid in model.layer_ids:  # the rows each sequence wrote (pages are not zeroed)
        for table, n in zip(tables, lens):
            rows = [c.pools[lid][table].reshape(-1, c.width)[:n] for c in (one, two)]
            torch.testing.assert_close(rows[1], rows[0], rtol=1e-5, atol=1e-5)


def test_mixed_step_equals_each_sequence_alone(tiny_bf16_dir, prompts):
    """One step holding a decode, a prefill chunk and a whole prompt gives each sequence what
    it gets in a step of its own."""
    model = load_model(tiny_bf16_dir, dtype=torch.float32)
    tables = scattered_tables(3, 4, seed=2)
    cache = model.new_cache(12, PAGE)
    # history: sequence 0 has its prompt cached, sequence 1 its first 5 tokens
    tb = model.token_batch([0, 0], [3, 5], tables[:2], PAGE)
    model.forward_layers(model.embed(torch.tensor(prompts[0] + prompts[1][:5])), tb, cache)
    starts, lens = [3, 5, 0], [1, 4, 6]
    feed = [[77], prompts[1][5:], prompts[2]]
    tb = model.token_batch(starts, lens, tables, PAGE)
    together = model.forward_layers(model.embed(torch.tensor(sum(feed, []))), tb, cache)
    for i, part in enumerate(together.split(lens)):
        alone_cache = model.new_cache(12, PAGE)
        hist = (prompts[i] + [0])[:starts[i]]
        if starts[i]:
            tb = model.token_batch([0], [starts[i]], [tables[i]], PAGE)
            model.forward_layers(model.embed(torch.tensor(hist)), tb, alone_cache)
        tb = model.token_batch([starts[i]], [lens[i]], [tables[i]], PAGE)
        alone = model.forward_layers(model.embed(torch.tensor(feed[i])), tb, alone_cache)
        torch.testing.assert_close(part, alone, rtol=1e-5, atol=1e-5)


def test_token_batch_slots_and_errors(tiny_bf16_dir):
    model = load_model(tiny_bf16_dir, dtype=torch.float32, layers=[0], mtp=False)
    tb = model.token_batch([2, 0], [3, 2], [[7, 1], [4]], PAGE)
    assert tb.positions_t.tolist() == [2, 3, 4, 0, 1]
    assert tb.slots_t.tolist() == [7 * 4 + 2, 7 * 4 + 3, 1 * 4 + 0, 4 * 4 + 0, 4 * 4 + 1]
    assert tb.kv_lens == [5, 2] and tb.last_rows == [2, 4] and tb.offsets == [0, 3, 5]
    with pytest.raises(ValueError, match="sequence 0 needs 2 pages"):
        model.token_batch([2], [3], [[7]], PAGE)
    with pytest.raises(ValueError, match="without a cache"):
        model.token_batch([1], [1])
