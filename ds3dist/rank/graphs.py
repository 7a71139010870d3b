"""Decode steps as CUDA graphs, one per batch-size bucket.

A decode step (every sequence feeds one token) runs its held layers on static buffers padded
to the next bucket: hidden states, rope tables, cache slots and the decode kernel's rows
(key count, first page, page ids). Padding rows write and read only the cache's scratch page
(PagedCache(scratch=True)), their outputs are cut off and the experts' counts leave them out,
so they reach neither results, nor the cache, nor the statistics. A bucket's first step runs
eagerly on the buffers (building every Triton kernel and the experts' grouped weights), then
is captured; later steps copy their inputs in and replay. Prefill, mixed and verify steps run
eagerly, outside this.

Graphs need every kernel of the step on the device with no host read: the Triton kernels
(ds3dist.kernels) and a local MoE dispatcher (an all-to-all reads counts on the host), and no
weight offload. `capture=False` runs the same padded buffers eagerly instead of replaying: so
tests check the padding and the buffers on a CPU (the Triton kernels forced, interpreted).
"""

from __future__ import annotations

import torch

from ds3dist import kernels
from ds3dist.model.cache import PagedCache, TokenBatch
from ds3dist.model.dispatch import LocalDispatcher

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def graphable(model) -> str | None:
    """Why decode steps of this model part cannot be graphs, or None when they can."""
    probe = next(iter(model.buffers()))
    if not kernels.use_triton(probe):
        return "the Triton kernels do not run on this device"
    moes = model.moe_layers().values()
    if any(not isinstance(m.dispatcher, LocalDispatcher) for m in moes):
        return "an expert-parallel dispatcher reads token counts on the host"
    return None


class DecodeGraphs:
    def __init__(self, model, cache: PagedCache, capture: bool):
        if cache.scratch_page is None:
            raise ValueError("decode graphs need a cache with a scratch page")
        self.model, self.cache, self.capture = model, cache, capture
        dev, cfg, most = model.device, model.cfg, BUCKETS[-1]
        self.h_bd = torch.zeros(most, cfg.hidden_size, dtype=model.dtype, device=dev)
        self.pos_b = torch.zeros(most, dtype=torch.int64, device=dev)
        cos, sin = model.rope.tables(self.pos_b)
        self.cos_bf, self.sin_bf = torch.zeros_like(cos), torch.zeros_like(sin)
        self.slots_b = torch.zeros(most, dtype=torch.int64, device=dev)
        self.kv_len_b = torch.ones(most, dtype=torch.int32, device=dev)
        self.start_b = torch.zeros(most, dtype=torch.int32, device=dev)
        # every page a step's sequences own (each page has one owner) plus one per padding row
        self.page_ids = torch.zeros(cache.num_pages + most, dtype=torch.int32, device=dev)
        self.n_valid = torch.zeros(1, dtype=torch.int64, device=dev)  # the step's real rows
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0

    @staticmethod
    def fits(tb: TokenBatch) -> bool:
        return (tb.pages is not None and 0 < len(tb.lens) <= BUCKETS[-1]
                and all(n == 1 for n in tb.lens))

    def run(self, h_td: torch.Tensor, tb: TokenBatch) -> torch.Tensor:
        """The held layers over a decode step (fits(tb)): [n, D], as forward_layers gives."""
        n = len(tb.lens)
        b = next(x for x in BUCKETS if x >= n)
        self._fill(h_td, tb, n, b)
        if not self.capture:
            return self._forward(b)[:n].clone()
        if b not in self.graphs:
            out = self._forward(b)  # the real step, eagerly: kernels built, weights stacked
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                static_out = self._forward(b)
            self.graphs[b] = (g, static_out)
            return out[:n].clone()
        g, static_out = self.graphs[b]
        g.replay()
        self.replays += 1
        return static_out[:n].clone()

    def _forward(self, b: int) -> torch.Tensor:
        tb = TokenBatch(self.pos_b[:b], [0] * b, [1] * b, self.cos_bf[:b], self.sin_bf[:b],
                        self.slots_b[:b], kernel_rows=(self.kv_len_b[:b], self.start_b[:b],
                                                       self.page_ids))
        moes = self.model.moe_layers().values()
        for moe in moes:  # expert counts leave the padding rows out
            moe.dispatcher.rows_valid = self.n_valid
        try:
            return self.model.forward_layers(self.h_bd[:b], tb, self.cache)
        finally:
            for moe in moes:
                moe.dispatcher.rows_valid = None

    def _fill(self, h_td: torch.Tensor, tb: TokenBatch, n: int, b: int) -> None:
        """The step's inputs into rows :n, padding into n:b."""
        page_ids, firsts = tb.flat_pages()
        used = page_ids.shape[0]
        scratch = self.cache.scratch_page
        self.n_valid.fill_(n)
        self.h_bd[:n].copy_(h_td)
        self.h_bd[n:b].zero_()
        self.pos_b[:n].copy_(tb.positions_t)
        self.pos_b[n:b].zero_()
        self.cos_bf[:n].copy_(tb.cos_tf)
        self.sin_bf[:n].copy_(tb.sin_tf)
        self.slots_b[:n].copy_(tb.slots_t)
        self.slots_b[n:b].fill_(scratch * self.cache.page_size)
        host = torch.tensor([tb.kv_lens + [1] * (b - n), firsts + [used] * (b - n)],
                            dtype=torch.int32)
        self.kv_len_b[:b].copy_(host[0])
        self.start_b[:b].copy_(host[1])
        self.page_ids[:used].copy_(page_ids)
        self.page_ids[used:used + 1].fill_(scratch)
