"""Sampling, stop rules and generate()."""

from __future__ import annotations

import pytest
import torch

from collections import deque

from ds3dist.core.loop import serve
from ds3dist.core.params import SamplingParams
from ds3dist.core.plan import StepResult
from ds3dist.core.scheduler import Scheduler, SchedulerConfig
from ds3dist.core.options import ServingOptions
from ds3dist.local import generate
from ds3dist.model.load import load_model
from ds3dist.rank.sampling import _keeps, candidates, draw_seed, sample_rows
from ds3dist.text import GenerationResult, StopStrings, encode_prompts, make_request, result_of
from padding import right_pad



# ---- sampling --------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    got = sample_rows(logits, [SamplingParams()] * 4, [(str(i), 0) for i in range(4)])
    assert got == logits.argmax(-1).tolist()


def test_draws_depend_only_on_seed_request_and_index():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, seed=4)
    draws = [("a", 0), ("b", 5), ("c", 2)]
    together = sample_rows(logits, [p] * 3, draws)
    assert together == sample_rows(logits, [p] * 3, draws)
    # a row draws the same whatever shares the batch with it, and in any order
    assert sample_rows(logits[2:], [p], draws[2:]) == together[2:]
    assert sample_rows(logits[[1, 0]], [p, p], [draws[1], draws[0]]) == together[1::-1]
    # rows with different parameters in one batch: each as if alone
    q = SamplingParams(temperature=0.0)
    mixed = sample_rows(logits, [p, q, p], draws)
    assert mixed[0] == together[0] and mixed[2] == together[2]
    assert mixed[1] == int(logits[1].argmax())
    assert draw_seed(4, "a", 0) != draw_seed(4, "a", 1) != draw_seed(5, "a", 1)


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])  # flat (nucleus past 1024 entries) .. peaked
@pytest.mark.parametrize("top_k,top_p", [(0, 0.95), (0, 0.5), (3000, 0.9), (50, 1.0), (0, 1e-6)])
def test_candidates_equal_a_full_sort(scale, top_k, top_p):
    g = torch.Generator().manual_seed(int(scale * 10) + top_k)
    row = torch.randn(20000, generator=g) * scale
    vals, idx = row.sort(descending=True)
    if top_k:
        vals, idx = vals[:top_k], idx[:top_k]
    probs = vals.double().softmax(-1)
    keep = idx[(probs.cumsum(-1) - probs) < top_p]  # the smallest prefix reaching top_p
    want = torch.zeros(20000, dtype=torch.bool)
    want[keep] = True
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    got_ids = candidates(row.numpy(), params)
    got = torch.ones(20000, dtype=torch.bool) if got_ids is None else torch.zeros(20000, dtype=torch.bool)
    if got_ids is not None:
        got[torch.from_numpy(got_ids)] = True
    assert int(got.sum()) == int(want.sum()) and bool((got == want).all())
    # the draw's shortcut (is this entry kept?) agrees, at the boundary and elsewhere
    n = int(want.sum())
    probe = idx[max(0, n - 3):n + 3].tolist() + torch.randint(0, 20000, (40,), generator=g).tolist()
    x = row.numpy()
    assert [_keeps(x, params, x[j]) for j in probe] == [bool(want[j]) for j in probe]


def _freq(logits, params, n=20000):
    rows = sample_rows(logits.expand(n, -1), [params] * n, [(str(i), 0) for i in range(n)])
    return torch.bincount(torch.tensor(rows), minlength=logits.shape[-1]).float() / n


def test_top_k_then_top_p_distribution():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    # top_k=3 keeps {1, 3, 4} -> 0.4/0.85, 0.3/0.85, 0.15/0.85
    f = _freq(logits, SamplingParams(temperature=1.0, top_k=3, seed=0))
    torch.testing.assert_close(f, torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85, atol=0.015, rtol=0)
    # then top_p=0.8 of those (0.47, 0.35, 0.18): keeps 1 and 3
    f = _freq(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=0))
    torch.testing.assert_close(f, torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7, atol=0.015, rtol=0)
    # tiny top_p is greedy; temperature sharpens
    assert (_freq(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=0), 100)[1] == 1).item()
    f = _freq(logits, SamplingParams(temperature=0.5, seed=0))
    want = torch.softmax(logits[0] / 0.5, -1)
    torch.testing.assert_close(f, want, atol=0.015, rtol=0)


# ---- stop rules ----------------------------------------------------------------------------
class CharTokenizer:
    """id i <-> chr(ord('a') + i); id 0 is EOS (special, dropped from text)."""

    eos_token_id = 0
    bos_token_id = None

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == 0))


class Scripted:
    """An executor (one column) whose sampling steps return the next of `tokens`."""

    max_in_flight, overlap = 1, False

    def __init__(self, tokens):
        self.tokens, self.done = iter(tokens), deque()

    def submit(self, plan):
        res = StepResult(plan.step_id)
        res.sampled = {s.req_id: next(self.tokens) for s in plan.seqs() if s.sample}
        self.done.append(res)

    def result(self, timeout_s=None):
        return self.done.popleft()


