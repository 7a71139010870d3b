"""MTP head: mtp_logits equals the spec formula composed here from the checkpoint's raw tensors.

u = eh_proj(cat([enorm(embed(t+1)), hnorm(h_t)])) -> layer-L block -> shared_head.norm ->
shared_head.head. The block is HF transformers' DeepseekV3DecoderLayer loaded with the raw
layer-L tensors (an implementation independent of ours); the rest is written out below.
"""

from __future__ import annotations

import pytest
import torch

from ds3dist.checkpoint.reader import CheckpointReader
from ds3dist.model.load import load_model

transformers = pytest.importorskip("transformers")


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _hf_block(ckpt, layer_id):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    cfg = DeepseekV3Config.from_pretrained(ckpt)
    cfg.rope_interleave = True
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    layer = hf.DeepseekV3DecoderLayer(cfg, layer_id).float().eval()
    p = f"model.layers.{layer_id}."
    with CheckpointReader(ckpt) as r:
        raw = {n[len(p):]: r.get(n).float() for n in r.names() if n.startswith(p)}
    e = cfg.n_routed_experts
    sd = {k: v for k, v in raw.items() if ".experts." not in k and k.split(".")[0] in
          ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")}
    sd["mlp.experts.gate_up_proj"] = torch.stack([
        torch.cat([raw[f"mlp.experts.{j}.gate_proj.weight"], raw[f"mlp.experts.{j}.up_proj.weight"]])
        for j in range(e)])
    sd["mlp.experts.down_proj"] = torch.stack([raw[f"mlp.experts.{j}.down_proj.weight"] for j in range(e)])
    layer.load_state_dict(sd, strict=True)
    return cfg, layer, raw, hf.DeepseekV3RotaryEmbedding(cfg)


def test_mtp_logits_equal_spec_composition(tiny_bf16_dir):
    model = load_model(tiny_bf16_dir, dtype=torch.float32)
    lid = model.mtp_layer_ids[0]
    assert lid == model.cfg.num_hidden_layers
    hf_cfg, block, raw, rotary = _hf_block(tiny_bf16_dir, lid)
    eps = model.cfg.rms_norm_eps

    g = torch.Generator().manual_seed(7)
    toks = torch.randint(0, 129280, (2, 10), generator=g)
    t = toks.shape[1] - 1
    tb = model.token_batch([0, 0], [t, t])
    h = model.forward_layers(model.embed(toks[:, :-1].reshape(-1)), tb)  # pre-norm last hidden
    nxt = toks[:, 1:]  # token t+1 for each position t
    got = model.mtp_logits(h, nxt.reshape(-1), tb).view(2, t, -1)
    h = h.view(2, t, -1)

    e = raw["embed_tokens.weight"][nxt]
    u = torch.cat([_rms(e, raw["enorm.weight"], eps), _rms(h, raw["hnorm.weight"], eps)], -1)
    u = u @ raw["eh_proj.weight"].T
    pos = torch.arange(t)[None].expand(2, t)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out = block(u, attention_mask=mask, position_ids=pos, position_embeddings=rotary(u, pos))
    want = _rms(out, raw["shared_head.norm.weight"], eps) @ raw["shared_head.head.weight"].T
    diff = (got - want).abs().max().item()
    print(f"mtp_logits vs spec composition: max |diff| = {diff:.3g}")
    assert got.dtype == torch.float32 and got.shape == (2, t, model.cfg.vocab_size)
    assert diff <= 1e-4


def test_mtp_with_cache_equals_without(tiny_bf16_dir):
    """Incremental MTP (the speculative-decoding use) matches the full causal MTP pass."""
    model = load_model(tiny_bf16_dir, dtype=torch.float32)
    toks = torch.randint(0, 129280, (9,))
    tb = model.token_batch([0], [8])
    h = model.forward_layers(model.embed(toks[:-1]), tb)
    full = model.mtp_logits(h, toks[1:], tb)
    cache = model.new_cache(4, 4)
    table = [[2, 0, 3]]
    parts = [model.mtp_logits(h[:5], toks[1:6], model.token_batch([0], [5], table, 4), cache)]
    parts += [model.mtp_logits(h[i:i + 1], toks[i + 1:i + 2],
                               model.token_batch([i], [1], table, 4), cache) for i in range(5, 8)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)
