"""The expert-parallel load balancer (ds3dist.balance): its parts on hand-computed cases, its
placements against an exhaustive search on small cases, the release's shape, and the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ds3dist.balance import (BalanceError, _pack_distinct, balance, balanced_packing,
                             contiguous_load, default_out, hierarchical, main, max_over_mean,
                             overall_max_over_mean, predicted_load, replicate)
from ds3dist.config import preset
from ds3dist.parallel.placement import Placement

REPO = Path(__file__).resolve().parents[1]


# ---- parts --------------------------------------------------------------------------------
def test_replicate_gives_copies_to_the_largest_load_per_copy():
    phy, copies = replicate(np.array([10.0, 1, 4, 4]), 7)  # 10 -> 5 -> 3.33, then 4 (id 2)
    assert phy.tolist() == [0, 1, 2, 3, 0, 0, 2] and copies.tolist() == [3, 1, 2, 1]
    phy, copies = replicate(np.array([5.0, 5, 5]), 5)  # ties: lowest id
    assert phy.tolist() == [0, 1, 2, 0, 1] and copies.tolist() == [2, 2, 1]
    _, copies = replicate(np.array([10.0, 1]), 4, max_copies=2)
    assert copies.tolist() == [2, 2]
    _, copies = replicate(np.array([[10.0, 1, 1], [1, 1, 10]]), 5)  # one row per layer
    assert copies.tolist() == [[3, 1, 1], [1, 1, 3]]
    with pytest.raises(BalanceError):
        replicate(np.array([1.0, 1]), 5, max_copies=2)


def test_balanced_packing_greedy():
    pack, index = balanced_packing(np.array([5.0, 4, 3, 3, 2, 1]), 2)
    # 5 -> p0, 4 -> p1, 3 -> p1 (7), 3 -> p0 (8), 2 -> p1 (9, full), 1 -> p0 (9)
    assert pack.tolist() == [0, 1, 1, 0, 1, 0] and index.tolist() == [0, 0, 1, 1, 2, 2]
    pack, index = balanced_packing(np.array([1.0, 1, 1, 1]), 2)  # ties: lowest pack
    assert pack.tolist() == [0, 1, 0, 1] and index.tolist() == [0, 0, 1, 1]
    pack, _ = balanced_packing(np.array([[1.0, 9, 2, 8], [9, 1, 8, 2]]), 2)
    assert pack.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    with pytest.raises(BalanceError):
        balanced_packing(np.array([1.0, 2, 3]), 2)


def test_packing_never_puts_two_copies_on_a_rank():
    # heavy first: 10 -> r0; 1, 1, 1 fill r1; expert 4's copies then only fit r0, twice: one of
    # r1's items moves to r0 to make room on r1
    lab = _pack_distinct(np.array([[10.0, 1, 1, 1, 0.5, 0.5]]), np.array([[0, 1, 2, 3, 4, 4]]),
                         2, 5)[0]
    assert all(len(set(r)) == len(r) == 3 for r in lab.tolist())
    assert sorted(lab.ravel().tolist()) == [0, 1, 2, 3, 4, 4]


def test_predicted_load_splits_an_expert_over_its_copies():
    load_le = np.array([[8.0, 2, 4, 6]])
    slots_lrs = np.array([[[0, 1], [0, 2], [0, 3]]])  # expert 0 thrice: 8/3 each
    assert np.allclose(predicted_load(slots_lrs, load_le), [[8 / 3 + 2, 8 / 3 + 4, 8 / 3 + 6]])
    before = contiguous_load(load_le, 2)  # experts 0, 1 on rank 0; 2, 3 on rank 1
    assert before.tolist() == [[10.0, 10.0]]
    assert max_over_mean(np.array([[1.0, 3], [0, 0]])).tolist() == [1.5, 1.0]
    assert overall_max_over_mean(np.array([[1.0, 3], [2, 2]])) == pytest.approx(5 / 4)


# ---- against an exhaustive search -----------------------------------------------------------
def _partitions(n: int, packs: int) -> np.ndarray:
    """Every split of range(n) into `packs` unordered groups of n / packs: [K, packs, n/packs]."""
    out = []

    def rec(rest: list[int], groups: list[tuple[int, ...]]) -> None:
        if not rest:
            out.append(groups)
            return
        for comb in itertools.combinations(rest[1:], n // packs - 1):
            rec([x for x in rest[1:] if x not in comb], groups + [(rest[0], *comb)])

    rec(list(range(n)), [])
    return np.array(out)


def _optimum(load_e: np.ndarray, ep: int, redundant: int, parts: np.ndarray) -> float:
    """The lowest busiest-rank load over every copy count vector (each 1..ep, summing to
    E + R) and every split of the copies over the ranks with no rank holding an expert twice."""
    e = len(load_e)
    best = np.inf
    for bars in itertools.combinations(range(1, e + redundant), e - 1):
        c = np.diff((0, *bars, e + redundant))
        if c.max() > ep:
            continue
        lab_krs = np.sort(np.repeat(np.arange(e), c)[parts], -1)
        ok = ~(lab_krs[..., 1:] == lab_krs[..., :-1]).any((-1, -2))
        w_n = np.repeat(load_e / c, c)
        best = min(best, w_n[parts[ok]].sum(-1).max(-1).min(initial=np.inf))
    return best


SMALL = [(6, 2, 0), (6, 2, 2), (6, 3, 0), (6, 4, 2), (7, 2, 1), (7, 3, 2), (8, 2, 0), (8, 2, 2),
         (8, 4, 0), (8, 3, 1), (6, 3, 3), (7, 4, 1), (8, 5, 2)]  # (E, ep, R)


def test_small_cases_within_5_percent_of_the_optimum():
    rng = np.random.default_rng(1234)
    parts = {}
    ratios, worst = [], (0.0, None)
    for k in range(600):
        e, ep, r = SMALL[k % len(SMALL)]
        load_e = [rng.integers(0, 100, e),  # uniform
                  np.round(rng.pareto(1.0, e) * 20),  # heavy-tailed
                  rng.integers(0, 10, e) ** 3][k % 3].astype(np.float64)  # skewed, with zeros
        if not load_e.any():
            continue
        slots = balance(load_e[None], ep, r, n_group=1)
        got = predicted_load(slots, load_e[None])[0].max()
        opt = _optimum(load_e, ep, r, parts.setdefault((e + r, ep), _partitions(e + r, ep)))
        ratios.append(got / opt)
        if got / opt > worst[0]:
            worst = (got / opt, (e, ep, r, load_e.tolist()))
    ratios = np.array(ratios)
    print(f"\n{len(ratios)} small cases: worst {worst[0]:.4f} of the optimum {worst[1]}, "
          f"{(ratios < 1 + 1e-9).mean():.0%} optimal")
    assert worst[0] <= 1.05


# ---- structure ------------------------------------------------------------------------------
@pytest.mark.parametrize("e,ep,r,n_group,nodes", [
    (16, 4, 4, 4, 1), (16, 4, 4, 4, 2), (16, 4, 0, 4, 4), (16, 8, 16, 4, 2), (16, 2, 14, 4, 2),
    (64, 8, 8, 8, 2), (64, 8, 8, 8, 4), (24, 6, 6, 8, 3), (12, 3, 3, 4, 3)])
def test_every_placement_is_well_formed(e, ep, r, n_group, nodes):
    rng = np.random.default_rng(e * 1000 + ep * 100 + r + nodes)
    load_le = np.concatenate([rng.pareto(1.0, (3, e)) * 100, np.zeros((1, e)),
                              np.eye(1, e) * 1000, rng.integers(0, 5, (2, e))])
    slots_lrs = balance(load_le, ep, r, n_group, nodes)
    assert slots_lrs.shape == (len(load_le), ep, (e + r) // ep)
    for slots_rs in slots_lrs:
        assert all(list(s) == sorted(set(s)) for s in slots_rs.tolist())  # ascending, no twice
        assert set(slots_rs.ravel().tolist()) == set(range(e))  # every expert has a copy
        if hierarchical(e, (e + r) // ep, n_group, nodes):  # a group's copies on one node
            nodes_of_group = {}
            for rank, s in enumerate(slots_rs.tolist()):
                for x in s:
                    nodes_of_group.setdefault(x // (e // n_group), set()).add(rank // (ep // nodes))
            assert all(len(v) == 1 for v in nodes_of_group.values())


def test_impossible_settings_fail_naming_them():
    load = np.ones((1, 16))
    for args, key in [((4, 3, 4), "parallel.ep"), ((32, 0, 4), "parallel.ep"),
                      ((4, -1, 4), "parallel.redundant_experts"),
                      ((2, 20, 4), "parallel.redundant_experts"), ((4, 4, 3), "n_group")]:
        with pytest.raises(BalanceError, match=key):
            balance(load, *args)
    with pytest.raises(BalanceError, match="ranks_per_node"):
        balance(load, 4, 4, 4, nodes=3)
    with pytest.raises(BalanceError, match="expert load"):
        balance(-load, 4, 4, 4)


def test_release_shape():
    rng = np.random.default_rng(0)
    load_le = rng.lognormal(0, 1, (58, 256)) * 1000  # hottest expert ~10x the mean
    for nodes in (4, 1):
        t0 = time.perf_counter()
        slots_lrs = balance(load_le, 32, 32, 8, nodes)
        dt = time.perf_counter() - t0
        before = overall_max_over_mean(contiguous_load(load_le, 32))
        after = overall_max_over_mean(predicted_load(slots_lrs, load_le))
        print(f"\nrelease shape, {'hierarchical, 4 nodes' if nodes > 1 else 'global'}: "
              f"{dt:.3f} s, max/mean {before:.3f} -> {after:.4f}")
        assert slots_lrs.shape == (58, 32, 9) and after < before


# ---- the command ----------------------------------------------------------------------------
def _load_file(path: Path, **change) -> Path:
    rng = np.random.default_rng(7)
    total = {str(i): rng.integers(0, 1000, 16).tolist() for i in (1, 2)}
    window = {str(i): (np.arange(16) ** 2).tolist() for i in (1, 2)}
    doc = {"format": "ds3dist.expert_load/1", "n_routed_experts": 16, "total": total,
           "window": window, "window_steps": 1000,
           "layout": {"pp": 1, "ep": 4, "placement": None}, **change}
    path.write_text(json.dumps(doc))
    return path


def test_cli_writes_a_placement_the_engine_reads(tmp_path, capsys):
    load = _load_file(tmp_path / "run.jsonl.expert_load.json")
    assert main([str(load), "+parallel=ep4", "parallel.redundant_experts=4"]) == 0
    out = tmp_path / "run.jsonl.placement.json"
    printed = capsys.readouterr().out
    assert all(w in printed for w in ("before", "after", "overall", str(out)))
    doc = json.loads(out.read_text())
    assert (doc["format"], doc["n_routed_experts"], doc["ep"], doc["redundant_experts"],
            doc["window"], doc["source"]) == ("ds3dist.placement/1", 16, 4, 4, False, str(load))
    assert sorted(doc["layers"]) == ["1", "2"] and all(len(r) == 5 for r in doc["layers"]["1"])
    p = doc["predicted"]
    assert set(p) == {"1", "2", "overall"} and p["overall"]["after"] < p["overall"]["before"]
    Placement.load(out).check(preset("tiny"), 4)
    # the window, hierarchical over 2 nodes of 2 ranks, to a named file
    named = tmp_path / "w.json"
    assert main([str(load), "--window", "--out", str(named), "+parallel=ep4",
                 "parallel.redundant_experts=4", "parallel.ranks_per_node=2"]) == 0
    doc = json.loads(named.read_text())
    assert doc["window"] is True and doc["layers"] != json.loads(out.read_text())["layers"]
    assert "hierarchical: 4 groups over 2 nodes" in capsys.readouterr().out


def test_cli_default_out():
    assert default_out(Path("d/run.jsonl.expert_load.json")) == Path("d/run.jsonl.placement.json")
    assert default_out(Path("load.json")) == Path("load.placement.json")
    assert default_out(Path("load")) == Path("load.placement.json")


@pytest.mark.parametrize("change,args,message", [
    (None, [], "no such file"),
    ("not json", [], "not JSON"),
    ({"format": "ds3dist.other/1"}, [], "format 'ds3dist.other/1'"),
    ({"n_routed_experts": 8}, [], "n_routed_experts=8"),
    ({"total": {"1": [1, 2]}}, [], "total['1']"),
    ({"total": {"1": [1] * 16}}, [], "MoE layers [2] have no counts"),
    ({"total": {"0": [1] * 16, "1": [1] * 16, "2": [1] * 16}}, [], "[0] are not MoE layers"),
    ({}, ["parallel.ep=4", "parallel.redundant_experts=3"], "parallel.ep: 19 physical"),
    ({}, ["parallel.ep=32"], "parallel.ep"),
    ({}, ["parallel.ep=4", "parallel.ranks_per_node=3"], "parallel.ranks_per_node"),
    ({}, ["parallel.epp=4"], "parallel.epp"),
    ({}, ["model=small"], "64 routed experts"),
])
def test_cli_bad_inputs_exit_2(tmp_path, capsys, change, args, message):
    load = tmp_path / "x.expert_load.json"
    if isinstance(change, str):
        load.write_text(change)
    elif change is not None:
        _load_file(load, **change)
    assert main([str(load), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.placement.json").exists()


def test_cli_module_entry(tmp_path):
    load = _load_file(tmp_path / "a.expert_load.json")
    r = subprocess.run([sys.executable, "-m", "ds3dist.balance", str(load), "parallel.ep=4",
                        "parallel.redundant_experts=-1"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: parallel.redundant_experts: must")
