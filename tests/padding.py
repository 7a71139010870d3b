"""right_pad: token lists as one padded batch, for whole-batch model calls in tests."""

from __future__ import annotations

import torch


def right_pad(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, max_len] right-padded with `pad`, lengths [b]."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    toks = torch.full((len(seqs), int(lens.max()) if seqs else 0), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return toks, lens
