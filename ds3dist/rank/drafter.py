"""MTPDrafter: the last stage's MTP passes of a step, after the main model's.

The MTP module at position t reads the main model's hidden state h_t and the token at t+1,
and predicts the token at t+2; it is a decoder layer with its own cache rows. Every step it
runs over every position the main model verified (prompt chunks included, so its cache holds
every position), then chains itself for the drafts (SGLang's scheme for k > 1):

    pass 1:  (h_t, token t+1) for the verified positions t -> draft 1 from the last, P
    pass j:  (MTP hidden of pass j-1 at P+j-2, draft j-1) at position P+j-1 -> draft j

Every rank of the last stage makes the same k passes each step, with or without tokens, so
the MTP layer's expert-parallel collectives stay in step. Chained positions write cache rows
beyond the verified ones; the scheduler gives them pages, and the next step overwrites them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds3dist.model.draft_head import DraftHead
from ds3dist.core.params import SamplingParams
from ds3dist.core.plan import SeqStep
from ds3dist.core.options import SpeculativeConfig
from ds3dist.rank.speculative import draft


@dataclass(slots=True)
class Verified:
    """One sequence's rows for the MTP: `count` positions from seq.start, their hidden states
    at rows row0.. of the step, and the token after the last; drafts for output tokens from
    `index` when `index` is not None."""
    seq: SeqStep
    row0: int
    count: int
    next_token: int
    index: int | None


class MTPDrafter:
    def __init__(self, model, cache, page_size: int, spec: SpeculativeConfig):
        self.model, self.cache, self.page_size, self.k = model, cache, page_size, spec.num_tokens
        self.head = DraftHead(model, spec.draft_head)
        self.q: dict[str, list[np.ndarray | None]] = {}  # the draft distributions in flight

    def forget(self, req_id: str) -> None:
        self.q.pop(req_id, None)

    def draft_probs(self, req_id: str, m: int) -> list[np.ndarray | None]:
        """The distributions the first m drafts sent for req_id were drawn from."""
        return (self.q.get(req_id) or [None] * m)[:m]

    @torch.inference_mode()
    def run(self, fed: list[Verified], h_td: torch.Tensor, tables: dict[str, list[int]],
            params: dict[str, SamplingParams]) -> dict[str, list[int]]:
        """The k MTP passes; the drafts of every sequence with an index."""
        m = self.model
        rows = [r for f in fed for r in range(f.row0, f.row0 + f.count)]
        tokens = [t for f in fed for t in (*f.seq.token_ids[1:f.count], f.next_token)]
        tb = m.token_batch([f.seq.start for f in fed], [f.count for f in fed],
                           [tables[f.seq.req_id] for f in fed], self.page_size)
        h = m.mtp_hidden(h_td[rows], torch.tensor(tokens, dtype=torch.int64), tb, self.cache)
        drafting = [(f, off + f.count - 1) for f, off in zip(fed, tb.offsets) if f.index is not None]
        h_nd = h[[row for _, row in drafting]]
        out: dict[str, list[int]] = {f.seq.req_id: [] for f, _ in drafting}
        self.q.update({rid: [] for rid in out})
        for j in range(self.k):
            logits = self.head(h_nd).cpu().numpy()
            for (f, _), row in zip(drafting, logits):
                rid = f.seq.req_id
                token, q = draft(row, params[rid], rid, f.index + j)
                out[rid].append(token)
                self.q[rid].append(q)
            if j + 1 < self.k:  # chain: the MTP's own hidden state and its draft, one ahead
                tb = m.token_batch([f.seq.start + f.count + j for f, _ in drafting],
                                   [1] * len(drafting),
                                   [tables[f.seq.req_id] for f, _ in drafting], self.page_size)
                last = torch.tensor([out[f.seq.req_id][-1] for f, _ in drafting], dtype=torch.int64)
                h_nd = m.mtp_hidden(h_nd, last, tb, self.cache)
        return out
