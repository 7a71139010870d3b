"""ModelConfig: the fields of a DeepSeek-V3 `config.json`, validated, with presets.

`ModelConfig.from_json(path)` reads a checkpoint's config; `to_json_dict()` writes it back
(keys the model does not use are kept in `extra` so a release config round-trips).
Presets: `deepseek_v3` (the release), `tiny` (tests), `small` (benchmarks).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROPE_SCALING_KEYS = (
    "type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


def cache_root() -> Path:
    """$DS3DIST_CACHE, else ~/.cache/ds3dist: synthesized presets."""
    env = os.environ.get("DS3DIST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ds3dist"


class ConfigError(ValueError):
    """A config value is missing or inconsistent; the message names every field at fault."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict[str, Any] | None = field(
        default_factory=lambda: {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    )
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        return self.quantization_config is not None

    @property
    def block_size(self) -> tuple[int, int]:
        if self.quantization_config is None:
            return (128, 128)
        b = self.quantization_config["weight_block_size"]
        return (int(b[0]), int(b[1]))

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def mtp_layer_ids(self) -> list[int]:
        return [self.num_hidden_layers + k for k in range(self.num_nextn_predict_layers)]

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers >= first_k_dense_replace (the MTP layer included) are MoE layers."""
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    def softmax_scale(self) -> float:
        """192^-0.5 * mscale^2 for the release (mscale from YaRN's mscale_all_dim)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """ConfigError listing every problem (integers first: the other checks need them)."""
        problems = self._integer_problems()
        if not problems:
            problems = (self._shape_problems() + self._option_problems()
                        + _rope_scaling_problems(self.rope_scaling)
                        + _quantization_problems(self.quantization_config))
        if problems:
            raise ConfigError("invalid model config:\n  " + "\n  ".join(problems))

    def _integer_problems(self) -> list[str]:
        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads num_key_value_heads q_lora_rank kv_lora_rank qk_nope_head_dim "
            "qk_rope_head_dim v_head_dim n_routed_experts num_experts_per_tok n_group topk_group "
            "moe_layer_freq max_position_embeddings"
        ).split()
        problems = []
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name}: must be a positive integer, got {v!r}")
        for name in ("num_nextn_predict_layers", "n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{name}: must be a non-negative integer, got {v!r}")
        return problems

    def _shape_problems(self) -> list[str]:
        """Attention, expert-group and layer counts that do not fit together."""
        problems: list[str] = []

        def bad(name: str, why: str) -> None:
            problems.append(f"{name}: {why}")

        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA needs num_key_value_heads == num_attention_heads "
                f"({self.num_attention_heads}), got {self.num_key_value_heads}")
        if self.n_routed_experts % self.n_group:
            bad("n_routed_experts", f"{self.n_routed_experts} experts are not divisible into "
                f"n_group={self.n_group} groups")
        elif self.n_routed_experts // self.n_group < 2:
            bad("n_group", f"each group needs at least 2 experts (group score is a top-2 sum); "
                f"{self.n_routed_experts} experts in {self.n_group} groups")
        if self.topk_group > self.n_group:
            bad("topk_group", f"topk_group={self.topk_group} is larger than n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"top-k {self.num_experts_per_tok} is larger than "
                f"n_routed_experts={self.n_routed_experts}")
        elif (self.n_routed_experts % self.n_group == 0 and self.topk_group <= self.n_group
              and self.num_experts_per_tok > self.topk_group * self.experts_per_group):
            bad("num_experts_per_tok", f"top-k {self.num_experts_per_tok} exceeds the "
                f"{self.topk_group * self.experts_per_group} experts in the kept groups "
                f"(topk_group={self.topk_group} x {self.experts_per_group})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"{self.first_k_dense_replace} dense layers but only "
                f"num_hidden_layers={self.num_hidden_layers}")
        if self.moe_layer_freq != 1:
            bad("moe_layer_freq", f"only 1 is supported (every layer after the dense ones is "
                f"MoE), got {self.moe_layer_freq}")
        return problems

    def _option_problems(self) -> list[str]:
        """Functions, numbers and token ids the model supports."""
        problems: list[str] = []

        def bad(name: str, why: str) -> None:
            problems.append(f"{name}: {why}")

        if self.scoring_func != "sigmoid":
            bad("scoring_func", f"only 'sigmoid' is supported, got {self.scoring_func!r}")
        if self.topk_method != "noaux_tc":
            bad("topk_method", f"only 'noaux_tc' is supported, got {self.topk_method!r}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "DeepSeek-V3 does not tie embeddings; must be false")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            bad("rms_norm_eps", f"must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            bad("rope_theta", f"must be a number > 1, got {self.rope_theta!r}")
        if not (isinstance(self.routed_scaling_factor, (int, float))
                and self.routed_scaling_factor > 0):
            bad("routed_scaling_factor", f"must be positive, got {self.routed_scaling_factor!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                bad(name, f"must be a token id in [0, vocab_size={self.vocab_size}), got {v!r}")
        return problems

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: copy.deepcopy(v) for k, v in d.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in names}
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "n_routed_experts") if n not in known]
        if missing:
            raise ConfigError(f"{source}: missing required fields: {', '.join(missing)}")
        # Fields absent from the file take the release values, except quantization.
        known.setdefault("quantization_config", None)
        known.setdefault("rope_scaling", None)
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_json_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "torch_dtype": "bfloat16",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        d.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = copy.deepcopy(getattr(self, f.name))
            if v is None and f.name == "quantization_config":
                d.pop(f.name, None)
                continue
            d[f.name] = v
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float) -> float:
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _tiny() -> ModelConfig:
    # Dimensions chosen so FP8 tensors have ragged 128x128 edge blocks in both dims:
    # hidden 192 = 128+64, kv_a rows 176 = 128+48, moe inter 160 = 128+32, inter 448 = 3x128+64.
    # The vocabulary is the release's, so the release tokenizer works unchanged.
    return ModelConfig(
        hidden_size=192,
        intermediate_size=448,
        moe_intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=192,
        kv_lora_rank=160,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
    )


