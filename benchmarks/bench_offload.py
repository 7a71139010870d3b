"""Weight offload (execution.offload, DeepSpeed ZeRO-3) on a local CPU Ray cluster: resident
memory per rank and decode speed with and without offload, side by side in one run.

    python benchmarks/bench_offload.py [--preset small] [--layout pp1ep2] [--batch 8]
                                       [--variants none,nvme:layers,nvme:experts,cpu:layers]
                                       [--nvme-path DIR]

On a CPU the host memory is the compute device, so only NVMe offload lowers what a rank keeps
resident; CPU offload shows the cost of DeepSpeed's fetches alone. Per variant and rank: RSS
after a decode run, offloaded bytes, the fetch window (units fetched at once), and the check
that RSS fell by at least the offloaded bytes minus the window; then prefill tok/s and decode
tok/s. Greedy outputs are compared with the first variant's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import ray
import torch

from ds3dist import build_ops
from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.jobs.schema import cached_checkpoint_dir
from ds3dist.runtime.engine import Engine
from ds3dist.runtime.options import OffloadOptions, RuntimeOptions
from ds3dist.core.options import ServingOptions

from bench_engine import parse_layout, timed  # this folder is on sys.path when run as a script

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")  # as ds3dist.runtime.cluster starts it


def variant(spec: str, nvme_path: str) -> OffloadOptions | None:
    if spec == "none":
        return None
    device, params = spec.split(":")
    return OffloadOptions(device=device, params=params,
                          nvme_path=nvme_path if device == "nvme" else None)


def run(ckpt: Path, layout, opt: OffloadOptions | None, prompts, new_tokens: int, execution: str):
    cpus = max(1, (os.cpu_count() or 1) // layout.world_size)
    with Engine(ckpt, layout, execution=execution, offload=opt,
                runtime=RuntimeOptions(cpus_per_rank=cpus),
                serving=ServingOptions(cache_gb=0.5)) as engine:
        t_prefill, t_step, out = timed(engine, prompts, new_tokens, temperature=0.0)
        ranks = engine.stats().ranks
        load = engine.load_info
    return {"tokens": [o.token_ids for o in out], "rss": [r.rss_bytes for r in ranks],
            "offload": [i.offload for i in load],
            "prefill": len(prompts) * len(prompts[0]) / t_prefill,
            "decode": len(prompts) / t_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--layout", default="pp1ep2")
    ap.add_argument("--variants", default="none,nvme:layers,nvme:experts,cpu:layers")
    ap.add_argument("--nvme-path", default=None, help="default: a temporary directory")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--execution", default="bf16")
    args = ap.parse_args()

    layout = parse_layout(args.layout)
    ckpt = Path(args.checkpoint) if args.checkpoint else cached_checkpoint_dir(args.preset)
    if not (ckpt / "config.json").is_file():
        synthesize(ckpt, preset=args.preset, seed=0)
    nvme = args.nvme_path or tempfile.mkdtemp(prefix="ds3dist-bench-nvme-")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    specs = args.variants.split(",")
    for spec in specs:
        opt = variant(spec, nvme)
        if opt is not None:
            build_ops.for_ranks("cpu", opt)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    results = {spec: run(ckpt, layout, variant(spec, nvme), prompts, args.new_tokens,
                         args.execution) for spec in specs}
    ray.shutdown()
    base = results[specs[0]]
    print(f"\n{args.preset} {args.layout} {args.execution}, batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.new_tokens} decode steps; MB per rank")
    print(f"{'variant':13} {'rank':>4} {'RSS':>7} {'vs ' + specs[0]:>9} {'offloaded':>9} "
          f"{'window':>7} {'check':>6} {'prefill tok/s':>13} {'decode tok/s':>12} same")
    for spec, r in results.items():
        for rank, (rss, off) in enumerate(zip(r["rss"], r["offload"])):
            drop = base["rss"][rank] - rss
            offloaded, window = off.get("offloaded_bytes", 0), off.get("window_bytes", 0)
            ok = "ok" if not offloaded or drop >= offloaded - window else "FAIL"
            ok = ok if spec.startswith("nvme") or not offloaded else "-"
            print(f"{spec:13} {rank:>4} {rss / 2**20:7.0f} {-drop / 2**20:+9.0f} "
                  f"{offloaded / 2**20:9.0f} {window / 2**20:7.0f} {ok:>6} "
                  + (f"{r['prefill']:13.0f} {r['decode']:12.1f} "
                     f"{'yes' if r['tokens'] == base['tokens'] else 'NO'}" if rank == 0 else ""))


if __name__ == "__main__":
    main()
