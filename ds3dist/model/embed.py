"""Token embedding table ([vocab, hidden], compute dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab, dim, dtype=dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)
