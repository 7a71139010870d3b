"""Speculative decoding: drafting a token with the MTP module's logits and verifying drafts.

A request's step with drafts d_1..d_m feeds its newest token x and the drafts at positions
p..p+m; main-model logits row i (position p+i) gives the distribution of the token at p+i+1.

Greedy: d_{i+1} is accepted while it is row i's argmax; the first row that disagrees (or
row m when all agree) gives the step's own token. The output is the non-speculative greedy
output, token for token.

Sampling (standard speculative sampling, Leviathan et al. / Chen et al.): with p_i the
distribution that sampling draws from at row i (temperature, top_k, top_p applied) and q_i
the one the draft d_{i+1} was drawn from, d_{i+1} is accepted when u < p_i(d) / q_i(d);
at the first rejection the token is drawn from max(0, p_i - q_i), renormalized; when all
are accepted, from p_m as without speculation. Each output token is distributed as p.

Noise is keyed like ds3dist.rank.sampling: by (seed, request id, index of the output
token), with a separate stream for drafting, accepting and the residual draw.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ds3dist.core.params import SamplingParams
from ds3dist.rank.sampling import cutoff, draw_key, draw_scaled, minus_gumbel

def probs(logits_v: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution sampling with p draws from (float64): softmax(logits / T) over the
    entries top_k and top_p keep."""
    scaled = logits_v.astype(np.float64) / p.temperature
    scaled32 = scaled.astype(np.float32)  # what sampling's cut-off compares
    cut = cutoff(scaled32, p)
    e = np.exp(scaled - scaled.max())
    if cut is not None:
        e[scaled32 < cut] = 0.0
    return e / e.sum()


def _key(p: SamplingParams, req_id: str, index: int, stream: str) -> int:
    return draw_key(p.seed, f"{req_id}\x00{stream}", index)


def _uniform(p: SamplingParams, req_id: str, index: int, stream: str) -> float:
    return float(np.random.Generator(np.random.SFC64(_key(p, req_id, index, stream))).random())


def _draw_probs(probs_v: np.ndarray, key: int) -> int:
    """One draw from probs_v (Gumbel-max with keyed noise)."""
    with np.errstate(divide="ignore"):
        score = np.log(probs_v) - minus_gumbel(key, probs_v.shape[-1])
    return int(np.argmax(score))


def draft(logits_v: np.ndarray, p: SamplingParams, req_id: str, index: int
          ) -> tuple[int, np.ndarray | None]:
    """A draft for output token `index` from MTP logits, and the distribution it was drawn
    from (None: greedy, the argmax)."""
    if p.greedy:
        return int(np.argmax(logits_v)), None
    q = probs(logits_v, p)
    return _draw_probs(q, _key(p, req_id, index, "draft")), q


def verify(logits_rv: np.ndarray, drafts: Sequence[int], draft_probs: Sequence[np.ndarray | None],
           p: SamplingParams, req_id: str, index: int) -> tuple[list[int], int]:
    """(accepted drafts, the step's own token) for rows logits_rv [m + 1, vocab] of a step
    with drafts d_1..d_m for output tokens index..index + m - 1."""
    accepted: list[int] = []
    for i, d in enumerate(drafts):
        if p.greedy:
            if int(np.argmax(logits_rv[i])) != d:
                return accepted, int(np.argmax(logits_rv[i]))
        else:
            p_v, q_v = probs(logits_rv[i], p), draft_probs[i]
            if _uniform(p, req_id, index + i, "accept") * q_v[d] >= p_v[d]:
                residual = np.maximum(p_v - q_v, 0.0)
                return accepted, _draw_probs(residual / residual.sum(),
                                             _key(p, req_id, index + i, "residual"))
        accepted.append(int(d))
    last = logits_rv[len(drafts)]
    if p.greedy:
        return accepted, int(np.argmax(last))
    return accepted, draw_scaled(last / np.float32(p.temperature), p, (req_id, index + len(drafts)))
