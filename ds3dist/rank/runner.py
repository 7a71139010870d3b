"""StepRunner: one column's side of a step on one model part (the whole model in one process,
or one pipeline stage x expert-parallel rank).

It owns the part's paged cache and, per request it serves, the page table and sampling
parameters the plans introduced, and the last token it sampled for each (a FILL token id
stands for it); a plan only carries diffs (new requests, new pages, new token ids, freed
ids). `begin` applies a plan's diffs and builds the step's TokenBatch;
`layers` runs embed (first stage) and the held layers; `sample` (last stage) samples a token
for each sequence whose step reaches its target. With speculative decoding (a
SpeculativeConfig, last stage) `sample` also verifies the drafts a step carries and runs the
MTPDrafter for the next step's drafts. Where the Triton kernels run (CUDA), non-speculative
rows are sampled on the device (kernels.sampling) and decode steps may be CUDA graphs.
"""

from __future__ import annotations

import torch

from ds3dist import kernels
from ds3dist.kernels.sampling import sample_device
from ds3dist.model.cache import TokenBatch
from ds3dist.rank.graphs import DecodeGraphs, graphable
from ds3dist.rank.load_window import LoadWindow
from ds3dist.rank.drafter import MTPDrafter, Verified
from ds3dist.core.params import SamplingParams
from ds3dist.core.plan import FILL, SeqStep, StepResult
from ds3dist.rank.sampling import draw_key, sample_rows
from ds3dist.core.options import BalanceOptions, SpeculativeConfig
from ds3dist.rank.speculative import verify


class StepRunner:
    def __init__(self, model, num_pages: int, page_size: int,
                 speculative: SpeculativeConfig | None = None, cuda_graphs: bool = False,
                 load_window: int = BalanceOptions().window):
        """cuda_graphs: decode steps as CUDA graphs (rank.graphs) where the model part allows
        it; on a CPU with the Triton kernels forced (tests), the same padded buffers eagerly.
        load_window: steps of expert load kept (rank.load_window)."""
        self.model = model
        self.load = LoadWindow(load_window)
        self.page_size = page_size
        graphs = cuda_graphs and graphable(model) is None
        self.cache = model.new_cache(num_pages, page_size, scratch=graphs)
        self.graphs = DecodeGraphs(model, self.cache, capture=model.device.type == "cuda") \
            if graphs else None
        self.drafter = MTPDrafter(model, self.cache, page_size, speculative) \
            if speculative is not None else None
        self.tables: dict[str, list[int]] = {}
        self.params: dict[str, SamplingParams] = {}
        self.last: dict[str, int] = {}  # the token sampled for each request's newest step
        self.fail_ids: set[str] = set()  # test hook: requests whose processing raises

    def expert_totals(self) -> dict[int, list[int]]:
        """Copies each logical expert received here so far, per held MoE layer."""
        return {i: moe.dispatcher.stats()["received_per_expert"]
                for i, moe in self.model.moe_layers().items()}

    def begin(self, freed: list[str], seqs: list[SeqStep]) -> TokenBatch:
        self.load.tick(self.expert_totals)
        for rid in freed:
            self.tables.pop(rid, None)
            self.params.pop(rid, None)
            self.last.pop(rid, None)
            if self.drafter is not None:
                self.drafter.forget(rid)
        for s in seqs:
            if s.params is not None:  # (re)introduced: a fresh page table
                self.tables[s.req_id], self.params[s.req_id] = [], s.params
            self.tables[s.req_id].extend(s.new_pages)
        return self.model.token_batch([s.start for s in seqs], [len(s.token_ids) for s in seqs],
                                      [self.tables[s.req_id] for s in seqs], self.page_size)

    def failing(self, seqs: list[SeqStep]) -> dict[str, str]:
        """Requests that fail in their own processing, by id: the test hook's, and those whose
        token to fill in was never sampled (their step before failed)."""
        failed = {s.req_id: f"injected fault in request {s.req_id}" for s in seqs
                  if s.req_id in self.fail_ids}
        failed.update({s.req_id: f"request {s.req_id}: no sampled token to continue from"
                       for s in seqs if s.token_ids[-1] == FILL and s.req_id not in self.last
                       and s.req_id not in failed})
        for rid in failed:
            self.last.pop(rid, None)
        return failed

    @torch.inference_mode()
    def layers(self, seqs: list[SeqStep], tb: TokenBatch, h_td: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Embed the step's token ids (h_td None: first stage), then the held layers."""
        if h_td is None:
            ids = [self.last[s.req_id] if t == FILL else t for s in seqs for t in s.token_ids]
            h_td = self.model.embed(torch.tensor(ids, dtype=torch.int64))
        h_td = h_td.to(self.model.device)
        if self.graphs is not None and self.graphs.fits(tb):
            return self.graphs.run(h_td, tb)
        return self.model.forward_layers(h_td, tb, self.cache)

    @torch.inference_mode()
    def sample(self, step_id: int, seqs: list[SeqStep], tb: TokenBatch, h_td: torch.Tensor
               ) -> StepResult:
        """The step's tokens (and, speculating, accepted drafts and the next drafts)."""
        res = StepResult(step_id)
        picked = [(s, o + len(s.token_ids) - 1 - s.drafts) for s, o in zip(seqs, tb.offsets)
                  if s.sample]  # each with the row of its newest token, then its drafts' rows
        if picked and self.drafter is None:
            logits_nv = self.model.logits(h_td[[row for _, row in picked]])
            params = [self.params[s.req_id] for s, _ in picked]
            draws = [(s.req_id, s.output_index) for s, _ in picked]
            if kernels.use_triton(logits_nv):  # on the device; one read of the ids
                keys = [draw_key(p.seed, *d) for p, d in zip(params, draws)]
                tokens = sample_device(logits_nv, params, keys)
            else:
                tokens = sample_rows(logits_nv, params, draws)
            res.sampled = {s.req_id: t for (s, _), t in zip(picked, tokens)}
        elif picked:
            self._verify(picked, h_td, res)
        self.last.update(res.sampled)
        if self.drafter is not None:
            res.drafts = self.drafter.run(self._verified(seqs, tb, res), h_td, self.tables,
                                          self.params)
        return res

    def _verify(self, picked: list[tuple[SeqStep, int]], h_td: torch.Tensor, res: StepResult
                ) -> None:
        rows = [r for s, r0 in picked for r in range(r0, r0 + s.drafts + 1)]
        logits = self.model.logits(h_td[rows]).cpu().numpy()
        i = 0
        for s, _ in picked:
            m, rid = s.drafts, s.req_id
            res.accepted[rid], res.sampled[rid] = verify(
                logits[i:i + m + 1], s.token_ids[len(s.token_ids) - m:],
                self.drafter.draft_probs(rid, m), self.params[rid], rid, s.output_index)
            i += m + 1

    def _verified(self, seqs: list[SeqStep], tb: TokenBatch, res: StepResult) -> list[Verified]:
        """What the MTP module reads: every position the main model verified, with the token
        after each; sampling steps draft from their last."""
        out = []
        for s, o in zip(seqs, tb.offsets):
            if not s.sample:
                out.append(Verified(s, o, len(s.token_ids), s.next_token, None))
                continue
            acc = res.accepted.get(s.req_id, [])
            out.append(Verified(s, o, len(s.token_ids) - s.drafts + len(acc),
                                res.sampled[s.req_id], s.output_index + len(acc) + 1))
        return out