def _small() -> ModelConfig:
    return ModelConfig(
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=1,
    )


PRESETS = {"deepseek_v3": ModelConfig, "tiny": _tiny, "small": _small}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _rope_scaling_problems(rs: Any) -> list[str]:
    if rs is None:
        return []
    if not isinstance(rs, dict):
        return [f"rope_scaling: must be a mapping, got {type(rs).__name__}"]
    rs_type = rs.get("type", rs.get("rope_type"))
    missing = [k for k in ROPE_SCALING_KEYS[1:] if k not in rs]
    if rs_type is None:
        missing.insert(0, "type")
    if missing:
        return ["rope_scaling: missing keys: " + ", ".join(missing)]
    if rs_type != "yarn":
        return [f"rope_scaling.type: only 'yarn' is supported, got {rs_type!r}"]
    problems = [f"rope_scaling.{k}: must be a non-negative number, got {rs[k]!r}"
                for k in ROPE_SCALING_KEYS[1:] if not isinstance(rs[k], (int, float)) or rs[k] < 0]
    if isinstance(rs["factor"], (int, float)) and rs["factor"] < 1:
        problems.append(f"rope_scaling.factor: must be >= 1, got {rs['factor']!r}")
    return problems


def _quantization_problems(qc: Any) -> list[str]:
    if qc is None:
        return []
    if not isinstance(qc, dict):
        return [f"quantization_config: must be a mapping, got {type(qc).__name__}"]
    problems = []
    if qc.get("quant_method") != "fp8":
        problems.append(f"quantization_config.quant_method: only 'fp8' is supported, got "
                        f"{qc.get('quant_method')!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        problems.append(f"quantization_config.fmt: only 'e4m3' is supported, got {qc.get('fmt')!r}")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(f"quantization_config.activation_scheme: only 'dynamic' is supported, "
                        f"got {qc.get('activation_scheme')!r}")
    b = qc.get("weight_block_size")
    if (not isinstance(b, (list, tuple)) or len(b) != 2
            or not all(isinstance(x, int) and x > 0 for x in b)):
        problems.append(f"quantization_config.weight_block_size: must be two positive integers, "
                        f"got {b!r}")
    return problems

