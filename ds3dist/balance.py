"""Expert-parallel load balancing (DeepSeek's EPLB policy), and `python -m ds3dist.balance`.

A MoE layer's E logical experts become E + R physical slots, (E + R) / ep on each
expert-parallel rank; a logical expert with c copies has its load split evenly among them.
`balance` places them from measured per-expert load so the busiest rank carries little more
than the mean:

- hierarchical (the config's expert groups divide evenly over the nodes): pack whole groups
  onto nodes (each group's total load), replicate each node's experts over its slots, pack the
  node's physical experts onto its ranks. A group's experts stay on one node, as group-limited
  routing wants.
- global (otherwise): replicate over all experts, pack onto all ranks.

Replication gives one more copy at a time to the expert with the largest load per copy (at most
one copy per rank). Packing is greedy: heaviest copy first, into the least-loaded rank with room
that does not hold that expert yet. A local search then lowers the busiest rank while it can,
swapping one of its slots with another rank's or moving a copy from one expert to another.
Small blocks (few slots: one slot is a large share of a rank, where greedy copy counts go
wrong) also search the copy counts: the count vectors one or two copy moves away are packed and
refined, the best kept, until none is better. On small cases that stays within 5% of the
exhaustive optimum; on large ones the greedy counts are near the mean already.

    python -m ds3dist.balance LOAD.json [--out FILE] [--window] [HYDRA OVERRIDES...]

reads the expert load a job wrote (`*.expert_load.json`), composes the launch's Hydra config
with the overrides (parallel.ep, parallel.redundant_experts, parallel.ranks_per_node, the
model), and writes a placement file (`parallel.placement=FILE` runs it). Exit status 2 names
the file or setting at fault.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

LOAD_FORMAT = "ds3dist.expert_load/1"
PLACEMENT_FORMAT = "ds3dist.placement/1"


class BalanceError(ValueError):
    """Balancing is impossible with these inputs; the message names the file or setting."""


# ---- the policy ---------------------------------------------------------------------------
def replicate(load_e: np.ndarray, num_phy: int, max_copies: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Spread `num_phy` physical slots over the experts of load_e [..., E]: one copy each, then
    each further copy to the expert with the largest load / copies (ties: lowest id), never more
    than max_copies of one. Returns (phy_to_log [..., num_phy], copies_e [..., E])."""
    load_e = np.asarray(load_e, dtype=np.float64)
    e = load_e.shape[-1]
    cap = num_phy if max_copies is None else max_copies
    if not e <= num_phy <= e * cap:
        raise BalanceError(f"cannot place {num_phy} physical experts: {e} logical experts "
                           f"with 1 to {cap} copies each")
    copies_e = np.ones(load_e.shape, dtype=np.int64)
    extra = []
    for _ in range(num_phy - e):
        score_e = np.where(copies_e < cap, load_e / copies_e, -np.inf)
        pick = score_e.argmax(-1)
        np.put_along_axis(copies_e, pick[..., None],
                          np.take_along_axis(copies_e, pick[..., None], -1) + 1, -1)
        extra.append(pick)
    base = np.broadcast_to(np.arange(e), load_e.shape)
    phy_to_log = np.concatenate([base, *(p[..., None] for p in extra)], axis=-1)
    return phy_to_log, copies_e


