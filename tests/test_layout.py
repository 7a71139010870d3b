"""The expected-tensor table against the release's published shapes and totals."""

from __future__ import annotations

import math

import pytest

from ds3dist.checkpoint.layout import (
    expected_tensors,
    expert_of,
    layer_of,
    parameter_counts,
)
from ds3dist.config import preset


@pytest.fixture(scope="module")
def release():
    return expected_tensors(preset("deepseek_v3"))


# (name, shape, dtype) straight from the spec / the release's index and headers
RELEASE_SHAPES = [
    ("model.embed_tokens.weight", (129280, 7168), "BF16"),
    ("lm_head.weight", (129280, 7168), "BF16"),
    ("model.norm.weight", (7168,), "BF16"),
    ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", (576, 7168), "F8_E4M3"),
    ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv", (5, 56), "F32"),
    ("model.layers.3.self_attn.kv_b_proj.weight", (32768, 512), "F8_E4M3"),
    ("model.layers.3.self_attn.kv_b_proj.weight_scale_inv", (256, 4), "F32"),
    ("model.layers.3.self_attn.q_a_proj.weight", (1536, 7168), "F8_E4M3"),
    ("model.layers.3.self_attn.q_a_proj.weight_scale_inv", (12, 56), "F32"),
    ("model.layers.3.self_attn.q_b_proj.weight", (24576, 1536), "F8_E4M3"),
    ("model.layers.3.self_attn.q_b_proj.weight_scale_inv", (192, 12), "F32"),
    ("model.layers.3.self_attn.o_proj.weight", (7168, 16384), "F8_E4M3"),
    ("model.layers.3.self_attn.o_proj.weight_scale_inv", (56, 128), "F32"),
    ("model.layers.3.self_attn.q_a_layernorm.weight", (1536,), "BF16"),
    ("model.layers.3.self_attn.kv_a_layernorm.weight", (512,), "BF16"),
    ("model.layers.0.mlp.gate_proj.weight", (18432, 7168), "F8_E4M3"),
    ("model.layers.2.mlp.down_proj.weight", (7168, 18432), "F8_E4M3"),
    ("model.layers.2.mlp.down_proj.weight_scale_inv", (56, 144), "F32"),
    ("model.layers.3.mlp.gate.weight", (256, 7168), "BF16"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", (256,), "F32"),
    ("model.layers.3.mlp.experts.255.up_proj.weight", (2048, 7168), "F8_E4M3"),
    ("model.layers.3.mlp.experts.255.up_proj.weight_scale_inv", (16, 56), "F32"),
    ("model.layers.60.mlp.experts.0.down_proj.weight", (7168, 2048), "F8_E4M3"),
    ("model.layers.60.mlp.experts.0.down_proj.weight_scale_inv", (56, 16), "F32"),
    ("model.layers.60.mlp.shared_experts.gate_proj.weight_scale_inv", (16, 56), "F32"),
    ("model.layers.61.embed_tokens.weight", (129280, 7168), "BF16"),
    ("model.layers.61.enorm.weight", (7168,), "BF16"),
    ("model.layers.61.hnorm.weight", (7168,), "BF16"),
    ("model.layers.61.eh_proj.weight", (7168, 14336), "BF16"),
    ("model.layers.61.shared_head.norm.weight", (7168,), "BF16"),
    ("model.layers.61.shared_head.head.weight", (129280, 7168), "BF16"),
    ("model.layers.61.mlp.experts.7.gate_proj.weight", (2048, 7168), "F8_E4M3"),
]


@pytest.mark.parametrize("name,shape,dtype", RELEASE_SHAPES, ids=[r[0] for r in RELEASE_SHAPES])
def test_release_shapes(release, name, shape, dtype):
    s = release[name]
    assert (s.shape, s.dtype) == (shape, dtype)


def test_release_counts(release):
    assert len(release) == 91991
    assert len(expected_tensors(preset("deepseek_v3"), mtp=False)) == 90427  # 91991 - 1564 MTP
    # dense layers have no gate/experts, MoE layers do
    assert "model.layers.2.mlp.gate.weight" not in release
    assert "model.layers.3.mlp.gate_proj.weight" not in release
    assert "model.layers.62.input_layernorm.weight" not in release
    n_scales = sum(s.name.endswith("_scale_inv") for s in release.values())
    n_fp8 = sum(s.dtype == "F8_E4M3" for s in release.values())
    # per layer 5 attention linears; 3 dense-mlp linears x 3 layers; (256 + 1) x 3 x 59 MoE layers
    assert n_fp8 == n_scales == 62 * 5 + 3 * 3 + 59 * 257 * 3


def test_release_totals():
    c = parameter_counts(preset("deepseek_v3"))
    assert 670e9 < c["main"] < 672e9
    assert 11.4e9 < c["mtp_unique"] < 11.7e9
    assert 37.4e9 < c["active_per_token"] < 37.6e9
    # one expert is 3 x 2048 x 7168 = 44.0M params; 58 MoE layers x 256 experts
    assert c["routed_experts"] == 58 * 256 * 3 * 2048 * 7168
    assert c["embedding"] == c["head"] == 129280 * 7168


def test_release_total_bytes(release):
    total = sum(s.nbytes for s in release.values())
    assert total == pytest.approx(688.6e9, rel=2e-4)


def test_every_scale_matches_its_weight(release):
    for s in release.values():
        if s.dtype == "F8_E4M3":
            sc = release[s.name + "_scale_inv"]
            assert sc.shape == (math.ceil(s.shape[0] / 128), math.ceil(s.shape[1] / 128))
        if s.name.endswith("_scale_inv"):
            assert release[s.name[: -len("_scale_inv")]].dtype == "F8_E4M3"


def test_release_order_is_layer_by_layer(release):
    names = list(release)
    assert names[0] == "model.embed_tokens.weight"
    layers = [layer_of(n) for n in names if layer_of(n) is not None]
    assert layers == sorted(layers)
    i_norm = names.index("model.norm.weight")
    assert names[i_norm + 1] == "lm_head.weight"
    assert all(layer_of(n) == 61 for n in names[i_norm + 2:])


def test_tiny_has_ragged_fp8_blocks_in_both_dims():
    t = expected_tensors(preset("tiny"))
    fp8 = [s for s in t.values() if s.dtype == "F8_E4M3"]
    assert any(s.shape[0] % 128 and s.shape[1] % 128 for s in fp8)  # e.g. kv_a_proj
    assert any(s.shape[0] % 128 and not s.shape[1] % 128 for s in fp8)  # rows only
    assert any(s.shape[1] % 128 and not s.shape[0] % 128 for s in fp8)  # columns only
    kv_a = t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.shape == (176, 192)
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)


def test_bf16_table_has_no_scales():
    cfg = preset("tiny").replace(quantization_config=None)
    t = expected_tensors(cfg)
    assert not any(s.name.endswith("_scale_inv") for s in t.values())
    assert t["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == "BF16"
    assert set(t) == {n for n in expected_tensors(preset("tiny")) if not n.endswith("_scale_inv")}


def test_layer_and_expert_of():
    assert layer_of("model.layers.17.mlp.experts.3.up_proj.weight") == 17
    assert expert_of("model.layers.17.mlp.experts.3.up_proj.weight") == 3
    assert expert_of("model.layers.17.mlp.shared_experts.up_proj.weight") is None
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None
