"""The expected-tensor table: every tensor a checkpoint for a ModelConfig must hold.

Names, shapes ([out, in] for linears) and dtypes follow the release exactly. A weight is FP8
exactly when its sibling `<name>_scale_inv` (float32, [ceil(out/128), ceil(in/128)]) exists;
a bf16 checkpoint (no `quantization_config`) has the same names without the scales.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ds3dist.config import ModelConfig

# safetensors dtype names <-> torch dtypes
ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}

SCALE_SUFFIX = "_scale_inv"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: F8_E4M3, BF16, F32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]

    @property
    def is_scale(self) -> bool:
        return self.name.endswith(SCALE_SUFFIX)


def layer_of(name: str) -> int | None:
    """Layer index of `model.layers.<i>.…`, else None (embedding, final norm, head)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def expert_of(name: str) -> int | None:
    """Routed expert index of `….mlp.experts.<j>.…`, else None."""
    m = _EXPERT_RE.search(name)
    return int(m.group(1)) if m else None


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


class _Table:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.specs: dict[str, TensorSpec] = {}

    def plain(self, name: str, shape: tuple[int, ...], dtype: str = "BF16") -> None:
        self.specs[name] = TensorSpec(name, tuple(shape), dtype)

    def linear(self, prefix: str, out_f: int, in_f: int) -> None:
        """A linear weight that the release stores in FP8 with a block scale."""
        if self.cfg.is_fp8:
            self.plain(f"{prefix}.weight", (out_f, in_f), "F8_E4M3")
            self.plain(f"{prefix}.weight{SCALE_SUFFIX}", scale_shape((out_f, in_f), self.cfg.block_size), "F32")
        else:
            self.plain(f"{prefix}.weight", (out_f, in_f), "BF16")

    def mlp(self, prefix: str, inter: int) -> None:
        h = self.cfg.hidden_size
        self.linear(f"{prefix}.gate_proj", inter, h)
        self.linear(f"{prefix}.up_proj", inter, h)
        self.linear(f"{prefix}.down_proj", h, inter)

    def decoder_layer(self, i: int) -> None:
        c = self.cfg
        p = f"model.layers.{i}"
        h = c.hidden_size
        self.plain(f"{p}.input_layernorm.weight", (h,))
        a = f"{p}.self_attn"
        self.linear(f"{a}.q_a_proj", c.q_lora_rank, h)
        self.plain(f"{a}.q_a_layernorm.weight", (c.q_lora_rank,))
        self.linear(f"{a}.q_b_proj", c.num_attention_heads * c.qk_head_dim, c.q_lora_rank)
        self.linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h)
        self.plain(f"{a}.kv_a_layernorm.weight", (c.kv_lora_rank,))
        self.linear(f"{a}.kv_b_proj", c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        self.linear(f"{a}.o_proj", h, c.num_attention_heads * c.v_head_dim)
        self.plain(f"{p}.post_attention_layernorm.weight", (h,))
        if c.is_moe_layer(i):
            self.plain(f"{p}.mlp.gate.weight", (c.n_routed_experts, h))
            self.plain(f"{p}.mlp.gate.e_score_correction_bias", (c.n_routed_experts,), "F32")
            for j in range(c.n_routed_experts):
                self.mlp(f"{p}.mlp.experts.{j}", c.moe_intermediate_size)
            if c.n_shared_experts:
                self.mlp(f"{p}.mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts)
        else:
            self.mlp(f"{p}.mlp", c.intermediate_size)

    def mtp_layer(self, i: int) -> None:
        c = self.cfg
        p = f"model.layers.{i}"
        h = c.hidden_size
        self.plain(f"{p}.embed_tokens.weight", (c.vocab_size, h))
        self.plain(f"{p}.enorm.weight", (h,))
        self.plain(f"{p}.hnorm.weight", (h,))
        self.plain(f"{p}.eh_proj.weight", (h, 2 * h))
        self.decoder_layer(i)
        self.plain(f"{p}.shared_head.norm.weight", (h,))
        self.plain(f"{p}.shared_head.head.weight", (c.vocab_size, h))


def expected_tensors(cfg: ModelConfig, mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint for `cfg`, in the release's order (layer by layer)."""
    t = _Table(cfg)
    t.plain("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    for i in range(cfg.num_hidden_layers):
        t.decoder_layer(i)
    t.plain("model.norm.weight", (cfg.hidden_size,))
    t.plain("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    if mtp:
        for i in cfg.mtp_layer_ids:
            t.mtp_layer(i)
    return t.specs


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter totals (weights only, scales excluded).

    main: embedding, layers 0..L-1, final norm, head. mtp_unique: the MTP layers without the
    embedding and head they store again. active_per_token: main with only top-k routed experts.
    """
    counts = {"main": 0, "mtp": 0, "mtp_unique": 0, "routed_experts": 0, "embedding": 0, "head": 0}
    mtp_ids = set(cfg.mtp_layer_ids)
    for s in expected_tensors(cfg).values():
        if s.is_scale:
            continue
        layer = layer_of(s.name)
        if layer in mtp_ids:
            counts["mtp"] += s.numel
            if not s.name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                counts["mtp_unique"] += s.numel
            continue
        counts["main"] += s.numel
        if expert_of(s.name) is not None:
            counts["routed_experts"] += s.numel
        elif s.name == "model.embed_tokens.weight":
            counts["embedding"] += s.numel
        elif s.name == "lm_head.weight":
            counts["head"] += s.numel
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    inactive = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    counts["active_per_token"] = counts["main"] - inactive
    return counts