def balanced_packing(weights_n: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Put the n items of weights_n [..., n] into `packs` packs of n / packs items each:
    heaviest first, each into the least-loaded pack not yet full (ties: lowest pack).
    Returns (pack_of_n, index_in_pack_n), both [..., n]."""
    w_bn = np.asarray(weights_n, dtype=np.float64)
    shape = w_bn.shape
    n = shape[-1]
    if n % packs:
        raise BalanceError(f"{n} items do not divide into {packs} equal packs")
    w_bn = w_bn.reshape(-1, n)
    b = np.arange(len(w_bn))
    order_bn = np.argsort(-w_bn, axis=-1, kind="stable")
    load_bp = np.zeros((len(w_bn), packs))
    count_bp = np.zeros((len(w_bn), packs), dtype=np.int64)
    pack_bn = np.empty(w_bn.shape, dtype=np.int64)
    index_bn = np.empty(w_bn.shape, dtype=np.int64)
    for k in range(n):
        item = order_bn[:, k]
        p = np.where(count_bp < n // packs, load_bp, np.inf).argmin(-1)
        pack_bn[b, item] = p
        index_bn[b, item] = count_bp[b, p]
        load_bp[b, p] += w_bn[b, item]
        count_bp[b, p] += 1
    return pack_bn.reshape(shape), index_bn.reshape(shape)


def _evict(w_n: np.ndarray, lab_n: np.ndarray, pack_n: np.ndarray, load_p: np.ndarray,
           count_p: np.ndarray, hold_pl: np.ndarray, x: int, per: int) -> int:
    """Make room for item x when every pack with room already holds its expert: move an item
    y from a full pack f lacking that expert into the least-loaded pack p with room (y's
    expert not in p), and return f for x. Such f and y always exist: x's expert has fewer
    copies placed than packs, and f's `per` distinct experts cannot all be among p's fewer."""
    p = int(np.where(count_p < per, load_p, np.inf).argmin())
    placed = np.flatnonzero(pack_n >= 0)
    cand = placed[~hold_pl[pack_n[placed], lab_n[x]] & ~hold_pl[p, lab_n[placed]]]
    after = np.maximum(load_p[p] + w_n[cand], load_p[pack_n[cand]] - w_n[cand] + w_n[x])
    y = int(cand[after.argmin()])
    f = int(pack_n[y])
    pack_n[y] = p
    load_p[f] -= w_n[y]
    load_p[p] += w_n[y]
    count_p[f] -= 1
    count_p[p] += 1
    hold_pl[f, lab_n[y]] = False
    hold_pl[p, lab_n[y]] = True
    return f


def _pack_distinct(w_bn: np.ndarray, lab_bn: np.ndarray, packs: int, labels: int) -> np.ndarray:
    """balanced_packing's greedy for physical experts (weight w_bn, logical id lab_bn < labels)
    where a pack never holds two copies of one expert. Returns each pack's labels
    [B, packs, n / packs]."""
    nb, n = w_bn.shape
    per = n // packs
    b = np.arange(nb)
    order_bn = np.lexsort((lab_bn, -w_bn), axis=-1)  # a label's copies (equal weight) adjacent
    load_bp = np.zeros((nb, packs))
    count_bp = np.zeros((nb, packs), dtype=np.int64)
    hold_bpl = np.zeros((nb, packs, labels), dtype=bool)
    pack_bn = np.full((nb, n), -1, dtype=np.int64)
    for k in range(n):
        item = order_bn[:, k]
        lab = lab_bn[b, item]
        ok_bp = (count_bp < per) & ~hold_bpl[b, :, lab]
        p = np.where(ok_bp, load_bp, np.inf).argmin(-1)
        for s in np.flatnonzero(~ok_bp.any(-1)):
            p[s] = _evict(w_bn[s], lab_bn[s], pack_bn[s], load_bp[s], count_bp[s], hold_bpl[s],
                          item[s], per)
        pack_bn[b, item] = p
        load_bp[b, p] += w_bn[b, item]
        count_bp[b, p] += 1
        hold_bpl[b, p, lab] = True
    order_bn = np.lexsort((lab_bn, pack_bn), axis=-1)
    return np.take_along_axis(lab_bn, order_bn, -1).reshape(nb, packs, per)


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, idx, -1)


def _refine(lab_bps: np.ndarray, copies_bl: np.ndarray, load_bl: np.ndarray) -> None:
    """Local search, in place, in every block at once (a block: one layer's ranks, or one
    node's; experts 0..l-1 with load load_bl and copies_bl copies; lab_bps: each rank's slots).
    A step makes the move that leaves the busiest rank r, and every rank the move changes,
    lowest below r's load: swap a slot of r with one of another rank, or move a copy (a slot of
    an expert with >= 2 copies takes one of r's experts, or r's slot takes any expert), no rank
    ever holding an expert twice. Each move lowers the sorted rank loads lexicographically, so
    this ends; a block without a move drops out."""
    ranks, per = lab_bps.shape[1:]
    n = ranks * per
    rank_n = np.arange(n) // per
    act = np.arange(len(lab_bps))
    while len(act):
        lab, c_l, l_l = lab_bps[act], copies_bl[act], load_bl[act]
        na, b = len(act), np.arange(len(act))
        lab_n = lab.reshape(na, n)
        w_n = _take(l_l / c_l, lab_n)
        w = w_n.reshape(lab.shape)
        load_p = w.sum(-1)
        r = load_p.argmax(-1)
        top = load_p[b, r]
        hold = np.zeros((na, ranks, c_l.shape[-1]), dtype=bool)
        np.put_along_axis(hold, lab, True, -1)
        lab_r, w_r = lab[b, r], w[b, r]  # r's slots i
        c_r, l_r = _take(c_l, lab_r), _take(l_l, lab_r)
        # swap r's slot i with slot j of rank p
        d_ipj = w_r[:, :, None, None] - w[:, None]
        swap = np.maximum(top[:, None, None, None] - d_ipj, load_p[:, None, :, None] + d_ipj)
        ok_ip = ~hold[b[:, None], :, lab_r]
        ok_pj = ~hold[b[:, None, None], r[:, None, None], lab]
        swap[~(ok_ip[..., None] & ok_pj[:, None])] = np.inf
        # slot t (spare: its expert a has >= 2 copies) takes r's expert i; a's other holders
        # (never t's rank) each carry rise_t more
        c_n = _take(c_l, lab_n)
        spare_n = c_n >= 2
        t_k = np.argsort(~spare_n, axis=-1, kind="stable")[:, :spare_n.sum(-1).max()]
        a_k, c_a, rank_k = _take(lab_n, t_k), _take(c_n, t_k), rank_n[t_k]
        rise_k = _take(l_l, a_k) / (c_a * np.maximum(c_a - 1, 1))
        others_kp = hold[b[:, None], :, a_k] & (np.arange(ranks) != rank_k[..., None])
        r_has_k = others_kp[b[:, None], np.arange(t_k.shape[1]), r[:, None]]
        others_kp[b, :, r] = False
        worst_k = np.where(others_kp, load_p[:, None] + rise_k[..., None], -np.inf).max(-1)
        new_r = ((top[:, None] - l_r / (c_r * (c_r + 1)))[..., None]
                 + np.where(r_has_k, rise_k, 0)[:, None])
        new_t = ((load_p[b[:, None], rank_k] - _take(w_n, t_k))[:, None]
                 + (l_r / (c_r + 1))[..., None])
        give = np.maximum(np.maximum(new_r, new_t), worst_k[:, None])
        give[~((_take(spare_n, t_k) & (rank_k != r[:, None]))[:, None] & (c_r < ranks)[..., None]
               & ~hold[b[:, None, None], rank_k[:, None], lab_r[..., None]])] = np.inf
        # r's slot i (its expert with >= 2 copies) takes an expert x that r lacks
        rise_i = l_r / (c_r * np.maximum(c_r - 1, 1))
        others_ip = hold[b[:, None], :, lab_r]
        others_ip[b, :, r] = False
        worst_i = np.where(others_ip, load_p[:, None] + rise_i[..., None], -np.inf).max(-1)
        take = np.maximum((top[:, None] - w_r)[..., None] + (l_l / (c_l + 1))[:, None],
                          worst_i[..., None])
        take[~((c_r >= 2)[..., None] & ((c_l < ranks) & ~hold[b, r])[:, None])] = np.inf
        cand = np.concatenate([m.reshape(na, -1) for m in (swap, give, take)], -1)
        best = cand.argmin(-1)
        go = np.flatnonzero(cand[b, best] < top * (1 - 1e-9))
        for g in go:
            _move(lab_bps, copies_bl, act[g], int(r[g]), int(best[g]), swap[0].shape,
                  give[0].shape, t_k[g], lab_r[g])
        act = act[go]


def _move(lab_bps: np.ndarray, copies_bl: np.ndarray, blk: int, r: int, k: int,
          swap_shape: tuple, give_shape: tuple, t_k: np.ndarray, lab_r: np.ndarray) -> None:
    """Make _refine's candidate k (an index into its swap, give and take moves, in that
    order) in block blk whose busiest rank is r."""
    per = lab_bps.shape[-1]
    swaps, gives = int(np.prod(swap_shape)), int(np.prod(give_shape))
    if k < swaps:
        i, p, j = np.unravel_index(k, swap_shape)
        lab_bps[blk, r, i], lab_bps[blk, p, j] = lab_bps[blk, p, j], lab_bps[blk, r, i]
        return
    k -= swaps
    if k < gives:
        i, j = divmod(k, give_shape[-1])
        slot, x = divmod(int(t_k[j]), per), lab_r[i]
    else:
        i, x = divmod(k - gives, copies_bl.shape[-1])
        slot = (r, i)
    copies_bl[blk, lab_bps[(blk, *slot)]] -= 1
    copies_bl[blk, x] += 1
    lab_bps[(blk, *slot)] = x


def _place(load_bl: np.ndarray, copies_bl: np.ndarray, ranks: int) -> np.ndarray:
    """Each block's copies packed onto `ranks` ranks and refined (copies_bl may change)."""
    nb, l = copies_bl.shape
    lab_bn = np.repeat(np.tile(np.arange(l), nb), copies_bl.ravel()).reshape(nb, -1)
    lab_bps = _pack_distinct(_take(load_bl / copies_bl, lab_bn), lab_bn, ranks, l)
    _refine(lab_bps, copies_bl, load_bl)
    return lab_bps


