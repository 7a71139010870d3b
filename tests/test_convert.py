"""fp8 <-> bf16 conversion: valid output, exact dequantized values, HF transformers loads it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ds3dist.checkpoint import convert as convert_mod
from ds3dist.checkpoint.convert import convert
from ds3dist.checkpoint.fp8 import weight_dequant, weight_quant
from ds3dist.checkpoint.layout import expected_tensors, layer_of
from ds3dist.checkpoint.reader import CheckpointError, CheckpointReader, read_header
from ds3dist.checkpoint.validation import validate
from ds3dist.config import ModelConfig, preset

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def test_bf16_checkpoint_is_valid(tiny_fp8_dir, tiny_bf16_dir):
    assert validate(tiny_bf16_dir) == []
    cfg = json.loads((tiny_bf16_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    src_cfg = json.loads((tiny_fp8_dir / "config.json").read_text())
    del src_cfg["quantization_config"]
    assert cfg == src_cfg
    assert ModelConfig.from_json(tiny_bf16_dir) == preset("tiny").replace(quantization_config=None)
    for f in SIDE_FILES:
        assert (tiny_bf16_dir / f).read_bytes() == (tiny_fp8_dir / f).read_bytes()
    index = json.loads((tiny_bf16_dir / "model.safetensors.index.json").read_text())
    assert not any(n.endswith("_scale_inv") for n in index["weight_map"])
    bf16_table = expected_tensors(preset("tiny").replace(quantization_config=None))
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in bf16_table.values())
    # same shard names; every tensor stays in its shard
    src_map = json.loads((tiny_fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(src_map[n] == s for n, s in index["weight_map"].items())
    assert not list(tiny_bf16_dir.parent.glob(".tiny-bf16.tmp-*"))  # temp dir renamed away


def test_bf16_values_are_weight_dequant(tiny_fp8_dir, tiny_bf16_dir):
    with CheckpointReader(tiny_fp8_dir) as src, CheckpointReader(tiny_bf16_dir) as dst:
        n_fp8 = 0
        for name in dst.names():
            got = dst.get(name)
            orig = src.get(name)
            if orig.dtype == torch.float8_e4m3fn:
                n_fp8 += 1
                want = weight_dequant(orig, src.get(name + "_scale_inv"), dtype=torch.bfloat16)
                assert got.dtype == torch.bfloat16
            else:
                want = orig
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert n_fp8 == sum(n.endswith("_scale_inv") for n in src.names()) > 100


def test_fp8_round_trip(tiny_bf16_dir, tmp_path):
    out = convert(tiny_bf16_dir, tmp_path / "fp8", to="fp8", progress=False)
    assert validate(out) == []
    assert ModelConfig.from_json(out) == preset("tiny")
    with CheckpointReader(tiny_bf16_dir) as bf, CheckpointReader(out) as q:
        assert set(q.names()) == set(expected_tensors(preset("tiny")))
        for name in bf.names():
            w = bf.get(name)
            if not q.has(name + "_scale_inv"):
                assert torch.equal(q.get(name), w)
                continue
            wq, s = q.get(name), q.get(name + "_scale_inv")
            assert wq.dtype == torch.float8_e4m3fn
            want_q, want_s = weight_quant(w)
            assert torch.equal(s, want_s)
            assert torch.equal(wq.view(torch.uint8), want_q.view(torch.uint8))
            # within e4m3 rounding: 2^-4 relative, 2^-10 x scale for subnormals
            se = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
            err = (weight_dequant(wq, s) - w.float()).abs()
            assert (err <= (2**-4 * w.float().abs() + 2**-10 * se) * (1 + 1e-6)).all(), name


def test_refuses_non_empty_dst_unless_forced(tiny_fp8_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tiny_fp8_dir, dst, to="bf16", progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # the CLI says so and exits 1
    cp = subprocess.run([sys.executable, "-m", "ds3dist.checkpoint.convert", "--to", "bf16",
                         str(tiny_fp8_dir), str(dst)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 1 and "not empty" in cp.stderr
    # forced: replaced by a valid checkpoint
    cp = subprocess.run([sys.executable, "-m", "ds3dist.checkpoint.convert", "--to", "bf16",
                         "--force", "--no-progress", str(tiny_fp8_dir), str(dst)],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert not (dst / "keep.txt").exists() and validate(dst) == []


def test_invalid_source_lists_problems_and_writes_nothing(tiny_fp8_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in tiny_fp8_dir.iterdir():
        if p.name != "model-00002-of-00004.safetensors":
            (src / p.name).symlink_to(p)
    with pytest.raises(CheckpointError) as ei:
        convert(src, tmp_path / "dst", to="bf16", progress=False)
    assert "missing_shard" in str(ei.value) and "model-00002-of-00004.safetensors" in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failure_midway_leaves_nothing(tiny_fp8_dir, tmp_path, monkeypatch):
    real = convert_mod.write_shard
    calls = []

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(path, *a, **k)

    monkeypatch.setattr(convert_mod, "write_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        convert(tiny_fp8_dir, tmp_path / "dst", to="bf16", progress=False)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_refuses_same_format(tiny_fp8_dir, tiny_bf16_dir, tmp_path):
    with pytest.raises(CheckpointError, match="already bf16"):
        convert(tiny_bf16_dir, tmp_path / "a", to="bf16", progress=False)
    with pytest.raises(CheckpointError, match="already fp8"):
        convert(tiny_fp8_dir, tmp_path / "b", to="fp8", progress=False)
    with pytest.raises(ValueError, match="'bf16' or 'fp8'"):
        convert(tiny_fp8_dir, tmp_path / "c", to="int4")
    assert list(tmp_path.iterdir()) == []


def test_output_shards_stream_in_source_order(tiny_fp8_dir, tiny_bf16_dir):
    for shard in sorted(p.name for p in tiny_fp8_dir.glob("*.safetensors")):
        src = read_header(tiny_fp8_dir / shard).entries
        dst = read_header(tiny_bf16_dir / shard).entries
        order = lambda e: [n for n in sorted(e, key=lambda n: e[n].start)]  # noqa: E731
        assert order(dst) == [n for n in order(src) if not n.endswith("_scale_inv")]


# ---- HF transformers loads the bf16 copy (never the FP8 one: ragged block-size trap) --------
@pytest.fixture(scope="module")
def hf_model(tiny_bf16_dir):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(tiny_bf16_dir), output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


def test_hf_loads_bf16_without_missing_keys(hf_model):
    model, info = hf_model
    cfg = preset("tiny")
    mtp = set(cfg.mtp_layer_ids)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert not info.get("error_msgs")
    # HF builds no MTP module: the MTP layer's keys (layer num_hidden_layers) are the only
    # unexpected ones (HF ignores them silently only for the release's layer 61)
    unexpected = set(info["unexpected_keys"])
    assert unexpected and all(layer_of(k) in mtp for k in unexpected)
    assert "model.layers.3.eh_proj.weight" in unexpected
    assert len(model.model.layers) == cfg.num_hidden_layers


def test_hf_weights_equal_ours(hf_model, tiny_bf16_dir):
    model, _ = hf_model
    with CheckpointReader(tiny_bf16_dir) as r:
        assert torch.equal(model.model.embed_tokens.weight, r.get("model.embed_tokens.weight").float())
        assert torch.equal(model.lm_head.weight, r.get("lm_head.weight").float())
        kv_a = model.model.layers[1].self_attn.kv_a_proj_with_mqa.weight
        assert torch.equal(kv_a, r.get("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").float())
        # HF packs per-expert weights on load: gate_up_proj[j] = cat(gate_j, up_j), down_proj[j]
        experts = model.model.layers[2].mlp.experts
        for j in (0, 7, 15):
            p = f"model.layers.2.mlp.experts.{j}."
            gate, up, down = (r.get(p + f"{k}_proj.weight").float() for k in ("gate", "up", "down"))
            assert torch.equal(experts.gate_up_proj[j], torch.cat([gate, up], 0))
            assert torch.equal(experts.down_proj[j], down)
        bias = model.model.layers[2].mlp.gate.e_score_correction_bias
        assert torch.equal(bias, r.get("model.layers.2.mlp.gate.e_score_correction_bias"))


def test_synthetic_weights_keep_activations_sane(hf_model, tiny_bf16_dir):
    from ds3dist.tokenizer import load_tokenizer

    model, _ = hf_model
    tok = load_tokenizer(tiny_bf16_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}])
    x = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        for h in out.hidden_states:  # embedding output, then every layer's residual stream
            rms = h.pow(2).mean().sqrt().item()
            assert torch.isfinite(h).all() and 0.3 < rms < 5, rms
        assert 0.3 < out.logits.std().item() < 5
        gen = model.generate(x, max_new_tokens=24, do_sample=False)[0, x.shape[1]:].tolist()
    assert len(set(gen)) >= 12, gen  # greedy decoding varies
