"""The distributed engine on a local CPU Ray cluster (gloo) against the single-process model."""

import os
import signal
import threading
import time

import pytest
import torch

from ds3dist.checkpoint.layout import expected_tensors, expert_of, layer_of
from ds3dist.config import ModelConfig
from ds3dist.parallel.layout import ParallelLayout

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Mixture-of-experts models route each token to a few experts, and",
    "1 2 3 4 5 6",
    "def fibonacci(n):",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference(tiny_fp8_dir):
    """Greedy tokens of the single-process model (float32)."""
    import ds3dist
    from ds3dist.tokenizer import load_tokenizer

    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    tok = load_tokenizer(tiny_fp8_dir)
    return ds3dist.generate(model, tok, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)


@pytest.mark.parametrize("pp,ep,control", [(1, 1, "compiled"), (1, 2, "compiled"),
                                           (2, 2, "compiled"), (1, 4, "compiled"),
                                           (2, 2, "classic")])
def test_layout_matches_single_process(ray_cluster, tiny_fp8_dir, reference, pp, ep, control):
    from ds3dist import Engine
    from ds3dist.core.options import ServingOptions

    with Engine(tiny_fp8_dir, ParallelLayout(pp=pp, ep=ep), execution="bf16",
                dtype=torch.float32, serving=ServingOptions(control=control)) as engine:
        got = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
        for g, r in zip(got, reference):
            assert g.token_ids == r.token_ids
            assert g.finish_reason == r.finish_reason
            assert g.text == r.text
        assert any(len(set(r.token_ids)) > 3 for r in reference)  # not a constant stream
        stats = engine.stats()
        assert len(stats.ranks) == pp * ep
        assert stats.scheduler.steps >= NEW_TOKENS
        # every routed copy of every MoE layer is counted once, at its owner
        cfg = ModelConfig.from_json(tiny_fp8_dir)
        main = {i: sum(row) for i, row in stats.expert_load.per_layer.items() if i < cfg.num_hidden_layers}
        assert set(main) == {i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
        # each main MoE layer saw the same tokens, K copies each
        assert len(set(main.values())) == 1
        assert next(iter(main.values())) % cfg.num_experts_per_tok == 0
        assert next(iter(main.values())) > 0
        # the engine goes on serving after stats() (a compiled graph is made anew)
        again = engine.generate(PROMPTS[:2], max_new_tokens=4)
        assert [g.token_ids for g in again] == [r.token_ids[:4] for r in reference[:2]]


def _ideal_bytes(cfg, plan) -> int:
    total = 0
    mtp_ids = set(cfg.mtp_layer_ids)
    for spec in expected_tensors(cfg).values():
        layer = layer_of(spec.name)
        if layer is None:
            own = plan.embed if spec.name.startswith("model.embed_tokens") else plan.head
        elif layer in mtp_ids:
            own = False  # the MTP layer is loaded only when something runs it
        else:
            own = layer in plan.layers
        e = expert_of(spec.name)
        if own and (e is None or e in plan.experts):
            total += spec.nbytes
    return total


def test_each_rank_reads_its_share(ray_cluster, tiny_fp8_dir):
    from ds3dist import Engine

    cfg = ModelConfig.from_json(tiny_fp8_dir)
    layout = ParallelLayout(pp=2, ep=2)
    with Engine(tiny_fp8_dir, layout, execution="bf16", dtype=torch.float32) as engine:
        stats = engine.stats().ranks
    whole = sum(s.nbytes for s in expected_tensors(cfg).values())
    for plan, st in zip(layout.plan(cfg), stats):
        ideal = _ideal_bytes(cfg, plan)
        assert ideal < whole
        assert abs(st.load.bytes_read - ideal) <= 0.10 * ideal, (plan.rank, st.load.bytes_read, ideal)
        assert st.rss_bytes > 0


def test_killed_actor_raises_named_error(ray_cluster, tiny_fp8_dir):
    from ds3dist.runtime.engine import Engine, EngineError

    engine = Engine(tiny_fp8_dir, ParallelLayout(pp=2, ep=1), execution="bf16",
                    dtype=torch.float32)
    victim = engine.infos[1]
    outcome = {}

    def run():
        try:
            engine.generate(PROMPTS * 4, max_new_tokens=4000, temperature=0.0)
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e
        outcome["t"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(3.0)
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    th.join(timeout=90)
    assert not th.is_alive(), "generate did not return after a rank was killed"
    err = outcome["error"]
    assert isinstance(err, EngineError), repr(err)
    assert outcome["t"] - killed_at <= 60
    msg = str(err)
    assert "rank 1" in msg and "stage 1" in msg and victim["node_ip"] in msg
    assert f"rank 1 (stage 1, ep rank 0) on node {victim['node_ip']}: died" in msg, msg
    assert engine.actors == []  # resources released


def test_fp8_execution_with_fp8_dispatch_payload(ray_cluster, tiny_fp8_dir):
    """fp8 execution sends FP8 + scales through the all-to-all; results track one process."""
    import ds3dist
    from ds3dist import Engine
    from ds3dist.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_fp8_dir)
    model = ds3dist.load_model(tiny_fp8_dir, execution="fp8")
    want = ds3dist.generate(model, tok, PROMPTS[:4], max_new_tokens=8)
    with Engine(tiny_fp8_dir, ParallelLayout(pp=1, ep=2), execution="fp8") as engine:
        got = engine.generate(PROMPTS[:4], max_new_tokens=8)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_early_stops_and_seeded_sampling_match_single_process(ray_cluster, tiny_fp8_dir, reference):
    """Sequences leaving the batch at different steps, and seeded sampling, on pp2 x ep2."""
    import ds3dist
    from ds3dist import Engine
    from ds3dist.tokenizer import load_tokenizer

    ref_results = reference
    stop_ids = [ref_results[0].token_ids[2], ref_results[2].token_ids[6]]
    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    tok = load_tokenizer(tiny_fp8_dir)
    want_stop = ds3dist.generate(model, tok, PROMPTS, max_new_tokens=NEW_TOKENS, stop=stop_ids)
    want_sampled = ds3dist.generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0.8,
                                    top_p=0.9, top_k=50, seed=3)
    assert "stop" in {w.finish_reason for w in want_stop}
    assert len({len(w.token_ids) for w in want_stop}) > 1
    with Engine(tiny_fp8_dir, ParallelLayout(pp=2, ep=2), execution="bf16",
                dtype=torch.float32) as engine:
        got_stop = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop=stop_ids)
        got_sampled = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.8, top_p=0.9,
                                      top_k=50, seed=3)
    assert [(g.token_ids, g.finish_reason, g.text) for g in got_stop] == \
        [(w.token_ids, w.finish_reason, w.text) for w in want_stop]
    assert [g.token_ids for g in got_sampled] == [w.token_ids for w in want_sampled]
    assert [g.token_ids for g in got_sampled] != [r.token_ids[:8] for r in ref_results]