def _score(lab_bps: np.ndarray, copies_bl: np.ndarray, load_bl: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Each block's busiest rank load and sum of squared rank loads."""
    w_bn = _take(load_bl / copies_bl, lab_bps.reshape(len(lab_bps), -1))
    load_bp = w_bn.reshape(lab_bps.shape).sum(-1)
    return load_bp.max(-1), (load_bp**2).sum(-1)


SEARCH_WORK = 1 << 16  # slots placed in a round of the copy-count search, all blocks together


def _moves(c_l: np.ndarray, ranks: int) -> np.ndarray:
    """The one-copy moves from counts c_l: [K, l], -1 where a copy goes, +1 where it comes."""
    l = len(c_l)
    a, x = np.nonzero((c_l >= 2)[:, None] & (c_l < ranks) & ~np.eye(l, dtype=bool))
    d_kl = np.zeros((len(a), l), dtype=np.int64)
    d_kl[np.arange(len(a)), a] = -1
    d_kl[np.arange(len(a)), x] = 1
    return d_kl


def _neighbours(c_l: np.ndarray, d_kl: np.ndarray, ranks: int, two: bool) -> np.ndarray:
    """The count vectors one copy move (d_kl) from c_l, and two moves where `two`."""
    near_kl = c_l + d_kl
    if not two:
        return near_kl
    far_kl = (near_kl[:, None] + d_kl).reshape(-1, len(c_l))
    far_kl = far_kl[(far_kl >= 1).all(-1) & (far_kl <= ranks).all(-1) & (far_kl != c_l).any(-1)]
    return np.unique(np.concatenate([near_kl, far_kl]), axis=0)


def _search_copies(lab_bps: np.ndarray, copies_bl: np.ndarray, load_bl: np.ndarray) -> None:
    """Blocks whose busiest rank is above the mean, while few enough count vectors are near
    (SEARCH_WORK): steepest descent over the copy counts. Each round places (packs and refines)
    the count vectors one copy move (two, where that fits too) from a block's current one and
    keeps the best if it lowers (busiest rank, then sum of squared rank loads); in place. Where
    a slot is a large share of a rank this finds what single moves miss (which experts to copy
    when two copies halve an expert over two ranks; light experts as fillers)."""
    ranks = lab_bps.shape[1]
    n = lab_bps[0].size
    top, sq = _score(lab_bps, copies_bl, load_bl)
    act = np.flatnonzero(top > load_bl.sum(-1) / ranks * (1 + 1e-3))
    while len(act):
        d = [_moves(copies_bl[k], ranks) for k in act]
        if sum(len(x) for x in d) * n > SEARCH_WORK:
            return
        two = sum(len(x) ** 2 for x in d) * n <= SEARCH_WORK
        near = [_neighbours(copies_bl[k], x, ranks, two) for k, x in zip(act, d)]
        own = np.repeat(act, [len(c) for c in near])
        if not len(own):
            return
        c_kl = np.concatenate(near)
        lab_k = _place(load_bl[own], c_kl, ranks)
        top_k, sq_k = _score(lab_k, c_kl, load_bl[own])
        order = np.lexsort((sq_k, top_k, own))
        blk, first = np.unique(own[order], return_index=True)
        k = order[first]
        better = ((top_k[k] < top[blk] * (1 - 1e-9))
                  | ((top_k[k] <= top[blk] * (1 + 1e-9)) & (sq_k[k] < sq[blk] * (1 - 1e-9))))
        act, k = blk[better], k[better]
        lab_bps[act], copies_bl[act], top[act], sq[act] = lab_k[k], c_kl[k], top_k[k], sq_k[k]


def hierarchical(n_experts: int, slots_per_rank: int, n_group: int, nodes: int) -> bool:
    """Whether `balance` keeps each expert group on one node: nodes > 1 divides the groups and
    a rank's slots fit in a node's experts."""
    return nodes > 1 and n_group % nodes == 0 and slots_per_rank <= n_experts // nodes


def balance(load_le: np.ndarray, ep: int, redundant: int, n_group: int, nodes: int = 1
            ) -> np.ndarray:
    """The placement for per-layer expert load load_le [L, E]: slots_lrs [L, ep, (E + R) / ep],
    the logical expert in each physical slot, ascending within a rank, no rank holding an expert
    twice. Hierarchical where `hierarchical` says so, global otherwise."""
    load_le = np.asarray(load_le, dtype=np.float64)
    if load_le.ndim != 2 or not np.isfinite(load_le).all() or (load_le < 0).any():
        raise BalanceError("expert load: need finite counts >= 0, one row of E per MoE layer")
    nl, e = load_le.shape
    n_phy = e + redundant
    if redundant < 0:
        raise BalanceError(f"parallel.redundant_experts: must be >= 0, got {redundant}")
    if not 1 <= ep <= n_phy:
        raise BalanceError(f"parallel.ep: must be from 1 to the {n_phy} physical experts ({e} "
                           f"routed + {redundant} redundant), got {ep}")
    if n_phy % ep:
        raise BalanceError(f"parallel.ep: {n_phy} physical experts ({e} routed + {redundant} "
                           f"redundant) do not divide over ep={ep} ranks")
    per = n_phy // ep
    if per > e:
        raise BalanceError(f"parallel.redundant_experts: {per} slots per rank exceed the {e} "
                           f"routed experts (a rank would hold an expert twice)")
    if n_group < 1 or e % n_group:
        raise BalanceError(f"n_group: {e} routed experts do not divide into {n_group} groups")
    if nodes < 1 or ep % nodes:
        raise BalanceError(f"parallel.ranks_per_node: ep={ep} ranks do not divide over "
                           f"{nodes} nodes")
    if not hierarchical(e, per, n_group, nodes):
        n_group = nodes = 1
    rpn, e_node, g_size = ep // nodes, e // nodes, e // n_group
    # 1) whole groups onto nodes; log_lnx: node n's logical experts, group by group
    node_lg, pos_lg = balanced_packing(load_le.reshape(nl, n_group, g_size).sum(-1), nodes)
    group_lk = np.argsort(node_lg * (n_group // nodes) + pos_lg, axis=-1)
    log_lnx = (group_lk[..., None] * g_size + np.arange(g_size)).reshape(nl, nodes, e_node)
    load_lnx = np.take_along_axis(load_le, log_lnx.reshape(nl, e), -1).reshape(nl, nodes, e_node)
    # 2) replicate within each node; 3) pack the node's physical experts onto its ranks
    _, copies_lnx = replicate(load_lnx, n_phy // nodes, max_copies=rpn)
    load_bx = load_lnx.reshape(nl * nodes, e_node)
    copies_bx = copies_lnx.reshape(nl * nodes, e_node)
    lab_bps = _place(load_bx, copies_bx, rpn)
    _search_copies(lab_bps, copies_bx, load_bx)
    local_ln_rs = lab_bps.reshape(nl, nodes, rpn * per)
    slots_lrs = np.take_along_axis(log_lnx, local_ln_rs, -1).reshape(nl, ep, per)
    return np.sort(slots_lrs, axis=-1)


def predicted_load(slots_lrs, load_le: np.ndarray) -> np.ndarray:
    """Each rank's load [L, ep] under slots_lrs, an expert's load split evenly over its copies.
    slots_lrs: [L, ep, slots] expert ids, or nested lists whose ranks hold different numbers
    of experts (a placement before a rebalance)."""
    load_le = np.asarray(load_le, dtype=np.float64)
    nl, e = load_le.shape
    try:
        slots = np.asarray(slots_lrs, dtype=np.int64)
    except ValueError:  # ragged: ranks hold different numbers of experts
        out = np.zeros((nl, len(slots_lrs[0])))
        for i, ranks in enumerate(slots_lrs):
            copies_e = np.zeros(e)
            for held in ranks:
                np.add.at(copies_e, held, 1)
            for r, held in enumerate(ranks):
                out[i, r] = (load_le[i, held] / copies_e[held]).sum()
        return out
    flat = slots.reshape(nl, -1)
    copies_le = np.zeros((nl, e), dtype=np.int64)
    np.add.at(copies_le, (np.arange(nl)[:, None], flat), 1)
    share_le = load_le / np.maximum(copies_le, 1)
    return np.take_along_axis(share_le, flat, -1).reshape(slots.shape).sum(-1)


def contiguous_load(load_le: np.ndarray, ep: int) -> np.ndarray:
    """Each rank's load [L, ep] under the default placement: expert j on rank j * ep // E."""
    load_le = np.asarray(load_le, dtype=np.float64)
    e = load_le.shape[-1]
    onehot_er = (np.arange(e)[:, None] * ep // e == np.arange(ep)).astype(np.float64)
    return load_le @ onehot_er


def max_over_mean(rank_load: np.ndarray) -> np.ndarray:
    """Busiest rank over the mean, along the last axis (1 where there is no load)."""
    rank_load = np.asarray(rank_load, dtype=np.float64)
    mean = rank_load.mean(-1)
    return np.where(mean > 0, rank_load.max(-1) / np.where(mean > 0, mean, 1), 1.0)


def overall_max_over_mean(rank_load_lr: np.ndarray) -> float:
    """Over all layers: the sum of the busiest ranks' loads over the sum of the means (a step's
    expert time over its time if every layer were perfectly balanced)."""
    mean = float(rank_load_lr.mean(-1).sum())
    return float(rank_load_lr.max(-1).sum()) / mean if mean > 0 else 1.0


# ---- the command ------------------------------------------------------------------------
def default_out(load_path: Path) -> Path:
    """`X.expert_load.json` -> `X.placement.json`; any other `X.json` -> `X.placement.json`."""
    name = load_path.name
    for suffix in (".expert_load.json", ".json"):
        if name.endswith(suffix):
            return load_path.with_name(name[: -len(suffix)] + ".placement.json")
    return load_path.with_name(name + ".placement.json")


def read_load(path: Path, n_experts: int, window: bool) -> dict[int, list[float]]:
    """Layer id -> per-expert counts from an expert-load file ("total", or "window")."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BalanceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BalanceError(f"{path}: cannot read: {e}") from None
    except ValueError as e:
        raise BalanceError(f"{path}: not JSON ({e})") from None
    tag = raw.get("format") if isinstance(raw, dict) else None
    if tag != LOAD_FORMAT:
        raise BalanceError(f"{path}: format {tag!r}, want {LOAD_FORMAT!r} (an expert-load file "
                           f"a job writes)")
    if raw.get("n_routed_experts") != n_experts:
        raise BalanceError(f"{path}: n_routed_experts={raw.get('n_routed_experts')!r}, but the "
                           f"model has {n_experts} routed experts (model=... or model.path=...)")
    key = "window" if window else "total"
    counts = raw.get(key)
    if not isinstance(counts, dict) or not counts:
        raise BalanceError(f"{path}: {key!r}: no per-layer counts")
    out = {}
    for layer, row in counts.items():
        ok = (isinstance(row, list) and len(row) == n_experts
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                      for x in row))
        if not (layer.isdigit() and ok):
            raise BalanceError(f"{path}: {key}[{layer!r}]: want {n_experts} counts >= 0 for a "
                               f"layer id")
        out[int(layer)] = [float(x) for x in row]
    return out


def _settings(overrides: list[str]) -> tuple[Any, int, int, int]:
    """(model config, ep, redundant, nodes) from the launch's config with the overrides."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ds3dist.jobs import schema

    try:
        with initialize_config_module(config_module="ds3dist.conf", version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise BalanceError(" ".join(f"config: {e} {e.__cause__ or ''}".split())) from None
    try:
        model = schema.model_config(cfg)
    except ValueError as e:
        raise BalanceError(str(e)) from None
    p = cfg.parallel
    ep, redundant, rpn = p.ep, p.redundant_experts, p.ranks_per_node
    if rpn is None or rpn >= ep:
        return model, ep, redundant, 1
    if rpn < 1 or ep % rpn:
        raise BalanceError(f"parallel.ranks_per_node: {rpn} does not divide ep={ep}")
    return model, ep, redundant, ep // rpn


def _dumps(doc: dict) -> str:
    """JSON with one line per layer."""
    lines = []
    for k, v in doc.items():
        if k in ("layers", "predicted"):
            rows = ",\n".join(f"  {json.dumps(i)}: {json.dumps(x)}" for i, x in v.items())
            lines.append(f" {json.dumps(k)}: {{\n{rows}\n }}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def run(load_path: Path, out: Path | None, window: bool, overrides: list[str]) -> Path:
    """Balance the load file's layers for the composed config; write and return the placement."""
    from ds3dist.jobs.errors import JobError
    from ds3dist.jobs.records import write_atomic

    model, ep, redundant, nodes = _settings(overrides)
    e = model.n_routed_experts
    counts = read_load(load_path, e, window)
    moe = {i for i in range(model.num_hidden_layers + model.num_nextn_predict_layers)
           if model.is_moe_layer(i)}
    stray = sorted(set(counts) - moe)
    missing = sorted(i for i in moe - set(counts) if i < model.num_hidden_layers)
    if stray or missing:
        raise BalanceError(f"{load_path}: " + ("; ".join(
            ([f"layers {stray[:8]} are not MoE layers of the model"] if stray else [])
            + ([f"MoE layers {missing[:8]} have no counts"] if missing else []))))
    layers = sorted(counts)
    load_le = np.array([counts[i] for i in layers])
    slots_lrs = balance(load_le, ep, redundant, model.n_group, nodes)
    before_lr, after_lr = contiguous_load(load_le, ep), predicted_load(slots_lrs, load_le)
    before_l, after_l = max_over_mean(before_lr), max_over_mean(after_lr)
    predicted = {str(i): {"before": round(float(b), 4), "after": round(float(a), 4)}
                 for i, b, a in zip(layers, before_l, after_l)}
    predicted["overall"] = {"before": round(overall_max_over_mean(before_lr), 4),
                            "after": round(overall_max_over_mean(after_lr), 4)}
    out = out or default_out(load_path)
    doc = {"format": PLACEMENT_FORMAT, "n_routed_experts": e, "ep": ep,
           "redundant_experts": redundant,
           "layers": {str(i): s.tolist() for i, s in zip(layers, slots_lrs)},
           "predicted": predicted, "source": str(load_path), "window": window}
    try:
        write_atomic(out, _dumps(doc), "--out")
    except JobError as err:
        raise BalanceError(str(err)) from None
    policy = (f"hierarchical: {model.n_group} groups over {nodes} nodes"
              if hierarchical(e, slots_lrs.shape[-1], model.n_group, nodes) else "global")
    print(f"max/mean rank load (ep={ep}, {e} experts + {redundant} redundant, {policy}):")
    print(f"{'layer':>8} {'before':>8} {'after':>8}")
    for key, v in predicted.items():
        print(f"{key:>8} {v['before']:8.3f} {v['after']:8.3f}")
    print(f"placement: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ds3dist.balance",
        description="Place routed experts (with redundant copies) on expert-parallel ranks "
                    "from a job's measured expert load.")
    ap.add_argument("load", help="expert-load file a job wrote (*.expert_load.json)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for ds3dist.launch "
                    "(+parallel=ep4 parallel.redundant_experts=4 model=...)")
    ap.add_argument("--out", default=None, help="placement file (default: beside LOAD, "
                    "*.placement.json)")
    ap.add_argument("--window", action="store_true",
                    help="balance the last window of steps instead of the whole job")
    a = ap.parse_intermixed_args(argv)
    try:
        run(Path(a.load), None if a.out is None else Path(a.out), a.window, a.overrides)
    except BalanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
