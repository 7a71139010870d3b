"""Oracle: our model's logits equal HF transformers' DeepseekV3ForCausalLM (float32).

The tiny FP8 checkpoint is dequantized by the project's converter (fixture tiny_bf16_dir),
HF loads it with rope_interleave=True (the reference's interleaved rotary pairs), and both
run in float32. HF runs each prompt alone; ours runs them as one right-padded batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from ds3dist.config import ModelConfig
from ds3dist.model.load import load_model
from ds3dist.model.rope import yarn_inv_freq

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (5, 11, 8, 48)  # 48: the auto form attends naive


@pytest.fixture(scope="module")
def hf_model(tiny_bf16_dir):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config.from_pretrained(tiny_bf16_dir)
    cfg.rope_interleave = True
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        tiny_bf16_dir, config=cfg, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    return model.eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 129280, (n,), generator=g) for n in PROMPT_LENS]


def test_hf_builds_the_same_yarn_and_softmax_scale(hf_model, tiny_bf16_dir):
    """HF reads the synthesizer's rope_scaling as YaRN over qk_rope_head_dim, no cos/sin scale."""
    cfg = ModelConfig.from_json(tiny_bf16_dir)
    rotary = hf_model.model.rotary_emb
    inv_freq, cos_scale = yarn_inv_freq(cfg)
    assert hf_model.config.rope_parameters["rope_type"] == "yarn"
    torch.testing.assert_close(rotary.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == cos_scale == 1.0
    attn = hf_model.model.layers[0].self_attn
    assert math.isclose(attn.scaling, cfg.softmax_scale(), rel_tol=1e-12)


@pytest.mark.parametrize("form", ["auto", "absorbed", "naive"])
def test_logits_match_hf(hf_model, prompts, tiny_bf16_dir, form):
    model = load_model(tiny_bf16_dir, execution="bf16", dtype=torch.float32, attn_form=form)
    lens = torch.tensor([len(p) for p in prompts])
    toks = torch.zeros(len(prompts), int(lens.max()), dtype=torch.int64)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    ours = model(toks, seq_lens_b=lens)
    worst = 0.0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(p[None]).logits[0].float()
        worst = max(worst, (ours[i, : len(p)] - ref).abs().max().item())
    print(f"max |ours - HF| ({form}) = {worst:.3g}")
    assert worst <= 1e-4
