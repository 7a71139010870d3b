"""The head speculative drafts read: the MTP layer's final norm, then the main head.

`exact`: the head as the model computes it. `int8`: an int8 copy of the head (one scale per
vocabulary row, made once at start) through cpu_kernel.int8_logits, a quarter of the bf16
head's bytes; a draft only needs to be likely (verification reads the exact head, so outputs
do not change), and with sampling the draft distribution is the one its tokens were drawn
from, as rejection sampling requires. `auto`: int8 where that kernel runs (CPU ranks with the
kernels built: VNNI, AVX2, NEON sdot or plain C++, all exact integer sums), else exact. The copy costs vocab x hidden bytes on the last stage.
"""

from __future__ import annotations

import torch

from ds3dist.model import cpu_kernel

_ROWS = 16384  # head rows quantized at a time (bounds the float32 copy)


class DraftHead:
    def __init__(self, model, kind: str = "auto"):
        self.model = model
        cpu = model.device.type == "cpu"
        usable = cpu and cpu_kernel.has_int8_logits() and model.cfg.hidden_size % 64 == 0
        if kind == "int8" and not usable:
            raise ValueError("sampling.speculative.draft_head=int8 needs a CPU rank with the CPU "
                             "kernels and a hidden size that is a multiple of 64; use exact")
        self.int8 = _quantize(model.lm_head.weight) if usable and kind != "exact" else None

    @torch.no_grad()
    def __call__(self, h_nd: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of the MTP block's outputs."""
        if self.int8 is None:
            return self.model.mtp_head(h_nd)
        return cpu_kernel.int8_logits(self.model.mtp_norm(h_nd), *self.int8)


def _quantize(w_vd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale per row, int32 sum per row), symmetric per row."""
    q = torch.empty(w_vd.shape, dtype=torch.int8)
    scale = torch.empty(w_vd.shape[0], dtype=torch.float32)
    for r0 in range(0, w_vd.shape[0], _ROWS):
        rows = w_vd[r0:r0 + _ROWS].float()
        s = rows.abs().amax(1).clamp_min(1e-30) / 127
        q[r0:r0 + _ROWS] = torch.round(rows / s[:, None]).to(torch.int8)
        scale[r0:r0 + _ROWS] = s
    return q, scale, q.sum(1, dtype=torch.int32)
