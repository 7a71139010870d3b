"""The GPU path on the whole `tiny` model, on a CPU: the Triton kernels forced (kernels.forced(),
Triton's interpreter), so its page tables, layouts and dispatch run on every commit.

- Greedy generation with the GPU path (decode attention, grouped experts, device sampling,
  decode steps through the padded CUDA-graph buffers) gives the CPU path's tokens in float32,
  with bf16 and with FP8 execution. Oracle: the same model on the CPU path.
- Expert counts of the GPU path equal the CPU path's (padding rows of graph steps left out).
- In bfloat16 a decode step's logits stay within a stated tolerance of the CPU path's.
- Padding rows of a graph step touch only the scratch page: every other cache row is the same
  as after the unpadded step.
"""

from __future__ import annotations

import pytest
import torch

import ds3dist
from ds3dist import kernels
from ds3dist.core.options import ServingOptions
from ds3dist.rank import graphs as graphs_mod

pytest.importorskip("triton")
if not kernels.interpreting():
    pytest.skip("forcing the kernels on CPU tensors needs Triton's interpreter (no GPU)",
                allow_module_level=True)

PROMPTS = ["The capital of France is", "Hello", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
           "def fibonacci(n):", "Mixture-of-experts models route each token"]
NEW = 4
PAGE = 16  # prompts and decode cross page boundaries
BF16_LOGIT_TOL = 3e-2  # max |forced - cpu| / max |cpu| of a decode step's logits


@pytest.fixture
def calls(monkeypatch):
    """How often each GPU-path piece ran (wrapping the names the model looks up)."""
    seen = {"mla_decode": 0, "fused_experts": 0, "sample_device": 0, "graph_steps": 0}
    import ds3dist.model.experts as experts_mod
    import ds3dist.model.mla as mla_mod
    import ds3dist.model.moe as moe_mod
    import ds3dist.rank.runner as runner_mod

    def counted(name, fn):
        def wrapper(*a, **k):
            seen[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(mla_mod, "mla_decode", counted("mla_decode", mla_mod.mla_decode))
    fe = counted("fused_experts", moe_mod.fused_experts)
    monkeypatch.setattr(moe_mod, "fused_experts", fe)
    monkeypatch.setattr(experts_mod, "fused_experts", fe)
    monkeypatch.setattr(runner_mod, "sample_device",
                        counted("sample_device", runner_mod.sample_device))
    monkeypatch.setattr(graphs_mod.DecodeGraphs, "run",
                        counted("graph_steps", graphs_mod.DecodeGraphs.run))
    return seen


@pytest.mark.parametrize("execution", ["bf16", "fp8"])
def test_greedy_tokens_equal_the_cpu_path_in_float32(tiny_fp8_dir, tok, calls, execution):
    model = ds3dist.load_model(tiny_fp8_dir, execution=execution, dtype=torch.float32, mtp=False)
    serving = ServingOptions(page_size=PAGE)
    want = ds3dist.generate(model, tok, PROMPTS, max_new_tokens=NEW, serving=serving)
    assert calls == dict.fromkeys(calls, 0)  # the CPU path takes none of them
    load = _expert_load(model)
    with kernels.forced():
        got = ds3dist.generate(model, tok, PROMPTS, max_new_tokens=NEW, serving=serving)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # the same routing counted again, and no padding row of a graph step counted
    assert _expert_load(model) == {i: [2 * c for c in row] for i, row in load.items()}
    assert any(len(set(w.token_ids)) > 2 for w in want)
    layers = len(model.layer_ids)
    assert calls["graph_steps"] >= NEW - 1  # decode steps went through the graph buffers
    assert calls["mla_decode"] >= layers * (NEW - 1)
    assert calls["fused_experts"] >= (layers - 1) * NEW
    assert calls["sample_device"] >= NEW


def _expert_load(model) -> dict[int, list[int]]:
    return {i: moe.dispatcher.stats()["received_per_expert"]
            for i, moe in model.moe_layers().items()}


def _prefilled(model, tables, lens):
    cache = model.new_cache(len(tables) * 4, PAGE, scratch=True)
    for pool in cache.pools.values():  # rows never written compare equal
        pool.zero_()
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, model.cfg.vocab_size, (sum(lens),), generator=g)
    tb = model.token_batch([0] * len(lens), lens, tables, PAGE)
    with torch.inference_mode():
        model.forward_layers(model.embed(toks), tb, cache)
    return cache


def test_graph_step_bf16_logits_and_padding_rows(tiny_fp8_dir):
    """Three sequences (padded to the bucket of 4) decode one token: the bf16 logits are
    within BF16_LOGIT_TOL of the CPU path's, and the padding row wrote only the scratch page."""
    model = ds3dist.load_model(tiny_fp8_dir, dtype=torch.bfloat16, mtp=False)
    lens = [20, 5, 33]
    tables = [[0, 1, 2], [3], [4, 5, 6]]
    nxt = torch.tensor([11, 22, 33])
    step = model.token_batch(lens, [1, 1, 1], tables, PAGE)
    with torch.inference_mode():
        cache = _prefilled(model, tables, lens)
        want = model.logits(model.forward_layers(model.embed(nxt), step, cache))
        after_cpu = {i: p.clone() for i, p in cache.pools.items()}
        cache = _prefilled(model, tables, lens)
        with kernels.forced():
            runner = graphs_mod.DecodeGraphs(model, cache, capture=False)
            got = model.logits(runner.run(model.embed(nxt), step))
    err = float((got - want).abs().max() / want.abs().max())
    assert err < BF16_LOGIT_TOL, f"bf16 logits differ by {err:.2e} of their largest"
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    print(f"bf16 decode logits: max rel diff {err:.2e}")
    for i, pool in cache.pools.items():  # real pages: the written rows agree
        real = pool[: cache.num_pages].float()
        diff = (real - after_cpu[i][: cache.num_pages].float()).abs().max()
        assert diff < 0.05, f"layer {i}: cache rows differ by {diff}"
    assert cache.pools[model.layer_ids[0]].shape[0] == cache.num_pages + 1