def test_more_ranks_than_the_cluster_has(ray_cluster, tiny_fp8_dir):
    from ds3dist import Engine
    from ds3dist.parallel.layout import LayoutError

    with pytest.raises(LayoutError) as e:
        Engine(tiny_fp8_dir, ParallelLayout(pp=3, ep=4), execution="bf16")
    assert "needs 12 ranks" in str(e.value) and "Ray reports" in str(e.value)
    assert ray_cluster.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray_cluster.util.placement_group_table().values())


def test_napper_sleeps_a_share_of_a_smaller_steps_wait(monkeypatch):
    """The driver's nap before a compiled-graph read: share x the longest recent wait of a step
    with no more tokens, never past the deadline; no such step, no nap; a read that finds its
    result already there halves what is remembered."""
    from ds3dist.runtime import control

    clock = [100.0]
    monkeypatch.setattr(control.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(control.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    nap = control.Napper(share=0.8)
    nap.begin = 100.0
    assert nap.nap(8, None) == 100.0  # nothing measured yet: read at once
    clock[0] = 100.05  # the read spun: an 8-token step took 50 ms from the start of the wait
    nap.observe(8, 100.0)
    assert list(nap.waits) == [(8, pytest.approx(0.05))]
    clock[0] += 1.0  # a 2048-token step, 1 s
    nap.observe(2048, clock[0] - 0.5)
    begin = nap.begin
    assert nap.nap(4, None) == begin  # no step this small seen: no nap
    start = nap.nap(8, None)  # 0.8 x the 8-token step's 50 ms, not the long step's
    assert start == pytest.approx(begin + 0.04)
    nap.observe(8, start)  # returned at once: the result was already there
    assert [w for _, w in nap.waits] == [pytest.approx(0.025), pytest.approx(0.5)]
    now = nap.begin = clock[0]
    assert nap.nap(4096, deadline=now + 0.001) == pytest.approx(now + 0.001)  # the deadline


def test_stage_handoff_over_the_process_group(ray_cluster, tiny_fp8_dir, reference, monkeypatch):
    """The GPU path's stage hand-off (hidden states sent rank to rank over the process group,
    only a HiddenRef through the driver), forced on CPU over gloo: the same tokens as one
    process, and every step's states went through it."""
    import ray

    from ds3dist import Engine
    from ds3dist.runtime.handoff import P2P_ENV

    monkeypatch.setenv(P2P_ENV, "1")
    with Engine(tiny_fp8_dir, ParallelLayout(pp=2, ep=2), dtype=torch.float32) as engine:
        got = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
        assert [g.token_ids for g in got] == [r.token_ids for r in reference]
        counts = ray.get([a.__ray_call__.remote(
            lambda w: (w.plan.stage, w.plan.ep_rank, w.handoff.sent, w.handoff.received))
            for a in engine.actors], timeout=60)
    by = {(stage, r): (sent, received) for stage, r, sent, received in counts}
    for r in range(2):  # each column's steps with tokens: sent by stage 0, received by stage 1
        sent, received = by[(0, r)][0], by[(1, r)][1]
        assert sent == received >= NEW_TOKENS and by[(0, r)][1] == by[(1, r)][0] == 0, counts
