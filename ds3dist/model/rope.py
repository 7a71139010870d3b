"""YaRN rotary embedding on interleaved pairs (dims 2k, 2k+1 form one complex number).

YaRN is always applied when the config has rope_scaling (as HF transformers does): with
dim = qk_rope_head_dim, inv_freq_k = base^(-2k/dim); low = floor(d(beta_fast)),
high = ceil(d(beta_slow)), d(r) = dim * ln(orig / (r * 2 pi)) / (2 ln base), clamped to
[0, dim-1]; ramp = clamp((k - low) / (high - low), 0, 1);
inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp).
cos/sin are scaled by yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim).
"""

from __future__ import annotations

import math

import torch

from ds3dist.config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] float32, cos/sin scale)."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freq = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freq
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])

    def d(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(d(float(rs["beta_fast"]))), 0)
    high = min(math.ceil(d(float(rs["beta_slow"]))), dim - 1)
    span = (high - low) if high != low else 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / span).clamp(0, 1)
    inv_freq = 1.0 / (factor * pos_freq) * ramp + inv_freq * (1 - ramp)
    scale = yarn_mscale(factor, float(rs["mscale"])) / yarn_mscale(factor, float(rs["mscale_all_dim"]))
    return inv_freq, scale


class Rope:
    """Rotation tables for positions; shared by every layer (no weights)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq, self.scale = yarn_inv_freq(cfg)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] int -> cos, sin [..., dim/2] float32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        cos, sin = freqs.cos(), freqs.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., dim] (float32 math); cos/sin broadcast to [..., dim/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
