"""Sampling the next token of each row, every row with its own parameters.

Float32 logits [n, vocab] -> token ids. Greedy (temperature 0) is argmax (first maximum on
ties). Otherwise logits / temperature, keep the top_k largest (0 = all), then the smallest
prefix (by probability, descending) whose mass reaches top_p, and draw from what is left by
the Gumbel-max rule: argmax(logit / T + g_j) with g_j = -log(-log u_j), u_j uniform, for each
vocabulary entry. That is an exact draw from the renormalized distribution, and far
less sensitive to float32 rounding than inverting a CDF over 129k near-equal probabilities: a
change of 1e-6 in the logits (which a different batch composition can cause) flips the draw
only when the two best perturbed scores are that close. Most draws need no cut-off at all:
the best of all entries is kept when fewer than top_k entries are larger and those hold less
than top_p of the mass. Otherwise the nucleus is cut without a full sort: a mass histogram
over the value range finds the one bin where the mass reaches top_p, and only that bin's
entries are sorted.

The noise is keyed: u_j is entry j of an SFC64 stream seeded with a key, drawn for the whole
vocabulary, so entry j's noise is the same whatever is kept. The key of a seeded request
depends only on (seed, request id, index of the token), never on which other rows share the
batch, which rank samples, or whether the request was preempted and recomputed. Unseeded
requests take their key from torch's global RNG.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ds3dist.core.params import SamplingParams

_MASK63 = (1 << 63) - 1


def draw_seed(seed: int, req_id: str, index: int) -> int:
    """The noise key of token `index` of request `req_id` under `seed`."""
    h = hashlib.blake2b(f"{int(seed)}\x00{req_id}\x00{int(index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _MASK63


def draw_key(seed: int | None, req_id: str, index: int) -> int:
    """The noise key of token `index` of request `req_id`: from (seed, id, index) when seeded,
    else from torch's global RNG."""
    if seed is None:
        return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
    return draw_seed(seed, req_id, index)


def sample_rows(logits_nv: torch.Tensor, params: Sequence[SamplingParams],
                draws: Sequence[tuple[str, int]]) -> list[int]:
    """Next token of each row: params[i] and draws[i] = (request id, token index) of row i.
    Runs in numpy on the host: its sort is about 20x faster than torch's on CPU here."""
    if len(params) != logits_nv.shape[0] or len(draws) != len(params):
        raise ValueError(f"{logits_nv.shape[0]} rows, {len(params)} params, {len(draws)} draws")
    logits = logits_nv.detach().float().cpu().numpy()
    out = [int(row.argmax()) if p.greedy else None for row, p in zip(logits, params)]
    rows = [i for i, t in enumerate(out) if t is None]

    def draw(i: int) -> int:
        return draw_scaled(logits[i] / np.float32(params[i].temperature), params[i], draws[i])

    threads = torch.get_num_threads()
    picked = _pool(threads).map(draw, rows) if len(rows) > 1 and threads > 1 else map(draw, rows)
    for i, t in zip(rows, picked):  # numpy releases the GIL: rows run on the rank's threads
        out[i] = t
    return out


@lru_cache(maxsize=2)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="ds3dist-sample")


def draw_scaled(scaled_v: np.ndarray, p: SamplingParams, draw: tuple[str, int]) -> int:
    """Gumbel-max over the kept entries; the noise of entry j is the same whatever is kept.
    The best of all entries is taken when it is kept (most draws), else the best kept one."""
    g = minus_gumbel(draw_key(p.seed, *draw), scaled_v.shape[-1])
    score = np.subtract(scaled_v, g, out=g)
    best = int(np.argmax(score))
    if _keeps(scaled_v, p, scaled_v[best]):
        return best
    score[scaled_v < cutoff(scaled_v, p)] = -np.inf
    return int(np.argmax(score))


def minus_gumbel(key: int, n: int) -> np.ndarray:
    """log(-log u_j) for j < n, u_j uniform from an SFC64 stream seeded with key (float64)."""
    g = np.random.Generator(np.random.SFC64(key)).random(n)
    with np.errstate(divide="ignore"):  # u = 0 (p = 2^-53): +inf, never chosen
        np.log(g, out=g)
        np.negative(g, out=g)
        return np.log(g, out=g)


def _keeps(x: np.ndarray, p: SamplingParams, value: np.floating) -> bool:
    """Whether top_k and top_p keep the entries of this value, as `cutoff` decides, but
    without finding the cut: fewer than top_k entries are larger, and those hold less than
    top_p of the mass."""
    v = x.shape[-1]
    k = p.top_k if 0 < p.top_k < v else v
    larger = x > value
    if k < v and np.count_nonzero(larger) >= k:
        return False
    if p.top_p >= 1:
        return True
    if k < v:  # the mass of the top_k only: their cut
        return bool(value >= cutoff(x, p))
    e = np.exp(x - x.max())
    return bool((e * larger).sum(dtype=np.float64) < p.top_p * e.sum(dtype=np.float64))


def candidates(scaled_v: np.ndarray, p: SamplingParams) -> np.ndarray | None:
    """Ids of the entries top_k and top_p keep (None: all), ascending."""
    cut = cutoff(scaled_v, p)
    return None if cut is None else np.flatnonzero(scaled_v >= cut)


def cutoff(scaled_v: np.ndarray, p: SamplingParams) -> np.floating | None:
    """The smallest value top_k and top_p keep (None: all are kept). Cut-offs are values, so
    entries tied with the last one kept are kept too."""
    x, v = scaled_v, scaled_v.shape[-1]
    k = p.top_k if 0 < p.top_k < v else v
    if k == v and p.top_p >= 1:
        return None
    if k == v:
        return _nucleus_cut(x, p.top_p)
    top = -np.sort(-np.partition(x, v - k)[v - k:])  # the k largest, descending
    if p.top_p < 1:
        e = np.exp(top - top[0])
        before = np.cumsum(e, dtype=np.float64) - e
        top = top[:max(1, int(np.searchsorted(before, p.top_p * e.sum(dtype=np.float64))))]
    return top[-1]


def _nucleus_cut(x: np.ndarray, top_p: float, bins: int = 4096) -> np.floating:
    """The smallest value the nucleus keeps: entries whose larger entries hold less than top_p
    of the mass. Bin masses over [min, max] first (bins are monotone in value), then a sort of
    the one bin where the mass from the top reaches the goal."""
    hi, lo = x.max(), x.min()
    if hi == lo:
        return lo
    e = np.exp(x - hi)
    b_v = ((x - lo) * np.float32((bins - 1) / (hi - lo))).astype(np.intp)
    np.minimum(b_v, bins - 1, out=b_v)
    mass_b = np.bincount(b_v, weights=e, minlength=bins)
    goal = top_p * mass_b.sum()
    above_b = np.cumsum(mass_b[::-1])[::-1] - mass_b  # mass of the bins above each
    b = int(np.searchsorted(-above_b, -goal, side="right"))  # first bin with above < goal
    in_b = np.flatnonzero(b_v == b)
    order = np.argsort(-x[in_b], kind="stable")
    vals, ev = x[in_b][order], e[in_b][order]
    before = above_b[b] + np.cumsum(ev, dtype=np.float64) - ev
    return vals[max(1, int(np.searchsorted(before, goal))) - 1]
