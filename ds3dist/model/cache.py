"""Paged latent cache and the flat token batch of one forward step.

`PagedCache`: per held layer a pool of `num_pages` pages of `page_size` rows, allocated once.
A row is one token's normalized latent followed by its rotated rope key (kv_lora_rank +
qk_rope_head_dim wide, compute dtype). A sequence's page table lists its pages in order:
position p is row p % page_size of page table[p // page_size]. Only real tokens occupy rows;
which pages a sequence owns is decided outside the model (ds3dist.core.scheduler).

`TokenBatch`: one step over T tokens of B sequences, flattened with no padding. Sequence i
feeds lens[i] new tokens at positions starts[i] .. starts[i] + lens[i] - 1 (contiguous in the
batch) and attends to keys 0 .. starts[i] + lens[i] - 1: its cache rows, or without a cache its
own new tokens (then starts are 0). Causality comes from positions (a query at position q
sees keys 0..q); there is no [b, t, s] mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Iterable, Sequence

import torch


class PagedCache:
    def __init__(self, layer_ids: Iterable[int], num_pages: int, page_size: int, width: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 scratch: bool = False):
        """scratch: one more page, `scratch_page`, which no sequence owns: the padding rows of
        a CUDA-graph step write and read there."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, "
                             f"{page_size}")
        self.layer_ids = list(layer_ids)
        self.num_pages, self.page_size, self.width = num_pages, page_size, width
        self.scratch_page = num_pages if scratch else None
        # empty, not zeros: a row is always written before it is read, and untouched pages
        # cost no resident memory on CPU
        self.pools = {i: torch.empty(num_pages + scratch, page_size, width, dtype=dtype,
                                     device=device) for i in self.layer_ids}

    @staticmethod
    def pages_for_bytes(nbytes: float, num_layers: int, page_size: int, width: int,
                        dtype: torch.dtype) -> int:
        """How many pages fit in nbytes (every layer's pool counted)."""
        per_page = num_layers * page_size * width * torch.empty(0, dtype=dtype).element_size()
        return int(nbytes // per_page)

    def write(self, layer_id: int, kv_tc: torch.Tensor, tb: "TokenBatch") -> None:
        """Store the step's rows at their slots."""
        if kv_tc.shape[0]:
            self.pools[layer_id].view(-1, self.width).index_copy_(0, tb.slots_t, kv_tc)

    def keys(self, layer_id: int, tb: "TokenBatch", i: int) -> torch.Tensor:
        """Rows 0 .. kv_len - 1 of sequence i: [s, width]."""
        rows = self.pools[layer_id].index_select(0, tb.pages[i]).view(-1, self.width)
        return rows[: tb.kv_lens[i]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pools.values())


@dataclass
class TokenBatch:
    positions_t: torch.Tensor  # [T] int64
    starts: list[int]  # per sequence: position of its first new token (= rows cached before)
    lens: list[int]  # per sequence: new tokens this step
    cos_tf: torch.Tensor  # [T, rope/2] float32
    sin_tf: torch.Tensor
    slots_t: torch.Tensor | None = None  # [T] cache row of each new token (with a cache)
    pages: list[torch.Tensor] | None = None  # per sequence: page ids holding keys 0..kv_len-1
    # every row's (key count, first page in page_ids, page_ids) for the Triton decode kernel,
    # set by the CUDA-graph runner (its static buffers); None: made from the lists
    kernel_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _flat_pages: tuple[torch.Tensor, list[int]] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.positions_t.shape[0])

    @property
    def kv_lens(self) -> list[int]:
        return [s + n for s, n in zip(self.starts, self.lens)]

    @property
    def offsets(self) -> list[int]:
        """Where each sequence's tokens begin in the flat batch (B + 1 entries)."""
        return [0, *accumulate(self.lens)]

    @property
    def last_rows(self) -> list[int]:
        """Flat index of each sequence's last new token (sequences with lens 0 excluded)."""
        return [o + n - 1 for o, n in zip(self.offsets, self.lens) if n]

    def flat_pages(self) -> tuple[torch.Tensor, list[int]]:
        """Every sequence's page ids in one tensor and where each sequence's begin (made once
        a step, for the decode attention kernel)."""
        if self._flat_pages is None:
            self._flat_pages = (torch.cat(self.pages),
                                [0, *accumulate(len(p) for p in self.pages)][:-1])
        return self._flat_pages

    @classmethod
    def build(cls, starts: Sequence[int], lens: Sequence[int], rope,
              device: torch.device | str = "cpu",
              page_tables: Sequence[Sequence[int]] | None = None,
              page_size: int | None = None) -> "TokenBatch":
        """page_tables (with page_size): the pages of each sequence, covering at least its
        kv_len rows; None: no cache (starts must be 0)."""
        starts, lens = [int(s) for s in starts], [int(n) for n in lens]
        pos = [p for s, n in zip(starts, lens) for p in range(s, s + n)]
        positions_t = torch.tensor(pos, dtype=torch.int64, device=device)
        cos, sin = rope.tables(positions_t)
        tb = cls(positions_t, starts, lens, cos, sin)
        if page_tables is None:
            if any(starts):
                raise ValueError("a step without a cache must start every sequence at 0")
            return tb
        if len(page_tables) != len(starts):
            raise ValueError(f"{len(page_tables)} page tables for {len(starts)} sequences")
        need = [-(-kv // page_size) for kv in tb.kv_lens]
        short = [i for i, (t, k) in enumerate(zip(page_tables, need)) if len(t) < k]
        if short:
            i = short[0]
            raise ValueError(f"sequence {i} needs {need[i]} pages for {tb.kv_lens[i]} rows, "
                             f"its table has {len(page_tables[i])}")
        tb.pages = [torch.tensor(list(t[:k]), dtype=torch.int64, device=device)
                    for t, k in zip(page_tables, need)]
        table_t = [t[p // page_size] for t, s, n in zip(page_tables, starts, lens)
                   for p in range(s, s + n)]
        tb.slots_t = (torch.tensor(table_t, dtype=torch.int64, device=device) * page_size
                      + positions_t % page_size)
        return tb
