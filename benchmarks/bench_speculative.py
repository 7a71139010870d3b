"""Speculative decoding with the MTP layer: decode speed against no speculation, one run.

    python benchmarks/bench_speculative.py [--preset small] [--batch 1 8] [--k 1 2 3]
        [--new-tokens 64] [--pp2] [--ckpt-dir DIR] [--out figures.json]

Prints figures, asserts nothing. Checkpoints (synthesized once, kept under --ckpt-dir):
- predictable: `synthesize(predictable=True)`, whose greedy next token is the current one
  + 1 and whose MTP module predicts it (acceptance near 100%);
- random: the usual random weights (acceptance near 0; reported only).

For each batch size: B prompts of 32 token ids, greedy, EOS ignored. Decode tok/s =
B x (N - 1) / (time for N new tokens - time for 1), N = --new-tokens, fastest of --repeats,
with k = 0 (no speculation) and each k; main-model steps per generated token, tokens per
step and acceptance per draft position from the engine's counters. One process
(LocalEngine, bf16, every core) and, with --pp2, the Ray engine on pp2 (one core per stage).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.local import LocalEngine
from ds3dist.runtime.options import RuntimeOptions
from ds3dist.model.load import load_model
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime.engine import Engine
from ds3dist.runtime.hostmem import retain_freed_memory
from ds3dist.core.options import ServingOptions
from ds3dist.core.options import SpeculativeConfig

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import default_ckpt_dir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pp2", action="store_true", help="also the Ray engine on pp2")
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--ckpt-dir", type=Path, default=default_ckpt_dir())
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def checkpoint(root: Path, preset: str, predictable: bool) -> Path:
    path = root / f"{preset}-seed0-fp8{'-predictable' if predictable else ''}"
    if not (path / "SHA256SUMS").exists():
        print(f"[setup] writing {path} ...", flush=True)
        synthesize(path, preset=preset, seed=0, predictable=predictable)
    return path


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, min(vocab, 100_000)) for _ in range(32)] for _ in range(batch)]


def measure(engine, ps: list[list[int]], n: int, repeats: int) -> dict:
    """Decode tok/s and the speculative counters of the N-token run."""
    engine.generate(ps, max_new_tokens=2)  # warm-up
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate(ps, max_new_tokens=1)
        t1 = time.perf_counter()
        engine.generate(ps, max_new_tokens=n)
        t2 = time.perf_counter()
        decode = (t2 - t1) - (t1 - t0)
        best = decode if best is None else min(best, decode)
    spec = engine.stats().speculative or {}
    return {"decode_tok_s": round(len(ps) * (n - 1) / best, 1), **spec}


def one_process(path: Path, batches, ks, n: int, repeats: int) -> list[dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(path, execution="bf16", mtp=True)
    rows = []
    for b in batches:
        ps = prompts(b, model.cfg.vocab_size)
        for k in [0, *ks]:
            eng = LocalEngine(model, cache_pages=8 * b + 8,
                              speculative=SpeculativeConfig(num_tokens=k) if k else None)
            rows.append({"engine": "one process", "batch": b, "k": k,
                         **measure(eng, ps, n, repeats)})
            print(rows[-1], flush=True)
    return rows


def pp2(path: Path, batches, ks, n: int, repeats: int) -> list[dict]:
    rows = []
    for k in [0, *ks]:
        spec = SpeculativeConfig(num_tokens=k) if k else None
        with Engine(path, ParallelLayout(pp=2), execution="bf16", speculative=spec,
                    serving=ServingOptions(cache_gb=0.5),
                    runtime=RuntimeOptions(cpus_per_rank=1)) as eng:
            for b in batches:
                rows.append({"engine": "pp2", "batch": b, "k": k,
                             **measure(eng, prompts(b, eng.config.vocab_size), n, repeats)})
                print(rows[-1], flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("=" * 92)
    print(f"{'weights':12s} {'engine':12s} {'batch':>5s} {'k':>2s} {'tok/s':>8s} {'x k=0':>6s} "
          f"{'steps/token':>11s} {'tokens/step':>11s}  acceptance per position")
    base = {(r["weights"], r["engine"], r["batch"]): r["decode_tok_s"] for r in rows if r["k"] == 0}
    for r in rows:
        ratio = r["decode_tok_s"] / base[(r["weights"], r["engine"], r["batch"])]
        print(f"{r['weights']:12s} {r['engine']:12s} {r['batch']:5d} {r['k']:2d} "
              f"{r['decode_tok_s']:8.1f} {ratio:6.2f} {r.get('steps_per_token') or 1.0:11.3f} "
              f"{r.get('tokens_per_step') or 1.0:11.3f}  {r.get('acceptance_per_position', '')}")
    print("=" * 92)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    retain_freed_memory()
    rows = []
    kinds = [("predictable", True)] + ([] if a.skip_random else [("random", False)])
    for name, predictable in kinds:
        path = checkpoint(a.ckpt_dir, a.preset, predictable)
        part = one_process(path, a.batch, a.k, a.new_tokens, a.repeats)
        if a.pp2 and predictable:
            part += pp2(path, a.batch, a.k, a.new_tokens, a.repeats)
        rows += [{"weights": name, **r} for r in part]
    print_table(rows)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
