"""FP8 execution (FP8 weights, per-token activation quantization) against bf16 execution."""

from __future__ import annotations

import torch

from padding import right_pad
from ds3dist.model.load import load_model


def test_fp8_logits_close_to_bf16(tiny_fp8_dir):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 129280, (n,), generator=g).tolist() for n in (6, 12, 9)]
    toks, lens = right_pad(prompts)
    out = {}
    for ex in ("bf16", "fp8"):
        m = load_model(tiny_fp8_dir, execution=ex)
        out[ex] = m(toks, lens)
    valid = torch.arange(toks.shape[1]) < lens[:, None]
    a, b = out["fp8"][valid].flatten(), out["bf16"][valid].flatten()
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()
    print(f"FP8 vs bf16 execution logits: cosine {cos:.5f}, max |diff| {(a - b).abs().max():.3g}")
    assert cos >= 0.99
    per_pos = torch.nn.functional.cosine_similarity(out["fp8"][valid], out["bf16"][valid], dim=-1)
    assert per_pos.min() >= 0.95  # a routing flip at one position may cost a little more
