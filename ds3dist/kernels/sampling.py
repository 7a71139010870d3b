"""Sampling on the device: Gumbel-max in one Triton kernel, and a torch reference.

The rules are the host sampler's (ds3dist.rank.sampling): temperature 0 is argmax (first
maximum on ties); otherwise logits / temperature, the top_k largest, then the smallest prefix
whose mass reaches top_p, cut by value (ties with the last kept are kept), and the draw is
argmax over kept j of (scaled_j + g_j), g_j = -log(-log u_j).

The noise is counter-based: u_j comes from a 32-bit hash of (key, j), the same integers in
Triton and in torch (uint32 there, int64 masked to 32 bits here). With F murmur3's 32-bit
finalizer and lo, hi the key's halves, the row's seeds are s0 = F(F(lo ^ c0) ^ hi) and
s1 = F(F(hi ^ c1) ^ lo), and entry j's hash is F(F(j ^ s0) ^ s1). Entry j's noise
depends on neither what is kept nor the other rows, so a seeded row (key from draw_key: seed,
request id, token index) draws the same whatever batch it is in. It is not the host's SFC64
stream: a seed gives its own reproducible draws on the device. With v = (hash + 0.5) / 2^32
and u = 1 - v, g is computed as -log(v) - v/2 - ... where v is small, so the upper tail of g
(where draws are decided) keeps its 32 bits instead of float32's spacing near 1.

One host read per call: per-row parameters go to the device in one copy each (pinned,
asynchronous), the cut-offs are torch ops there, the kernel writes the ids, and the final
.tolist() is the only device-to-host transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ds3dist import kernels
from ds3dist.core.params import SamplingParams

BLOCK_V = 1024  # vocabulary entries per step of a row's program
_M32 = 0xFFFFFFFF
_SEED0, _SEED1 = 0x9E3779B9, 0x7F4A7C15  # mixed into the key's low and high halves
_TWO_M32 = 2.0 ** -32
_ONE_BELOW = 1.0 - 2.0 ** -24  # the largest float32 below 1
_TAIL = 2.0 ** -6  # v below this: g from the series in v

tl = None  # triton.language, set by kernels.jit when a kernel is first built


def _gumbel_argmax_fn(logits_ptr, row_stride, temp_ptr, cut_ptr, key_ptr, out_ptr, vocab,
                      NOISE_OUT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row program_id(0): argmax of kept (logits / T + noise), or of logits where T = 0,
    into out[row] (int32). NOISE_OUT 1 stores the row's noise (float32) instead, 2 its
    hash (int64), both [n, vocab]."""
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(key_ptr + row)
    lo = (key & 0xFFFFFFFF).to(tl.uint32)
    hi = (key >> 32).to(tl.uint32)
    pair = tl.arange(0, 2)  # the row's two seeds, side by side (as _seeds)
    w = tl.where(pair == 0, lo ^ 0x9E3779B9, hi ^ 0x7F4A7C15)
    for r in tl.static_range(2):  # murmur3's finalizer, the other half mixed in between
        w ^= w >> 16
        w *= 0x85EBCA6B
        w ^= w >> 13
        w *= 0xC2B2AE35
        w ^= w >> 16
        if r == 0:
            w ^= tl.where(pair == 0, hi, lo)
    s0 = tl.sum(tl.where(pair == 0, w, 0), 0)
    s1 = tl.sum(tl.where(pair == 1, w, 0), 0)
    offs = tl.arange(0, BLOCK_V)
    if NOISE_OUT == 0:
        t = tl.load(temp_ptr + row)
        greedy = t == 0.0
        t = tl.where(greedy, 1.0, t)
        cut = tl.load(cut_ptr + row)
        best_v = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: first best
        best_j = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        j = start + offs
        inb = j < vocab
        h = j.to(tl.uint32) ^ s0
        for r in tl.static_range(2):  # as above, keyed by s0 then s1
            h ^= h >> 16
            h *= 0x85EBCA6B
            h ^= h >> 13
            h *= 0xC2B2AE35
            h ^= h >> 16
            if r == 0:
                h ^= s1
        v = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2^-32
        u = tl.minimum(((h ^ 0xFFFFFFFF).to(tl.float32) + 0.5) * 2.3283064365386963e-10,
                       0.99999994)  # 1 - v, from the complement: exact near 0
        tail = -tl.log(v) - v * (0.5 + v * (0.20833333333333334 + v * 0.125))
        g = tl.where(v < 0.015625, tail, -tl.log(-tl.log(u)))
        if NOISE_OUT == 1:
            tl.store(out_ptr + row * vocab + j, g, mask=inb)
        elif NOISE_OUT == 2:
            tl.store(out_ptr + row * vocab + j, h.to(tl.int64), mask=inb)
        else:
            x = tl.load(logits_ptr + row * row_stride + j, mask=inb, other=float("-inf"))
            scaled = tl.math.div_rn(x, t)  # IEEE division, as torch's (cut-offs compare)
            score = tl.where(greedy, scaled, scaled + g)
            score = tl.where(inb & (scaled >= cut), score, float("-inf"))
            better = score > best_v
            best_v = tl.where(better, score, best_v)
            best_j = tl.where(better, j, best_j)
    if NOISE_OUT == 0:
        top = tl.max(best_v, 0)
        tl.store(out_ptr + row, tl.min(tl.where(best_v == top, best_j, vocab), 0))


