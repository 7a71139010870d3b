"""Engine throughput on a local CPU Ray cluster: compiled graph vs classic actor calls, next
to the same serving loop in one process.

    python benchmarks/bench_engine.py [--preset tiny] [--layouts pp1ep1,pp2,pp2ep2]
                                      [--controls compiled,classic] [--batch 8]

Per layout and control plane: prefill tok/s (batch x prompt-len, 1 new token) and decode
ms/step (the rest of new-tokens greedy steps); the first and last rows are one process
(LocalEngine), before and after the engines.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import ray
import torch

import ds3dist
from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.local import LocalEngine
from ds3dist.runtime.options import RuntimeOptions
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime.engine import Engine
from ds3dist.runtime.hostmem import retain_freed_memory
from ds3dist.core.options import ServingOptions

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")  # as ds3dist.runtime.cluster starts it


def parse_layout(s: str) -> ParallelLayout:
    pp, ep = (re.search(rf"{k}(\d+)", s) for k in ("pp", "ep"))
    return ParallelLayout(pp=int(pp.group(1)) if pp else 1, ep=int(ep.group(1)) if ep else 1)


def timed(engine, prompts: list[list[int]], new_tokens: int, **sampling
          ) -> tuple[float, float, list]:
    """(prefill seconds, decode seconds per step, the decode run's results)."""
    engine.generate(prompts[:2], max_new_tokens=2, **sampling)  # warm-up
    t0 = time.perf_counter()
    engine.generate(prompts, max_new_tokens=1, **sampling)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new_tokens + 1, **sampling)
    return t_prefill, max(time.perf_counter() - t0 - t_prefill, 1e-9) / new_tokens, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--layouts", default="pp1ep1,pp2,pp2ep2")
    ap.add_argument("--controls", default="compiled,classic")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--execution", default="bf16")
    args = ap.parse_args()

    ckpt = args.checkpoint or synthesize(Path(tempfile.mkdtemp()) / args.preset,
                                         preset=args.preset, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    print(f"{'layout':8} {'control':9} {'prefill tok/s':>14} {'decode ms/step':>15}")
    torch.set_num_threads(os.cpu_count() or 1)
    retain_freed_memory()  # as the engine's ranks and the one-process launch do
    model = ds3dist.load_model(ckpt, execution=args.execution, mtp=False)
    local = LocalEngine(model, None, ServingOptions(cache_gb=1.0))

    def run_local(name: str) -> None:
        t_pre, t_step, _ = timed(local, prompts, args.new_tokens)
        print(f"{name:8} {'-':9} {args.batch * args.prompt_len / t_pre:14.0f} "
              f"{1000 * t_step:15.1f}", flush=True)

    run_local("local")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    for lay in args.layouts.split(","):
        layout = parse_layout(lay)
        cpus = max(1, (os.cpu_count() or 1) // layout.world_size)
        for control in args.controls.split(","):
            with Engine(ckpt, layout, execution=args.execution,
                        runtime=RuntimeOptions(cpus_per_rank=cpus),
                        serving=ServingOptions(control=control, cache_gb=1.0)) as engine:
                t_pre, t_step, _ = timed(engine, prompts, args.new_tokens)
            print(f"{lay:8} {control:9} {args.batch * args.prompt_len / t_pre:14.0f} "
                  f"{1000 * t_step:15.1f}", flush=True)
    ray.shutdown()
    run_local("local")  # again: a 2-core machine drifts, this brackets the engine rows


if __name__ == "__main__":
    main()
