"""Cached decode equals full recomputation (float32, prompts of different lengths)."""

from __future__ import annotations

import pytest
import torch

from ds3dist.generation import right_pad
from ds3dist.model.load import load_model

STEPS = 32


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 129280, (n,), generator=g).tolist() for n in (3, 9, 6)]


def _recompute_greedy(model, prompts, steps):
    seqs = [list(p) for p in prompts]
    logits = []
    for _ in range(steps):
        toks, lens = right_pad(seqs)
        out = model(toks, lens)
        last = out[torch.arange(len(seqs)), lens - 1]
        logits.append(last)
        for s, t in zip(seqs, last.argmax(-1).tolist()):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)], torch.stack(logits, 1)


def _cached_greedy(model, prompts, steps):
    toks, lens = right_pad(prompts)
    cache = model.new_cache(len(prompts), int(lens.max()) + steps)
    h = model.forward_layers(model.embed(toks), torch.arange(toks.shape[1]).expand_as(toks), cache, lens)
    last = model.logits(h[torch.arange(len(prompts)), lens - 1][:, None])[:, 0]
    out, logits = [[] for _ in prompts], []
    for step in range(steps):
        logits.append(last)
        nxt = last.argmax(-1)
        for o, t in zip(out, nxt.tolist()):
            o.append(t)
        assert cache.lens.tolist() == (lens + step).tolist()
        if step + 1 < steps:
            h = model.forward_layers(model.embed(nxt[:, None]), cache.lens[:, None], cache)
            last = model.logits(h)[:, 0]
    return out, torch.stack(logits, 1)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_cached_decode_equals_recompute(tiny_bf16_dir, prompts, form):
    torch.set_num_threads(2)
    model = load_model(tiny_bf16_dir, dtype=torch.float32, attn_form=form)
    want_tok, want_logits = _recompute_greedy(model, prompts, STEPS)
    got_tok, got_logits = _cached_greedy(model, prompts, STEPS)
    assert got_tok == want_tok
    diff = (got_logits - want_logits).abs().max().item()
    print(f"cached vs recompute ({form}): max |diff| = {diff:.3g}")
    assert diff <= 1e-4


def test_chunked_prefill_and_dropping_rows(tiny_bf16_dir, prompts):
    """Prefill in two chunks equals one prefill; select() keeps the chosen rows."""
    torch.set_num_threads(2)
    model = load_model(tiny_bf16_dir, dtype=torch.float32)
    toks, lens = right_pad(prompts)
    t = toks.shape[1]
    pos = torch.arange(t).expand_as(toks)
    one = model.new_cache(3, t + 4)
    h_one = model.forward_layers(model.embed(toks), pos, one, lens)
    two = model.new_cache(3, t + 4)
    cut = 4
    lens_a = lens.clamp(max=cut)
    h_a = model.forward_layers(model.embed(toks[:, :cut]), pos[:, :cut], two, lens_a)
    h_b = model.forward_layers(model.embed(toks[:, cut:]), pos[:, cut:], two, (lens - cut).clamp(min=0))
    h_two = torch.cat([h_a, h_b], 1)
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(h_two[i, :n], h_one[i, :n], rtol=1e-5, atol=1e-5)
    assert two.lens.tolist() == one.lens.tolist() == lens.tolist()
    for lid in one.rows:
        for i, n in enumerate(lens.tolist()):
            torch.testing.assert_close(two.rows[lid][i, :n], one.rows[lid][i, :n], rtol=1e-5, atol=1e-5)
    # drop sequence 0, then decode one step for the other two
    nxt = torch.tensor([[11], [12], [13]])
    full = model.forward_layers(model.embed(nxt), one.lens[:, None], one)
    two.select([1, 2])
    part = model.forward_layers(model.embed(nxt[1:]), two.lens[:, None], two)
    torch.testing.assert_close(part, full[1:], rtol=1e-5, atol=1e-5)