_gumbel_argmax = kernels.jit(_gumbel_argmax_fn)


def _block_v() -> int:
    """Entries per step: wider under the interpreter, where each step costs numpy calls."""
    return 8 * BLOCK_V if kernels.interpreting() else BLOCK_V


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """a * c mod 2^32 for int64 a < 2^32, without overflowing int64."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer (a bijection of [0, 2^32)) on int64 values below 2^32."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _seeds(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit seeds of each key (int64, in [0, 2^63)), each mixed from both halves
    by its own path: were s1 a function of F(x ^ s0), some entry's first round could cancel
    it (hash 0, the largest noise, at a fixed j)."""
    lo, hi = key & _M32, key >> 32
    return _fmix32(_fmix32(lo ^ _SEED0) ^ hi), _fmix32(_fmix32(hi ^ _SEED1) ^ lo)


def _hash_ref(keys_n: torch.Tensor, vocab: int) -> torch.Tensor:
    """The 32-bit hash of (key, j) for j < vocab: int64 [n, vocab]."""
    s0, s1 = _seeds(keys_n.to(torch.int64))
    j_v = torch.arange(vocab, dtype=torch.int64, device=keys_n.device)
    return _fmix32(_fmix32(j_v ^ s0[:, None]) ^ s1[:, None])


def _noise_of_hash(h: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (float32) of hashes, as the kernel computes it."""
    v = (h.to(torch.float32) + 0.5) * _TWO_M32
    u = ((_M32 - h).to(torch.float32) + 0.5).mul_(_TWO_M32).clamp_(max=_ONE_BELOW)
    tail = -torch.log(v) - v * (0.5 + v * (5 / 24 + v * 0.125))
    return torch.where(v < _TAIL, tail, -torch.log(-torch.log(u)))


def _launch(logits_nv, temp_n, cut_n, keys_n, out, vocab: int, noise_out: int) -> None:
    _gumbel_argmax()[(keys_n.shape[0],)](logits_nv, logits_nv.stride(0), temp_n, cut_n, keys_n, out,
                                    vocab, NOISE_OUT=noise_out, BLOCK_V=_block_v(),
                                    num_warps=4)


def _noise_kernel(keys_n: torch.Tensor, vocab: int, noise_out: int,
                  dtype: torch.dtype) -> torch.Tensor:
    keys_n = keys_n.to(torch.int64).contiguous()
    out = torch.empty(keys_n.shape[0], vocab, dtype=dtype, device=keys_n.device)
    if out.numel():  # the logits, temperature and cut-off pointers go unread
        _launch(out, out, out, keys_n, out, vocab, noise_out)
    return out


def gumbel_noise(keys_n: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's noise g of entries j < vocab of each key (Triton): float32 [n, vocab]."""
    return _noise_kernel(keys_n, vocab, 1, torch.float32)


def _hash_kernel(keys_n: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's hash of (key, j) (Triton): int64 [n, vocab], values < 2^32."""
    return _noise_kernel(keys_n, vocab, 2, torch.int64)


def gumbel_noise_ref(keys_n: torch.Tensor, vocab: int) -> torch.Tensor:
    """gumbel_noise in torch (int64 arithmetic masked to 32 bits): float32 [n, vocab]."""
    return _noise_of_hash(_hash_ref(keys_n, vocab))


def _check(logits_nv: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[int]):
    if logits_nv.dim() != 2 or logits_nv.dtype != torch.float32:
        raise ValueError(f"logits must be float32 [n, vocab], got {logits_nv.dtype} "
                         f"{tuple(logits_nv.shape)}")
    if len(params) != logits_nv.shape[0] or len(keys) != len(params):
        raise ValueError(f"{logits_nv.shape[0]} rows, {len(params)} params, {len(keys)} keys")
    if any(not 0 <= k < 1 << 63 for k in keys):
        raise ValueError("noise keys must be in [0, 2^63)")


def _to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host->device copy that does not wait for the device (pinned, asynchronous)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _cutoffs(logits_nv: torch.Tensor, temp_n: torch.Tensor,
             params: Sequence[SamplingParams]) -> torch.Tensor:
    """Each row's smallest kept scaled value (-inf: all kept): float32 [n], on the device.
    The rows with a cut share one sort (or top-K, K their largest top_k); row i keeps its
    first k_i values, then the prefix whose mass before it stays below top_p (float64)."""
    n, vocab = logits_nv.shape
    cut_n = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits_nv.device)
    rows = [i for i, p in enumerate(params)
            if not p.greedy and (0 < p.top_k < vocab or p.top_p < 1)]
    if not rows:
        return cut_n
    dev = logits_nv.device
    ks = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows]
    rows_m, k_m = _to_device([rows, ks], torch.int64, dev)
    top_p_m = _to_device([params[i].top_p if params[i].top_p < 1 else math.inf for i in rows],
                         torch.float64, dev)
    scaled_mv = logits_nv.index_select(0, rows_m) / temp_n.index_select(0, rows_m)[:, None]
    big_k = max(ks)
    if big_k == vocab:
        top_mk = scaled_mv.sort(dim=1, descending=True).values
    else:
        top_mk = scaled_mv.topk(big_k, dim=1).values
    within_mk = torch.arange(big_k, device=dev) < k_m[:, None]
    e_mk = torch.exp(top_mk - top_mk[:, :1]).double() * within_mk
    mass_mk = e_mk.cumsum(1)  # prefix sums: row i's total at k_i - 1, whatever K is
    before_mk = mass_mk - e_mk
    goal_m = top_p_m * mass_mk.gather(1, (k_m - 1)[:, None]).squeeze(1)
    count_m = ((before_mk < goal_m[:, None]) & within_mk).sum(1).clamp(min=1)
    cut_m = top_mk.gather(1, (count_m - 1)[:, None]).squeeze(1)
    return cut_n.scatter_(0, rows_m, cut_m)


