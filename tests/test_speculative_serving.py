"""Speculative decoding with the MTP layer end to end on `tiny` (float32).

- Greedy: the serving tests' mixed workload (every request greedy, stop strings included)
  gives the same tokens with drafts as without, in one process and on pp2ep2 and pp2, with
  k = 1 and k = 3. Oracle: the same engine without speculation.
- Sampling: the joint distribution of a request's first two tokens (the second verified
  against a draft) equals the one without speculation: a two-sample chi-square test over
  many seeds at a false-alarm rate of 0.001.
- The predictable checkpoint (synthesize(predictable=True)): the first draft is accepted
  more than 80% of the time; on random weights the rate is only reported.
- The MTP layer reads the main embedding and head (loaded once).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

import ds3dist
from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.config import ModelConfig
from ds3dist.local import LocalEngine
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.core.options import ServingOptions
from ds3dist.core.params import SamplingParams
from ds3dist.core.request import Request, RequestStatus
from ds3dist.text import make_request
from ds3dist.core.options import SpeculativeConfig
from test_serving import VOCAB_IDS, _spec

PAGE = 16
RANK_REQUESTS = 24  # of the workload's 44, on ranks (the one-process tests run all 44)
# chi-square critical values at a false-alarm rate of 0.001 (tables), by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}


@pytest.fixture(scope="module")
def model(tiny_fp8_dir):
    return ds3dist.load_model(tiny_fp8_dir, dtype=torch.float32, mtp=True)


def _request(s: dict, tok) -> Request:
    return make_request(tok, s["id"], s["prompt"], s["params"], s["max_new"],
                        s["stop"])


def _engine(model, tok, k: int | None) -> LocalEngine:
    return LocalEngine(model, tok, ServingOptions(page_size=PAGE, max_tokens_per_step=256,
                                                  max_seqs=12), cache_pages=300,
                       speculative=SpeculativeConfig(num_tokens=k) if k else None)


def _run(engine, specs, tok) -> dict:
    ended = list(engine.stream(_request(s, tok) for s in specs))
    assert len(ended) == len(specs) and all(r.status is RequestStatus.FINISHED for r in ended)
    return {r.id: (r.output_ids, r.finish_reason) for r in ended}


@pytest.fixture(scope="module")
def greedy_workload(model, tok):
    return _greedy_workload(model, tok)


def _greedy_workload(model, tok):
    """The mixed workload, every request greedy, and what it gives without speculation (stop
    strings taken from a request's own text, so that a stop falls inside accepted drafts)."""
    rng = random.Random(7)
    specs = [_spec(i, rng) for i in range(44)]
    for s in specs:
        s["params"] = SamplingParams()
    first = _run(_engine(model, tok, None), specs, tok)
    for s in specs:
        out = first[s["id"]][0]
        if s["kind"] == "stop" and len(out) >= 6:
            s["stop"] = [tok.decode(out[3:5]) or "x"]
    want = _run(_engine(model, tok, None), specs, tok)
    assert sum(w[1] == "stop" for w in want.values()) >= 3
    return specs, want


def _diff(got: dict, want: dict) -> list[str]:
    return [k for k in want if got[k] != want[k]]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_non_speculative_in_one_process(model, tok, greedy_workload, k):
    specs, want = greedy_workload
    eng = _engine(model, tok, k)
    got = _run(eng, specs, tok)
    assert not _diff(got, want), f"requests differ from non-speculative greedy: {_diff(got, want)[:5]}"
    spec = eng.stats().speculative
    st = eng.scheduler.stats
    assert len(spec["acceptance_per_position"]) == k and st.drafts_proposed[0] > 100
    print(f"k={k} random weights: acceptance {spec['acceptance_per_position']}, "
          f"tokens/step {spec['tokens_per_step']}, preemptions {st.preemptions}")


def test_greedy_equals_non_speculative_when_drafts_are_accepted(predictable_model, tok,
                                                               predictable_workload):
    """The same on the predictable checkpoint, where almost every draft is accepted: stops
    inside accepted drafts, max_new_tokens cutting drafts, preemption with drafts pending."""
    specs, want = predictable_workload
    eng = _engine(predictable_model, tok, 3)
    got = _run(eng, specs, tok)
    assert not _diff(got, want), f"requests differ from non-speculative greedy: {_diff(got, want)[:5]}"
    st = eng.scheduler.stats
    assert st.drafts_accepted[0] > 0.8 * st.drafts_proposed[0] and st.preemptions > 0
    print(f"predictable k=3: {eng.stats().speculative}, preemptions {st.preemptions}")


@pytest.fixture(scope="module")
def predictable_model(predictable_dir):
    return ds3dist.load_model(predictable_dir, dtype=torch.float32, mtp=True)


@pytest.fixture(scope="module")
def predictable_workload(predictable_model, tok):
    return _greedy_workload(predictable_model, tok)


@pytest.mark.slow
@pytest.mark.parametrize("pp,ep,k,weights", [(2, 2, 1, "random"), (2, 1, 1, "random"),
                                             (2, 2, 3, "random"), (2, 1, 3, "random"),
                                             (2, 2, 3, "predictable"), (2, 1, 1, "predictable")])
def test_greedy_equals_non_speculative_on_ranks(request, ray_cluster, tok, pp, ep, k, weights):
    from ds3dist import Engine

    if weights == "random":
        ckpt, (specs, want) = request.getfixturevalue("tiny_fp8_dir"), \
            request.getfixturevalue("greedy_workload")
    else:
        ckpt, (specs, want) = request.getfixturevalue("predictable_dir"), \
            request.getfixturevalue("predictable_workload")
    specs = specs[:RANK_REQUESTS]  # each request gets its tokens whatever shares its steps
    want = {s["id"]: want[s["id"]] for s in specs}
    assert sum(w[1] == "stop" for w in want.values()) >= 2
    cfg = ModelConfig.from_json(ckpt)
    layers = max(len(p.layers) for p in ParallelLayout(pp=pp, ep=ep).plan(cfg)) + 1
    gb = 300 * layers * PAGE * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 / 1e9
    serving = ServingOptions(cache_gb=gb, page_size=PAGE, max_tokens_per_step=256, max_seqs=12,
                             control="classic")
    with Engine(ckpt, ParallelLayout(pp=pp, ep=ep), dtype=torch.float32, serving=serving,
                speculative=SpeculativeConfig(num_tokens=k)) as engine:
        got = _run(engine, specs, tok)
        stats = engine.stats()
    assert not _diff(got, want), f"requests differ from non-speculative greedy: {_diff(got, want)[:5]}"
    spec = stats.speculative
    assert len(spec["acceptance_per_position"]) == k
    if weights == "predictable":
        assert spec["acceptance_per_position"][0] > 0.8
    print(f"pp{pp}ep{ep} k={k} {weights}: {spec}")


def _first_two(model, k: int | None, n: int) -> Counter:
    """(token 0, token 1) of n requests that differ only in their seed."""
    params = [SamplingParams(temperature=1.0, top_k=3, seed=s) for s in range(n)]
    # 3 tokens: the step after the first feeds a draft for the second (none for the last)
    reqs = [Request(f"s{i}", [11, 2000, 345, 67], p, 3) for i, p in enumerate(params)]
    eng = LocalEngine(model, None, ServingOptions(page_size=PAGE, max_seqs=256),
                      cache_pages=4 * n, speculative=SpeculativeConfig(num_tokens=k) if k else None)
    ended = list(eng.stream(reqs))
    if k:  # the second token came through a verified draft
        assert eng.scheduler.stats.drafts_proposed[0] >= n
    return Counter(tuple(r.output_ids[:2]) for r in ended)


def test_seeded_sampling_keeps_the_distribution(model):
    """Two-sample chi-square over the 9 (token 0, token 1) cells top_k = 3 allows (merged
    where expected counts are small), false alarm 0.001. Token 0 is drawn as without
    speculation; token 1 by rejection sampling against the MTP's draft."""
    n = 1000
    a, b = _first_two(model, None, n), _first_two(model, 1, n)
    cells = sorted(set(a) | set(b))
    big = [c for c in cells if a[c] + b[c] >= 20]
    rows = np.array([[a[c] for c in big] + [sum(a[c] for c in cells if c not in big)],
                     [b[c] for c in big] + [sum(b[c] for c in cells if c not in big)]], float)
    rows = rows[:, rows.sum(0) > 0]
    expected = rows.sum(1, keepdims=True) * rows.sum(0, keepdims=True) / rows.sum()
    chi2 = float(((rows - expected) ** 2 / expected).sum())
    df = rows.shape[1] - 1
    assert 3 <= df <= 8, f"unexpected cells: {cells}"
    print(f"chi-square {chi2:.2f} with {df} degrees of freedom")
    assert chi2 < CHI2_999[df]


@pytest.fixture(scope="module")
def predictable_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-predictable"
    return synthesize(out, preset="tiny", seed=0, progress=False, predictable=True)


def test_predictable_checkpoint_accepts_most_drafts(predictable_model):
    model = predictable_model
    rng = random.Random(3)
    prompts = [[rng.randrange(*VOCAB_IDS) for _ in range(rng.randrange(1, 40))] for _ in range(6)]
    eng = LocalEngine(model, None, ServingOptions(page_size=PAGE), cache_pages=64,
                      speculative=SpeculativeConfig(num_tokens=2))
    out = eng.generate(prompts, max_new_tokens=24)
    for p, r in zip(prompts, out):  # the model's own rule: next = current + 1
        assert r.token_ids == [(p[-1] + 1 + i) % model.cfg.vocab_size for i in range(24)]
    spec = eng.stats().speculative
    print(f"predictable: {spec}")
    assert spec["acceptance_per_position"][0] > 0.8
    assert spec["steps_per_token"] < 0.6


def test_mtp_reads_the_main_embedding_and_head(tiny_fp8_dir):
    full = ds3dist.load_model(tiny_fp8_dir, dtype=torch.float32, mtp=True)
    layer = full.mtp[str(full.mtp_layer_ids[0])]
    assert layer.embed_tokens is None and not hasattr(layer.shared_head, "head")
    n = full.cfg.num_hidden_layers
    last = ds3dist.load_model(tiny_fp8_dir, dtype=torch.float32, mtp=True, layers=[n - 1])
    assert last.embed_tokens is None and last.mtp[str(n)].embed_tokens is not None
    h = torch.randn(5, full.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    nxt = torch.tensor([5, 70, 900, 12, 3])
    tb = full.token_batch([0], [5])
    torch.testing.assert_close(full.mtp_logits(h, nxt, tb), last.mtp_logits(h, nxt, tb))
