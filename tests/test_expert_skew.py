"""synthesize(skew=S) / --expert-skew S: expert popularity follows Zipf(S) in every MoE layer.

The skewed tiny checkpoint is written through the CLI; its routing is measured on the model
itself (a float32 forward over random tokens, the gate's choices recorded per MoE layer).
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import ds3dist
from ds3dist.checkpoint import synthesize as synth
from ds3dist.checkpoint.layout import expected_tensors
from ds3dist.checkpoint.reader import CheckpointReader
from ds3dist.config import preset

SKEW = 1.2
TOKENS = (3, 128)  # 384 random tokens through the model


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-skew"
    assert synth.main(["--preset", "tiny", "--out", str(out), "--shards", "4", "--no-progress",
                       "--expert-skew", str(SKEW)]) == 0
    return out


def _shares_per_layer(ckpt, monkeypatch) -> dict[int, torch.Tensor]:
    """{MoE layer: share of routed copies per expert} of a float32 forward over random tokens."""
    model = ds3dist.load_model(ckpt, dtype=torch.float32)
    chosen: dict[int, list[torch.Tensor]] = {}
    for layer, moe in model.moe_layers().items():
        forward = moe.gate.forward

        def record(x_td, forward=forward, layer=layer):
            idx_tk, w_tk = forward(x_td)
            chosen.setdefault(layer, []).append(idx_tk)
            return idx_tk, w_tk

        monkeypatch.setattr(moe.gate, "forward", record)
    g = torch.Generator().manual_seed(7)
    model(torch.randint(2, model.cfg.vocab_size, TOKENS, generator=g))
    e = model.cfg.n_routed_experts
    out = {}
    for layer, idx in chosen.items():
        idx = torch.cat(idx).reshape(-1)
        out[layer] = torch.bincount(idx, minlength=e).double() / idx.numel()
    return out


def _slope(shares_sorted: torch.Tensor, ranks: range) -> float:
    """Least-squares slope of log(share) against log(rank) over `ranks` (1-based)."""
    x = torch.log(torch.tensor(list(ranks), dtype=torch.float64))
    y = torch.log(shares_sorted[ranks.start - 1:ranks.stop - 1])
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


# ---- the target ------------------------------------------------------------------------------
def test_zipf_shares_capped_at_one_over_top_k():
    p = synth.zipf_shares(16, SKEW)
    assert p.sum().item() == pytest.approx(1) and p[0].item() == pytest.approx(0.3654, abs=1e-3)
    assert torch.allclose(p / p[0], torch.arange(1, 17, dtype=torch.float64) ** -SKEW)
    # tiny routes 4 copies per token: no expert can take more than 1/4 of them
    c = synth.zipf_shares(16, SKEW, cap=0.25)
    assert c.sum().item() == pytest.approx(1) and c[0].item() == pytest.approx(0.25)
    ranks = torch.arange(2, 17, dtype=torch.float64)
    assert torch.allclose(c[1:] / c[1], (ranks / 2) ** -SKEW)
    assert (c[1:] <= 0.25).all() and (c[1:] > p[1:]).all()  # the excess went to the others
    assert torch.equal(synth.zipf_shares(8, 0.0), torch.full((8,), 1 / 8, dtype=torch.float64))
    big = synth.zipf_shares(16, 6.0, cap=0.25)  # a cap reached by several ranks
    assert big[:3].tolist() == [0.25] * 3 and big.sum().item() == pytest.approx(1)


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek_v3"])
def test_targets_reachable_and_differ_between_layers(name):
    cfg = preset(name)
    layers = [i for i in range(cfg.num_hidden_layers + 1) if cfg.is_moe_layer(i)][:6]
    ranked = synth.zipf_shares(cfg.n_routed_experts, SKEW, 1 / cfg.num_experts_per_tok)
    hot = set()
    for layer in layers:
        t = synth.expert_skew_target(cfg, layer, 0, SKEW)
        assert torch.equal(t.sort(descending=True).values, ranked)
        assert synth._reachable(cfg, t)
        assert torch.equal(t, synth.expert_skew_target(cfg, layer, 0, SKEW))  # seeded
        hot.add(int(t.argmax()))
    assert len(hot) > 1
    # so steep that no random permutation is reachable in tiny: the hot ranks fill whole groups
    steep = synth.expert_skew_target(preset("tiny"), 1, 0, 6.0)
    assert synth._reachable(preset("tiny"), steep)


def test_tiny_random_permutations_often_unreachable():
    """Why permutations are redrawn: in tiny (4 copies from 2 of 4 groups of 4) the four
    hottest experts in four groups cannot all be reached."""
    cfg = preset("tiny")
    share = torch.zeros(16, dtype=torch.float64)
    share[[0, 4, 8, 12]] = synth.zipf_shares(16, SKEW, 0.25)[:4]
    share[share == 0] = (1 - share.sum()) / 12
    assert not synth._reachable(cfg, share)


def test_calibration_deterministic_and_close():
    cfg = preset("tiny")
    name = "model.layers.2.mlp.gate.e_score_correction_bias"
    a = synth.make_weight(cfg, name, (16,), 0, skew=SKEW)
    b = synth._skew_bias(cfg, name, 0, SKEW)
    assert a.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert not torch.equal(a, synth.make_weight(cfg, name, (16,), 1, skew=SKEW))
    # on its own calibration states the measured shares are within 0.02 (L1) of the target
    from ds3dist.model.gate import route

    scores = synth._skew_scores(cfg, 2, 0, synth._SKEW_ROWS)
    idx, _ = route(scores, a, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, 1.0)
    measured = torch.bincount(idx.reshape(-1), minlength=16).double() / idx.numel()
    assert (measured - synth.expert_skew_target(cfg, 2, 0, SKEW)).abs().sum() < 0.02


# ---- the checkpoint ---------------------------------------------------------------------------
def test_skew_zero_is_byte_identical(tiny_fp8_dir, tmp_path):
    out = synth.synthesize(tmp_path / "z", preset="tiny", seed=0, shards=4, progress=False,
                           skew=0.0)
    names = sorted(p.name for p in tiny_fp8_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for n in names:
        assert hashlib.sha256((out / n).read_bytes()).digest() == \
            hashlib.sha256((tiny_fp8_dir / n).read_bytes()).digest(), n


def test_only_the_selection_bias_changes(skewed_dir, tiny_fp8_dir):
    assert (skewed_dir / "config.json").read_text() == (tiny_fp8_dir / "config.json").read_text()
    assert (skewed_dir / "model.safetensors.index.json").read_text() == \
        (tiny_fp8_dir / "model.safetensors.index.json").read_text()
    cfg = preset("tiny")
    with CheckpointReader(skewed_dir) as a, CheckpointReader(tiny_fp8_dir) as b:
        for name in expected_tensors(cfg):
            x, y = a.get(name), b.get(name)
            same = torch.equal(x.view(torch.uint8), y.view(torch.uint8))
            assert same != name.endswith("e_score_correction_bias"), name
            if not same:
                assert torch.equal(x, synth._skew_bias(cfg, name, 0, SKEW)), name


def test_routing_follows_zipf(skewed_dir, monkeypatch):
    cfg = preset("tiny")
    target_sorted = synth.zipf_shares(16, SKEW, 1 / cfg.num_experts_per_tok)
    shares = _shares_per_layer(skewed_dir, monkeypatch)
    assert sorted(shares) == [1, 2]  # the MoE layers a forward runs (the MTP layer is not run)
    for layer, s in shares.items():
        srt = s.sort(descending=True).values
        top = srt[0].item()
        assert abs(top - target_sorted[0].item()) <= 0.25 * target_sorted[0].item(), (layer, srt)
        # ranks below the cap follow i^-S
        assert _slope(srt, range(2, 9)) == pytest.approx(-SKEW, abs=0.3), (layer, srt)
        assert _slope(srt, range(1, 9)) < -0.6, (layer, srt)
        # expert by expert, close to this layer's target
        assert (s - synth.expert_skew_target(cfg, layer, 0, SKEW)).abs().sum() < 0.2, (layer, s)
        assert s.max() / s.mean() > 3
    hottest = {int(s.argmax()) for s in shares.values()}
    assert len(hottest) > 1, hottest


def test_no_skew_routes_near_uniform(tiny_fp8_dir, monkeypatch):
    for layer, s in _shares_per_layer(tiny_fp8_dir, monkeypatch).items():
        assert s.max() / s.mean() < 2, (layer, s)


# ---- refused -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1.0, -0.01, math.nan, math.inf])
def test_negative_skew_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="--expert-skew"):
        synth.synthesize(tmp_path / "x", preset="tiny", skew=bad, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arg", ["-1", "-0.5", "nan", "x"])
def test_cli_refuses_bad_skew(arg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(["--out", str(tmp_path / "x"), f"--expert-skew={arg}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--expert-skew" in err and ">= 0" in err
    assert not (tmp_path / "x").exists()