def sample_device(logits_nv: torch.Tensor, params: Sequence[SamplingParams],
                  keys: Sequence[int]) -> list[int]:
    """Next token of each row (params[i], noise key keys[i]) by the Triton kernel; the ids'
    .tolist() is the call's one device-to-host read."""
    _check(logits_nv, params, keys)
    n, vocab = logits_nv.shape
    if n == 0:
        return []
    if logits_nv.stride(1) != 1:
        logits_nv = logits_nv.contiguous()
    dev = logits_nv.device
    temp_n = _to_device([float(p.temperature) for p in params], torch.float32, dev)
    keys_n = _to_device([int(k) for k in keys], torch.int64, dev)
    cut_n = _cutoffs(logits_nv, temp_n, params)
    ids_n = torch.empty(n, dtype=torch.int32, device=dev)
    _launch(logits_nv, temp_n, cut_n, keys_n, ids_n, vocab, 0)
    return ids_n.tolist()


def _cutoff_ref(scaled_v: torch.Tensor, p: SamplingParams) -> torch.Tensor | None:
    """The host's `cutoff` on one row, with a full sort."""
    vocab = scaled_v.shape[0]
    k = p.top_k if 0 < p.top_k < vocab else vocab
    if k == vocab and p.top_p >= 1:
        return None
    top = torch.sort(scaled_v, descending=True).values[:k]
    if p.top_p < 1:
        e = torch.exp(top - top[0]).double()
        before = torch.cumsum(e, 0) - e
        top = top[:max(1, int((before < p.top_p * e.sum()).sum()))]
    return top[-1]


def sample_ref(logits_nv: torch.Tensor, params: Sequence[SamplingParams],
               keys: Sequence[int]) -> list[int]:
    """sample_device's draws in plain torch, row by row (any device)."""
    _check(logits_nv, params, keys)
    vocab = logits_nv.shape[1]
    keys_n = torch.tensor([int(k) for k in keys], dtype=torch.int64, device=logits_nv.device)
    g_nv = gumbel_noise_ref(keys_n, vocab)
    out = []
    for x_v, p, g_v in zip(logits_nv, params, g_nv):
        if p.greedy:
            out.append(int(torch.argmax(x_v)))
            continue
        scaled_v = x_v / x_v.new_tensor([p.temperature])
        score_v = scaled_v + g_v
        cut = _cutoff_ref(scaled_v, p)
        if cut is not None:
            score_v = score_v.masked_fill(scaled_v < cut, float("-inf"))
        out.append(int(torch.argmax(score_v)))
    return out
