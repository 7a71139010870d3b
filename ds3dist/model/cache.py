"""Latent KV cache and the per-step attention batch description.

`LatentCache` holds, per layer, one row per (sequence, position): the normalized
kv_lora_rank latent followed by the rotated rope key, [batch, max_len, r + p] in the compute
dtype. Sequences of different lengths share the batch: each token is written at its own
position, and attention lets a query at position q see rows 0..q (rows are written in order,
so rows <= q always hold that sequence's tokens). Padded tokens are never written.

`AttnBatch` is built once per forward step (by the model) and shared by all layers: which
tokens are real, the rotary tables, the additive mask and where the new rows go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


class LatentCache:
    """Per-layer latent rows for `batch` sequences of up to `max_len` positions.

    `lens` [batch] (int64, CPU) counts the rows written per sequence (next position).
    The runtime keeps one cache per micro-batch and passes it to forward_layers.
    """

    def __init__(self, layer_ids: Iterable[int], batch: int, max_len: int, width: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        self.layer_ids = list(layer_ids)
        self.batch, self.max_len, self.width = batch, max_len, width
        self.rows = {i: torch.zeros(batch, max_len, width, dtype=dtype, device=device)
                     for i in self.layer_ids}
        self.lens = torch.zeros(batch, dtype=torch.int64)

    def write(self, layer_id: int, kv_btc: torch.Tensor, ab: "AttnBatch") -> None:
        """Store the real tokens' rows at their positions."""
        if ab.write_b.numel():
            self.rows[layer_id][ab.write_b, ab.write_pos] = kv_btc[ab.write_b, ab.write_t]

    def read(self, layer_id: int, n: int) -> torch.Tensor:
        """Rows 0..n-1 of every sequence: [batch, n, width] (a view)."""
        return self.rows[layer_id][:, :n]

    def advance(self, ab: "AttnBatch") -> None:
        self.lens = torch.maximum(self.lens, ab.end_b.cpu())

    def select(self, rows_b: torch.Tensor | list[int]) -> None:
        """Keep only sequences `rows_b` (in that order), e.g. drop finished ones."""
        idx = torch.as_tensor(rows_b, dtype=torch.int64)
        for i, t in self.rows.items():
            self.rows[i] = t.index_select(0, idx.to(t.device))
        self.lens = self.lens.index_select(0, idx)
        self.batch = len(idx)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())


@dataclass
class AttnBatch:
    """One forward step over tokens [b, t] at `positions_bt`.

    valid_bt: real tokens (t < seq_lens_b); n_keys: key rows attended (cache rows, or the
    step's own tokens without cache); mask_bts: 0 / -inf, float32; cos/sin [b, t, p/2];
    write_b/write_t/write_pos: where real tokens go in the cache; end_b: 1 + last position.
    """

    positions_bt: torch.Tensor
    valid_bt: torch.Tensor
    n_keys: int
    mask_bts: torch.Tensor
    cos_btf: torch.Tensor
    sin_btf: torch.Tensor
    write_b: torch.Tensor
    write_t: torch.Tensor
    write_pos: torch.Tensor
    end_b: torch.Tensor
    cached: bool

    @classmethod
    def build(cls, positions_bt: torch.Tensor, seq_lens_b: torch.Tensor | None, rope,
              cache: LatentCache | None) -> "AttnBatch":
        b, t = positions_bt.shape
        dev = positions_bt.device
        positions_bt = positions_bt.to(torch.int64)
        if seq_lens_b is None:
            valid_bt = torch.ones(b, t, dtype=torch.bool, device=dev)
        else:
            seq_lens_b = torch.as_tensor(seq_lens_b, dtype=torch.int64, device=dev)
            valid_bt = torch.arange(t, device=dev) < seq_lens_b[:, None]
        end_b = torch.where(valid_bt, positions_bt + 1, 0).amax(1) if t else \
            torch.zeros(b, dtype=torch.int64, device=dev)
        if cache is None:  # keys are this step's tokens
            n_keys, kpos_bs, kvalid_bs = t, positions_bt, valid_bt
        else:  # keys are cache rows 0..n_keys-1
            if cache.batch != b:
                raise ValueError(f"cache holds {cache.batch} sequences, step has {b}")
            n_keys = int(end_b.max()) if b else 0
            if n_keys > cache.max_len:
                raise ValueError(f"position {n_keys - 1} is past the cache's max_len {cache.max_len}")
            kpos_bs = torch.arange(n_keys, device=dev).expand(b, n_keys)
            kvalid_bs = torch.ones(b, n_keys, dtype=torch.bool, device=dev)
        allowed = (kpos_bs[:, None, :] <= positions_bt[:, :, None]) & kvalid_bs[:, None, :]
        allowed |= ~valid_bt[:, :, None]  # padded queries: anything (no all -inf rows)
        mask = torch.zeros(b, t, n_keys, dtype=torch.float32, device=dev)
        mask.masked_fill_(~allowed, float("-inf"))
        cos, sin = rope.tables(positions_bt)
        wb, wt = valid_bt.nonzero(as_tuple=True)
        return cls(positions_bt, valid_bt, n_keys, mask, cos, sin, wb, wt,
                   positions_bt[wb, wt], end_b, cache is not None)
