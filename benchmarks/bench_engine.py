"""Engine throughput on a local CPU Ray cluster, and stage-to-stage transfer: Ray objects vs p2p.

    python benchmarks/bench_engine.py [--preset tiny] [--layouts pp2,pp2ep2] [--batch 8]

Prints prefill and decode tokens/s per layout and transfer mode (same machine, same run).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def parse_layout(s: str):
    from ds3dist.parallel.layout import ParallelLayout

    pp = ep = 1
    for part in ("pp", "ep"):
        if part in s:
            digits = s.split(part, 1)[1]
            n = ""
            for ch in digits:
                if not ch.isdigit():
                    break
                n += ch
            if part == "pp":
                pp = int(n)
            else:
                ep = int(n)
    return ParallelLayout(pp=pp, ep=ep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--layouts", default="pp2,pp2ep2")
    ap.add_argument("--transfers", default="ray,p2p")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--execution", default="bf16")
    args = ap.parse_args()

    import ray

    from ds3dist.checkpoint.synthesize import synthesize
    from ds3dist.runtime.engine import Engine

    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = Path(tempfile.mkdtemp()) / args.preset
        synthesize(ckpt, preset=args.preset, seed=0)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    print(f"{'layout':8} {'transfer':8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8}")
    for lay in args.layouts.split(","):
        for transfer in args.transfers.split(","):
            layout = parse_layout(lay)
            if layout.pp == 1 and transfer == "p2p":
                continue
            with Engine(ckpt, layout, execution=args.execution, transfer=transfer) as engine:
                engine.generate(prompts[:2], max_new_tokens=2)  # warm-up
                t0 = time.perf_counter()
                engine.generate(prompts, max_new_tokens=1)
                t_prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                engine.generate(prompts, max_new_tokens=args.new_tokens + 1)
                t_all = time.perf_counter() - t0
            t_decode = max(t_all - t_prefill, 1e-9)
            dec = args.batch * args.new_tokens / t_decode
            print(f"{lay:8} {transfer:8} {args.batch * args.prompt_len / t_prefill:14.0f} "
                  f"{dec:13.1f} {1000 * t_decode / args.new_tokens:8.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