def test_stop_rules():
    """Stop token ids and lengths end a request in the scheduler, stop strings in the loop
    (the text edge); the result's text leaves out the stop token and the stop string."""
    tok = CharTokenizer()

    def run(tokens, max_new=10):
        req = make_request(tok, "r", [1], SamplingParams(), max_new, stop=["cd", 7])
        sched = Scheduler(SchedulerConfig(pages_per_column=8, page_size=4, max_model_len=64))
        (ended,) = serve(sched, Scripted(tokens + [99]), [req])  # 99: never reached
        return result_of(ended, tok)

    assert run([1, 2, 3]) == GenerationResult([1, 2, 3], "b", "stop", 1)  # "bcd" holds "cd"
    assert run([5, 7]) == GenerationResult([5, 7], "f", "stop", 1)  # stop token id 7
    assert run([4, 0]) == GenerationResult([4, 0], "e", "stop", 1)  # EOS (the tokenizer's)
    assert run([4, 5], max_new=2) == GenerationResult([4, 5], "ef", "length", 1)
    assert run([], max_new=0) == GenerationResult([], "", "length", 1)


def test_stop_strings_are_found_where_decoding_everything_finds_them(tok):
    """The incremental check against the full decode after every token (the release
    tokenizer; random ids break characters across tokens, real text does not)."""
    import random

    rng = random.Random(0)
    text_ids = tok.encode("Héllo wörld 🙂 日本語のテキスト, and more: ünïcödé " * 4)
    for trial in range(60):
        ids = text_ids if trial % 4 == 0 else [rng.randrange(0, 128000) for _ in range(80)]
        k = rng.randrange(1, len(ids))
        full = tok.decode(ids[:k])
        stop = full[-rng.randrange(1, 6):] if full.strip() else "\x00never"
        want = next((n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n])), None)
        s, got, fed = StopStrings(tok, [stop, "\x01absent"]), None, 0
        while got is None and fed < len(ids):
            step = ids[fed:fed + rng.randrange(1, 4)]  # one token, or several (drafts)
            hit = s.feed(step)
            got = None if hit is None else fed + hit
            fed += len(step)
        assert got == want, (trial, stop, got, want)


def test_encode_prompts_prepends_bos_once():
    tok = CharTokenizer()
    assert encode_prompts(tok, ["bc", [3, 4]], bos_token_id=9) == [[9, 1, 2], [3, 4]]
    assert encode_prompts(tok, ["jbc"], bos_token_id=9) == [[9, 1, 2]]  # 'j' is id 9
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(tok, [""])


# ---- generate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_bf16_dir):
    return load_model(tiny_bf16_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_bf16_dir):
    from ds3dist.tokenizer import load_tokenizer

    return load_tokenizer(tiny_bf16_dir)


def _greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generate_matches_recompute_for_a_padded_batch(model):
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [42] * 5]
    res = generate(model, None, prompts, max_new_tokens=12)
    for p, r in zip(prompts, res):
        assert r.token_ids == _greedy_by_recompute(model, p, 12)
        assert r.finish_reason == "length" and r.prompt_tokens == len(p) and r.text == ""


def test_stop_token_ends_one_sequence_early(model):
    prompts = [[5, 6, 7], [100, 200, 300, 400]]
    full = generate(model, None, prompts, max_new_tokens=10)
    stop_tok = full[0].token_ids[3]
    res = generate(model, None, prompts, max_new_tokens=10, stop=[stop_tok])
    first = full[0].token_ids.index(stop_tok)
    assert res[0].token_ids == full[0].token_ids[: first + 1] and res[0].finish_reason == "stop"
    other = full[1].token_ids
    cut = other.index(stop_tok) + 1 if stop_tok in other else len(other)
    assert res[1].token_ids == other[:cut]  # unaffected by its neighbour leaving the batch


def test_text_prompts_and_seeded_sampling(model, tokenizer):
    prompts = ["Hello world", "The quick brown fox jumps over"]
    a = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].prompt_tokens == len(tokenizer.encode("Hello world")) + 1  # BOS prepended
    assert a[0].text == tokenizer.decode(a[0].token_ids) or a[0].finish_reason == "stop"
    g = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert len(g[1].token_ids) == 8 or g[1].finish_reason == "stop"


def test_preemption_does_not_change_results(model):
    """A cache too small for every request at once: the scheduler preempts and recomputes;
    greedy and seeded sampled tokens equal those of a cache that holds everything."""
    prompts = [[5, 6, 7] * 6, [100, 200, 300, 400] * 5, [42] * 17, [9, 8] * 9]
    for kw in ({}, {"temperature": 0.9, "top_p": 0.95, "seed": 11}):
        roomy = generate(model, None, prompts, max_new_tokens=24, **kw)
        tight = generate(model, None, prompts, max_new_tokens=24, cache_pages=12,
                         serving=ServingOptions(page_size=4, max_tokens_per_step=16), **kw)
        assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]


def test_request_too_long_for_the_cache_fails_alone(model):
    res = generate(model, None, [[5] * 40, [6, 7]], max_new_tokens=4, cache_pages=4,
                   serving=ServingOptions(page_size=8))
    assert res[0].finish_reason == "error" and "can never fit the cache pool" in res[0].error
    assert res[1].finish_reason == "length" and len(res[1].token_ids) == 4


def test_right_pad():
    toks, lens = right_pad([[1, 2], [3]])
    assert toks.tolist() == [[1, 2], [3, 0]] and lens.tolist() == [2, 1]
