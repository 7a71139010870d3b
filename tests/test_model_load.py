"""load_model: reads exactly the tensors of the held parts; partial models compose."""

from __future__ import annotations

import pytest
import torch

from ds3dist.checkpoint.fp8 import FP8_DTYPE
from ds3dist.checkpoint.layout import expected_tensors, expert_of, layer_of
from ds3dist.config import ModelConfig
from ds3dist.model.load import load_model
from ds3dist.model.options import default_dtype



def _expected_bytes(cfg: ModelConfig, layers: set[int], experts: set[int], embed: bool, head: bool) -> int:
    total = 0
    for name, spec in expected_tensors(cfg).items():
        layer = layer_of(name)
        if layer is None:
            keep = (name == "model.embed_tokens.weight" and embed) or (
                name in ("model.norm.weight", "lm_head.weight") and head)
        else:
            e = expert_of(name)
            keep = layer in layers and (e is None or e in experts)
        total += spec.nbytes if keep else 0
    return total


@pytest.mark.parametrize("execution", ["bf16", "fp8"])
def test_layers_0_1_experts_0_3_read_only_their_tensors(tiny_fp8_dir, execution):
    cfg = ModelConfig.from_json(tiny_fp8_dir)
    m = load_model(tiny_fp8_dir, execution=execution, layers=[0, 1], experts=range(4))
    want = _expected_bytes(cfg, {0, 1}, {0, 1, 2, 3}, embed=True, head=False)
    assert m.load_stats["bytes_read"] == want
    assert m.load_stats["seconds"] > 0
    assert m.layer_ids == [0, 1] and m.lm_head is None and m.mtp is None
    assert m.embed_tokens is not None
    assert sorted(m.layers["1"].mlp.experts.keys(), key=int) == ["0", "1", "2", "3"]
    assert not any(t.is_meta for t in m.state_dict().values())


def test_last_stage_holds_head_and_mtp(tiny_fp8_dir):
    cfg = ModelConfig.from_json(tiny_fp8_dir)
    m = load_model(tiny_fp8_dir, layers=[2])
    assert m.embed_tokens is None and m.lm_head is not None and m.mtp_layer_ids == cfg.mtp_layer_ids
    no_mtp = load_model(tiny_fp8_dir, layers=[2], mtp=False)
    assert no_mtp.mtp is None
    want = _expected_bytes(cfg, {2}, set(range(16)), embed=False, head=True)
    assert no_mtp.load_stats["bytes_read"] == want


def test_fp8_execution_keeps_fp8_weights(tiny_fp8_dir):
    m = load_model(tiny_fp8_dir, execution="fp8", layers=[0])
    lin = m.layers["0"].self_attn.q_a_proj
    assert lin.weight.dtype == FP8_DTYPE and lin.weight_scale_inv.dtype == torch.float32
    assert m.embed_tokens.weight.dtype == default_dtype()  # bf16, or float32 on CPUs without it
    b = load_model(tiny_fp8_dir, execution="bf16", layers=[0])
    assert b.layers["0"].self_attn.q_a_proj.weight.dtype == default_dtype()
    c = load_model(tiny_fp8_dir, execution="bf16", dtype=torch.bfloat16, layers=[0])
    assert c.layers["0"].self_attn.q_a_proj.weight.dtype == torch.bfloat16


def test_fp8_execution_on_bf16_checkpoint_is_refused(tiny_bf16_dir):
    with pytest.raises(ValueError, match="bf16 checkpoint"):
        load_model(tiny_bf16_dir, execution="fp8")


def test_bf16_checkpoint_equals_dequantized_fp8(tiny_fp8_dir, tiny_bf16_dir):
    """The converter's bf16 weights and our dequantization at load agree (bf16 rounding)."""
    a = load_model(tiny_fp8_dir, dtype=torch.float32, layers=[0], mtp=False)
    b = load_model(tiny_bf16_dir, dtype=torch.float32, layers=[0], mtp=False)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va.to(torch.bfloat16).float(), vb, rtol=0, atol=0, msg=k)


def test_stages_compose_to_the_full_model(tiny_bf16_dir):
    full = load_model(tiny_bf16_dir, dtype=torch.float32)
    first = load_model(tiny_bf16_dir, dtype=torch.float32, layers=[0, 1])
    last = load_model(tiny_bf16_dir, dtype=torch.float32, layers=[2])
    toks = torch.randint(0, 129280, (2, 7))
    lens = [7, 4]
    flat = torch.cat([toks[0], toks[1, :4]])
    want = full(toks, torch.tensor(lens))
    want = torch.cat([want[0], want[1, :4]])
    tb = first.token_batch([0, 0], lens)
    got = last.logits(last.forward_layers(first.forward_layers(first.embed(flat), tb), tb))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and with per-stage caches
    ca, cb = first.new_cache(4, 4), last.new_cache(4, 4)
    assert set(ca.pools) == {0, 1} and set(cb.pools) == {2, 3}
    tb = first.token_batch([0, 0], lens, [[0, 1], [3]], 4)
    got = last.logits(last.forward_layers(first.forward_layers(first.embed(flat), tb, ca), tb, cb))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments(tiny_bf16_dir):
    with pytest.raises(ValueError, match="outside"):
        load_model(tiny_bf16_dir, layers=[5])
    with pytest.raises(ValueError, match="expert ids"):
        load_model(tiny_bf16_dir, experts=[99])
    with pytest.raises(ValueError, match="execution"):
        load_model(tiny_bf16_dir, execution="int4")


def test_default_dtype_follows_the_cpu(monkeypatch):
    """bf16 on GPUs, on CPUs with bf16 instructions, and on others where the CPU kernels run
    (they widen bf16 in registers); float32 on those only without the kernels."""
    from ds3dist.model import cpu_kernel, options

    monkeypatch.setattr(options, "native_bf16", lambda: True)
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(options, "native_bf16", lambda: False)
    monkeypatch.setattr(cpu_kernel, "usable", lambda: True)
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(cpu_kernel, "usable", lambda: False)
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16
