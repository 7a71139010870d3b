"""Sampling the next token of each row, every row with its own parameters.

Float32 logits [n, vocab] -> token ids. Greedy (temperature 0) is argmax (first maximum on
ties). Otherwise logits / temperature, keep the top_k largest (0 = all), then the smallest
prefix (by probability, descending) whose mass reaches top_p, and draw from what is left by
the Gumbel-max rule: argmax(logit / T + g_j) with g_j = -log(-log u_j), one u_j per vocabulary
entry. That is an exact draw from the renormalized distribution, and far less sensitive to
float32 rounding than inverting a CDF over 129k near-equal probabilities: a change of 1e-6 in
the logits (which a different batch composition can cause) flips the draw only when the two
best perturbed scores are that close. The nucleus is found among the largest entries first
(a full sort of 129k entries only when they do not hold it), and the noise is evaluated only
at the entries kept.

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


def uniforms(seed: int | None, req_id: str, index: int, vocab: int) -> torch.Tensor:
    """u_j in (0, 1), float64 [vocab], for (seed, request, token index); seed None: the
    global RNG. The Gumbel noise of entry j is -log(-log(u_j))."""
    g = None if seed is None else torch.Generator().manual_seed(draw_seed(seed, req_id, index))
    return torch.rand(vocab, generator=g, dtype=torch.float64).clamp_min(1e-300)


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
            tokens = logits.argmax(-1).tolist()
        else:
            scaled = logits / p.temperature
            tokens = [_draw(scaled[j], p, draws[i]) for j, i in enumerate(rows)]
        for i, t in zip(rows, tokens):
            out[i] = int(t)
    return out


def _draw(scaled_v: torch.Tensor, p: SamplingParams, draw: tuple[str, int]) -> int:
    """Gumbel-max over the kept entries only; the noise of entry j is the same whatever is kept."""
    u = uniforms(p.seed, *draw, scaled_v.shape[-1])
    ids = candidates(scaled_v, p)
    if ids is None:
        return int((scaled_v.double() - torch.log(-torch.log(u))).argmax())
    scores = scaled_v[ids].double() - torch.log(-torch.log(u[ids]))
    return int(ids[scores.argmax()])


def candidates(scaled_v: torch.Tensor, p: SamplingParams, first: int = 1024) -> torch.Tensor | None:
    """Ids of the entries top_k and top_p keep (None: all), without sorting the whole vocabulary
    when the nucleus lies in the `first` largest (checked: their mass reaches top_p)."""
    v = scaled_v.shape[-1]
    k = p.top_k if 0 < p.top_k < v else v
    if p.top_p >= 1:
        return None if k == v else scaled_v.topk(k).indices
    lse = torch.logsumexp(scaled_v if k == v else scaled_v.topk(k).values, -1)  # over the top-k
    n = min(first, k)
    while True:
        vals, ids = scaled_v.topk(n)  # sorted, descending
        probs = (vals - lse).exp()
        before = probs.cumsum(-1) - probs  # mass of the larger entries
        if n == k or before[-1] + probs[-1] >= p.top_p:
            return ids[before < p.top_p]
        n = min(8 * n, k)
