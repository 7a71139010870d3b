"""Sampling the next token of each row, every row with its own parameters.

Float32 logits [n, vocab] -> token ids. Greedy (temperature 0) is argmax (first maximum on
ties). Otherwise logits / temperature, keep the top_k largest (0 = all), then the smallest
prefix (by probability, descending) whose mass reaches top_p, and draw from what is left by
the Gumbel-max rule: argmax(logit / T + g_j) with g_j = -log(-log u_j), one u_j per vocabulary
entry. That is an exact draw from the renormalized distribution, and far less sensitive to
float32 rounding than inverting a CDF over 129k near-equal probabilities: a change of 1e-6 in
the logits (which a different batch composition can cause) flips the draw only when the two
best perturbed scores are that close.

The noise of a seeded request is counter-based: it depends only on (seed, request id, index of
the token), never on which other rows share the batch, which rank samples, or whether the
request was preempted and recomputed. Unseeded requests draw from torch's global RNG.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from ds3dist.serving.params import SamplingParams

_MASK63 = (1 << 63) - 1


def draw_seed(seed: int, req_id: str, index: int) -> int:
    """The generator seed of token `index` of request `req_id` under `seed`."""
    h = hashlib.blake2b(f"{int(seed)}\x00{req_id}\x00{int(index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _MASK63


def gumbel(seed: int | None, req_id: str, index: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [vocab] for (seed, request, token index); seed None: the global RNG."""
    g = None if seed is None else torch.Generator().manual_seed(draw_seed(seed, req_id, index))
    u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_min(1e-300)
    return -torch.log(-torch.log(u))


def sample_rows(logits_nv: torch.Tensor, params: Sequence[SamplingParams],
                draws: Sequence[tuple[str, int]]) -> list[int]:
    """Next token of each row: params[i] and draws[i] = (request id, token index) of row i."""
    if len(params) != logits_nv.shape[0] or len(draws) != len(params):
        raise ValueError(f"{logits_nv.shape[0]} rows, {len(params)} params, {len(draws)} draws")
    out = [0] * len(params)
    groups: dict[SamplingParams, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p, []).append(i)
    for p, rows in groups.items():
        logits = logits_nv[rows].float()
        if p.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            g = torch.stack([gumbel(p.seed, *draws[i], logits.shape[-1]) for i in rows])
            tokens = (_masked(logits / p.temperature, p).double() + g.to(logits.device)).argmax(-1)
        for i, t in zip(rows, tokens.tolist()):
            out[i] = int(t)
    return out


def _masked(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """-inf outside the top_k largest and outside the top_p nucleus."""
    v = logits.shape[-1]
    if 0 < p.top_k < v:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        vals, idx = logits.sort(dim=-1, descending=True)
        probs = vals.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p  # the mass before it already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))
    return logits
