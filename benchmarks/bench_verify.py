"""`inspect --verify` against `sha256sum` over the same shard files, warm page cache.

Synthesizes a checkpoint (default: the `small` preset, 8 shards, ~1.8 GB) into a temporary
directory unless DIR is given, reads it once to warm the page cache, then runs
`sha256sum <shards>` and `python -m ds3dist.checkpoint.inspect --verify DIR` back to back,
each `--repeat` times, and prints the best wall time of each and their ratio.

    python benchmarks/bench_verify.py [DIR] [--preset small] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))


def _wall(cmd: list[str]) -> float:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


def bench(d: Path, repeat: int) -> None:
    shards = sorted(str(p) for p in d.glob("*.safetensors"))
    size = sum(Path(s).stat().st_size for s in shards)
    for s in shards:  # warm the page cache
        with open(s, "rb") as f:
            while f.read(64 << 20):
                pass
    cmds = {"sha256sum": ["sha256sum", *shards],
            "inspect --verify": [sys.executable, "-m", "ds3dist.checkpoint.inspect", "--verify",
                                 "--no-progress", str(d)]}
    best = {k: float("inf") for k in cmds}
    for _ in range(repeat):
        for k, cmd in cmds.items():  # back to back
            best[k] = min(best[k], _wall(cmd))
    print(f"{d}: {len(shards)} shards, {size / 1e9:.2f} GB")
    for k, t in best.items():
        print(f"  {k:18s} {t:7.2f} s  {size / t / 1e9:6.2f} GB/s")
    print(f"  ratio verify / sha256sum: {best['inspect --verify'] / best['sha256sum']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="checkpoint directory (default: synthesize one)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    if a.dir:
        bench(Path(a.dir), a.repeat)
        return 0
    from ds3dist.checkpoint.synthesize import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        synthesize(tmp / a.preset, preset=a.preset)
        bench(tmp / a.preset, a.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
