"""Expert load balancing on a skewed workload: unbalanced, statically balanced, rebalancing.

    python benchmarks/bench_eplb.py [--preset tiny] [--skew 1.2] [--ep 4] [--redundant 4]
                                    [--requests 24] [--new-tokens 24] [--interval 8]

Synthesizes a checkpoint whose router follows a Zipf law (synthesize --expert-skew), then runs
the same greedy job (float32, CPU) on an ep-rank engine three ways: the default contiguous
placement; a placement the balancer made from the first run's load (--redundant copies); and
the default placement rebalanced every --interval steps from the window of load (the experts
a rank gains read from the checkpoint, then sent by their holders: both timed). Prints, per
MoE layer, the measured max/mean rank load (token copies each rank's experts received), the
balancer's prediction for the static placement, each run's tokens/s, per-rank busy seconds
(max/mean), and the rebalances' pauses. Asserts nothing (the outputs are checked equal, as
balancing must never change them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rank_load(stats, ep: int) -> dict[int, list[int]]:
    """Per MoE layer, the token copies each ep rank received (summed over stages' ranks)."""
    out: dict[int, list[int]] = {}
    for st in stats.ranks:
        for layer, d in st.dispatch.items():
            out.setdefault(layer, [0] * ep)[st.ep_rank] += sum(d["received_per_expert"])
    return out


def ratio(row) -> float:
    row = np.asarray(row, dtype=np.float64)
    return float(row.max() / row.mean()) if row.mean() > 0 else 1.0


def run(ckpt: Path, layout, prompts, new: int, balance=None):
    from ds3dist import Engine
    from ds3dist.core.options import ServingOptions

    with Engine(ckpt, layout, dtype=torch.float32, balance=balance,
                serving=ServingOptions(max_seqs=64)) as engine:
        engine.generate(prompts[:2], max_new_tokens=2)  # warm-up
        before = engine.stats()
        t0 = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=new)
        seconds = time.perf_counter() - t0
        stats = engine.stats()
    tokens = sum(len(o.token_ids) for o in out)
    load = rank_load(stats, layout.ep)
    warm = rank_load(before, layout.ep)
    load = {i: [a - b for a, b in zip(row, warm[i])] for i, row in load.items()}
    window: dict[int, list[int]] = {}  # each rank's load over the ranks' last window
    for st in stats.ranks:
        for layer, counts in st.window_load.items():
            window.setdefault(layer, [0] * layout.ep)[st.ep_rank] += sum(counts)
    busy = [st.busy_seconds for st in stats.ranks]
    return {"tokens": [o.token_ids for o in out], "tok_s": tokens / seconds, "load": load,
            "window": window, "busy": max(busy) / (sum(busy) / len(busy)), "stats": stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--skew", type=float, default=1.2)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--interval", type=int, default=8)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ds3dist import balance
    from ds3dist.checkpoint.synthesize import synthesize
    from ds3dist.config import ModelConfig
    from ds3dist.core.engine import ExpertLoad
    from ds3dist.core.options import BalanceOptions
    from ds3dist.parallel.layout import ParallelLayout
    from ds3dist.parallel.placement import Placement

    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith("avx512")})
    print(f"[setup] {os.cpu_count()} CPUs, {' '.join(flags) or 'no AVX-512'}")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randint(8, 64))]
               for _ in range(a.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthesize(Path(tmp) / "skewed", a.preset, skew=a.skew, progress=False)
        cfg = ModelConfig.from_json(ckpt)
        base = run(ckpt, ParallelLayout(ep=a.ep), prompts, a.new_tokens)
        load_file = ExpertLoad(base["stats"].expert_load.per_layer).file()
        layers = sorted(int(i) for i in load_file["total"])
        load_le = np.array([load_file["total"][str(i)] for i in layers], dtype=np.float64)
        t0 = time.perf_counter()
        slots = balance.balance(load_le, a.ep, a.redundant, cfg.n_group)
        t_bal = time.perf_counter() - t0
        predicted = balance.predicted_load(slots, load_le)
        place = Placement(cfg.n_routed_experts, a.ep,
                          {i: tuple(tuple(int(x) for x in r) for r in s)
                           for i, s in zip(layers, slots)}, "bench")
        static = run(ckpt, ParallelLayout(ep=a.ep, placement=place), prompts, a.new_tokens)
        rebal, peers = (run(ckpt, ParallelLayout(ep=a.ep), prompts, a.new_tokens,
                            BalanceOptions(step_interval=a.interval, window=a.interval,
                                           redundant_experts=a.redundant, transfer=transfer))
                        for transfer in ("checkpoint", "peers"))
    same = base["tokens"] == static["tokens"] == rebal["tokens"] == peers["tokens"]
    print(f"\nskew {a.skew}, {a.preset}, ep{a.ep}, {a.redundant} redundant; outputs identical "
          f"in all four runs: {same}; balancer {t_bal * 1000:.1f} ms")
    print("max/mean rank load (token copies received) per MoE layer; rebalancing: the whole "
          "run (its first steps unbalanced, and prefill the bulk of the copies), and the ranks' "
          "last window")
    print(f"{'layer':>5} {'unbalanced':>11} {'static':>7} {'predicted':>9} {'rebalancing':>11} "
          f"{'last window':>11}")
    for j, i in enumerate(layers):
        print(f"{i:>5} {ratio(base['load'][i]):>11.3f} {ratio(static['load'][i]):>7.3f} "
              f"{ratio(predicted[j]):>9.3f} {ratio(rebal['load'][i]):>11.3f} "
              f"{ratio(rebal['window'][i]):>11.3f}")
    worst = max(ratio(static["load"][i]) for i in layers)
    off = max(abs(ratio(static["load"][i]) / ratio(predicted[j]) - 1) for j, i in enumerate(layers))
    print(f"static: worst layer max/mean {worst:.3f} (target <= 1.10); prediction off by at "
          f"most {off:.1%} (target 5%)")
    runs = (("unbalanced", base), ("static", static), ("rebalancing", rebal),
            ("rebalancing, peers", peers))
    for name, r in runs:
        print(f"{name:>18}: {r['tok_s']:.1f} tok/s, busy seconds max/mean over ranks "
              f"{r['busy']:.3f}")
    for rb in rebal["stats"].rebalances + peers["stats"].rebalances:
        print(f"rebalance at step {rb.step} ({rb.transfer}): pause {rb.pause_s:.2f} s, slowest "
              f"rank's move {rb.move_s:.3f} s, predicted {rb.before:.3f} -> {rb.after:.3f}, "
              f"{rb.experts_read} experts read ({rb.bytes_read / 1e6:.1f} MB), "
              f"{rb.experts_received} received")
    print(json.dumps({"same": same, "worst_static": worst, "prediction_off": off,
                      "tok_s": {k: r["tok_s"] for k, r in runs}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
