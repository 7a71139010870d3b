"""Expert load balancing on the engine: placements with redundant copies, rebalancing during a
job, the load window and its file. Oracle: the single-process model (float32), which no
placement may change: greedy and seeded-sampled tokens must be identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from ds3dist.config import ModelConfig
from ds3dist.core.options import BalanceOptions
from ds3dist.parallel.layout import LayoutError, ParallelLayout
from ds3dist.parallel.placement import Placement, moe_layer_ids

PROMPTS = ["The capital of France is", "Hello", "Mixture-of-experts models route each token",
           "1 2 3 4 5 6", "def fibonacci(n):", "Once upon a time"]
NEW = 10


@pytest.fixture(scope="module")
def want(tiny_fp8_dir):
    """Greedy and seeded-sampled tokens of the single-process model."""
    import ds3dist
    from ds3dist.tokenizer import load_tokenizer

    model = ds3dist.load_model(tiny_fp8_dir, dtype=torch.float32)
    tok = load_tokenizer(tiny_fp8_dir)
    greedy = ds3dist.generate(model, tok, PROMPTS, max_new_tokens=NEW)
    sampled = ds3dist.generate(model, tok, PROMPTS, max_new_tokens=NEW, temperature=0.9,
                               top_k=40, seed=11)
    return [g.token_ids for g in greedy], [s.token_ids for s in sampled]


def _redundant(cfg: ModelConfig, ep: int) -> Placement:
    """Contiguous experts plus a copy of another rank's expert on each rank (ep redundant
    copies): on tiny's 16 experts, 5 per rank on ep4, 9 on ep2."""
    base = Placement.contiguous(cfg, ep)
    extra = {4: [5, 0, 1, 2], 2: [9, 2]}[ep]
    layers = {i: tuple(tuple(sorted({*held, extra[r]})) for r, held in enumerate(ranks))
              for i, ranks in base.layers.items()}
    return Placement(cfg.n_routed_experts, ep, layers, "test")


@pytest.mark.parametrize("pp,ep,transfer", [(1, 4, "peers"), (2, 2, "checkpoint")])
def test_placement_and_rebalancing_keep_every_output(ray_cluster, tiny_fp8_dir, want, pp, ep,
                                                     transfer):
    """A placement with redundant copies, then a rebalance every 3 steps from the window's
    load, the experts a rank gains sent by another rank or read from the checkpoint: the same
    tokens as one process, the experts moved, and each rebalance is recorded."""
    from ds3dist import Engine

    cfg = ModelConfig.from_json(tiny_fp8_dir)
    place = _redundant(cfg, ep)
    layout = ParallelLayout(pp=pp, ep=ep, placement=place)
    balance = BalanceOptions(step_interval=3, window=6, redundant_experts=ep, transfer=transfer)
    with Engine(tiny_fp8_dir, layout, dtype=torch.float32, balance=balance) as engine:
        first = engine.stats()  # before any step: the placement as given
        for st in first.ranks:
            for layer_id, held in st.held_experts.items():
                assert tuple(held) == place.experts(layer_id, st.ep_rank)
        greedy = engine.generate(PROMPTS, max_new_tokens=NEW)
        sampled = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0.9, top_k=40,
                                  seed=11)
        stats = engine.stats()
    assert [g.token_ids for g in greedy] == want[0]
    assert [s.token_ids for s in sampled] == want[1]
    assert len(stats.rebalances) >= 4, stats.rebalances
    moved = sum(r.experts_read + r.experts_received for r in stats.rebalances)
    assert moved > 0 and all(r.transfer == transfer for r in stats.rebalances)
    if transfer == "peers":  # nothing read from the checkpoint
        assert sum(r.experts_read for r in stats.rebalances) == 0
    assert all(r.pause_s > 0 and r.window_steps > 0 for r in stats.rebalances)
    # every routed copy was received once, wherever its expert was
    main = [i for i in moe_layer_ids(cfg, mtp=False)]
    total = {i: sum(stats.expert_load.per_layer[i]) for i in main}
    assert len(set(total.values())) == 1 and next(iter(total.values())) > 0
    held = {(st.ep_rank, i): st.held_experts[i] for st in stats.ranks for i in st.held_experts}
    assert any(held[(r, i)] != list(place.experts(i, r)) for r, i in held)


def test_a_placement_that_does_not_fit_is_refused(tiny_fp8_dir, tmp_path):
    """Before any rank starts: the file names what is wrong."""
    cfg = ModelConfig.from_json(tiny_fp8_dir)
    good = _redundant(cfg, 4)
    lost = dict(good.layers)
    first = min(lost)
    lost[first] = tuple(tuple(x for x in r if x != 3) for r in lost[first])
    cases = {
        "made for ep=4, the layout has ep=2": (good, 2),
        "experts [3] have no copy": (Placement(16, 4, lost, "f"), 4),
        "MoE layers [2] are missing": (Placement(16, 4, {1: good.layers[1]}, "f"), 4),
    }
    for words, (place, ep) in cases.items():
        with pytest.raises(LayoutError, match=words.replace("[", r"\[").replace("]", r"\]")):
            ParallelLayout(ep=ep, placement=place).plan(cfg)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a placement file"):
        Placement.load(path)


def test_window_covers_the_last_steps():
    """The window's load is the totals now minus a snapshot at least `steps` steps old."""
    from ds3dist.rank.load_window import LoadWindow

    w = LoadWindow(steps=8)  # a snapshot every 1 step (8 // 16 -> 1)
    totals = {5: [0, 0]}
    for step in range(20):
        w.tick(lambda: {5: list(totals[5])})
        totals[5] = [totals[5][0] + 1, totals[5][1] + step]  # the step's counts
    got, covered = w.window(totals)
    assert covered == 8
    assert got == {5: [8, sum(range(12, 20))]}


@pytest.mark.parametrize("overrides,key", [
    (["+parallel=ep4", "parallel.eplb.step_interval=10", "execution.offload.backend=deepspeed"],
     "parallel.eplb.step_interval"),
    (["parallel.eplb.step_interval=10"], "parallel.eplb.step_interval"),  # ep = 1
    (["+parallel=ep4", "parallel.ranks_per_node=3"], "parallel.ranks_per_node"),
    (["+parallel=ep4", "parallel.eplb.transfer=fax"], "parallel.eplb.transfer"),
    (["+parallel=ep4", "parallel.redundant_experts=-1"], "parallel.redundant_experts"),
    (["+parallel=ep4", "parallel.eplb.window=0"], "parallel.eplb.window"),
])
def test_balancing_settings_are_checked_naming_the_key(overrides, key):
    from hydra import compose, initialize_config_module

    from ds3dist.jobs import schema

    schema.register()
    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(schema.LaunchConfigError, match=key.replace(".", r"\.")):
        schema.validate(cfg)
