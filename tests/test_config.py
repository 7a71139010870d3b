"""ModelConfig: validation names the bad field; the release's config.json round-trips."""

from __future__ import annotations

import json

import pytest

from ds3dist.config import ConfigError, ModelConfig, preset

# The release's config.json (deepseek-ai/DeepSeek-V3), keys and values as published.
RELEASE_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def bad(**changes) -> str:
    """The ConfigError message for the release config with `changes` applied."""
    d = dict(RELEASE_CONFIG, **changes)
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d)
    return str(ei.value)


def test_experts_not_divisible_by_groups():
    msg = bad(n_routed_experts=250)
    assert "n_routed_experts" in msg and "250" in msg and "n_group=8" in msg


def test_topk_larger_than_experts():
    msg = bad(n_routed_experts=16, n_group=2, topk_group=1, num_experts_per_tok=17)
    assert "num_experts_per_tok" in msg and "17" in msg


def test_topk_group_larger_than_n_group():
    msg = bad(topk_group=9)
    assert "topk_group" in msg and "9" in msg and "n_group=8" in msg


@pytest.mark.parametrize("key", ["factor", "original_max_position_embeddings", "beta_fast",
                                 "mscale_all_dim", "type"])
def test_missing_rope_scaling_key(key):
    rs = {k: v for k, v in RELEASE_CONFIG["rope_scaling"].items() if k != key}
    msg = bad(rope_scaling=rs)
    assert "rope_scaling" in msg and key in msg


def test_all_problems_reported_at_once():
    msg = bad(topk_group=9, hidden_act="gelu", tie_word_embeddings=True)
    for field in ("topk_group", "hidden_act", "tie_word_embeddings"):
        assert field in msg


def test_non_positive_field_named():
    msg = bad(hidden_size=0)
    assert "hidden_size" in msg and "positive" in msg


def test_release_config_round_trips(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(RELEASE_CONFIG))
    cfg = ModelConfig.from_json(tmp_path)  # a directory finds its config.json
    assert cfg == preset("deepseek_v3")
    assert cfg.is_fp8 and cfg.block_size == (128, 128)
    assert cfg.extra["auto_map"] == RELEASE_CONFIG["auto_map"]
    assert cfg.to_json_dict() == RELEASE_CONFIG
    # through JSON text again
    assert json.loads(json.dumps(cfg.to_json_dict())) == RELEASE_CONFIG


def test_release_derived_values():
    cfg = ModelConfig.from_dict(RELEASE_CONFIG)
    assert cfg.qk_head_dim == 192
    assert cfg.experts_per_group == 32
    assert cfg.mtp_layer_ids == [61]
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    # 192^-0.5 * (0.1 * ln 40 + 1)^2, the spec's 0.1352338
    assert cfg.softmax_scale() == pytest.approx(0.1352338, abs=1e-7)


def test_bf16_config_has_no_quantization(tmp_path):
    d = {k: v for k, v in RELEASE_CONFIG.items() if k != "quantization_config"}
    cfg = ModelConfig.from_dict(d)
    assert not cfg.is_fp8
    assert "quantization_config" not in cfg.to_json_dict()


def test_from_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_json(tmp_path)


def test_presets_valid_and_unknown_preset():
    for name in ("tiny", "small", "deepseek_v3"):
        preset(name).validate()
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        preset("huge")
