"""How often a request gets exactly the tokens it gets alone, when it shares steps with others.

    python benchmarks/bench_agreement.py [--checkpoint DIR] [--requests 44] [--dtypes bfloat16,float32]

On the tiny preset (synthesized unless --checkpoint is given), one process: a mixed workload
(prompts 1..3000 tokens, 1..64 new tokens, greedy and seeded sampling) is run once with every
request alone and once together (continuous batching, chunked prefill, a pool small enough to
preempt). Prints, per compute dtype, the share of requests whose tokens are identical and the
share of all tokens that agree up to each request's first difference. float32 gives 100%; in
bf16 the rows a GEMM holds change its rounding, so a few requests drift.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
from pathlib import Path

import torch

import ds3dist
from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.core.options import ServingOptions
from ds3dist.local import LocalEngine
from ds3dist.core.params import SamplingParams
from ds3dist.core.request import Request


def workload(n: int, seed: int = 7) -> list[tuple[str, list[int], SamplingParams, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = 1 if i == 0 else 3000 if i == 1 else int(math.exp(rng.uniform(0, math.log(3000))))
        params = SamplingParams(0.8, 0.9, 50, seed=rng.randrange(1000)) if i % 2 \
            else SamplingParams()
        out.append((f"r{i}", [rng.randrange(10, 100_000) for _ in range(length)], params,
                    rng.randint(1, 64)))
    return out


def agreement(model, specs) -> tuple[float, float]:
    def reqs():
        return [Request(i, list(p), sp, n) for i, p, sp, n in specs]

    alone = {}
    for r in reqs():
        (done,) = LocalEngine(model, None, ServingOptions(page_size=16), cache_pages=200).stream([r])
        alone[done.id] = done.output_ids
    eng = LocalEngine(model, None, ServingOptions(page_size=16, max_tokens_per_step=256,
                                                max_seqs=12), cache_pages=260)
    together = {r.id: r.output_ids for r in eng.stream(reqs())}
    same = sum(together[k] == v for k, v in alone.items())
    prefix = sum(next((j for j, (a, b) in enumerate(zip(v, together[k])) if a != b), len(v))
                 for k, v in alone.items())
    return same / len(alone), prefix / sum(len(v) for v in alone.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=44)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    ckpt = args.checkpoint or synthesize(Path(tempfile.mkdtemp()) / "tiny", preset="tiny")
    specs = workload(args.requests)
    print(f"{'dtype':10} {'requests identical':>19} {'tokens before a difference':>27}")
    for name in args.dtypes.split(","):
        model = ds3dist.load_model(ckpt, dtype=getattr(torch, name), mtp=False)
        same, prefix = agreement(model, specs)
        print(f"{name:10} {100 * same:18.1f}% {100 * prefix:26.1f}%", flush=True)


if __name__ == "__main__":
    main()
