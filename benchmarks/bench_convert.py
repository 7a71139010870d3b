"""Peak memory of the streaming converter against the shard sizes.

Synthesizes a checkpoint (default: the `small` preset, 8 shards) into a temporary directory
(in a child process, whose peak RSS is printed too), validates it, converts it to bf16 in a
child process and prints the child's peak RSS next to the largest
input and output shard (and the largest single tensor). A baseline child that only imports
the converter shows how much of the peak is the interpreter + torch.

    python benchmarks/bench_convert.py [--preset small] [--shards K] [--seed N] [--keep DIR]
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

MB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))


# The child reports its own VmHWM (peak RSS of its address space) from /proc/self/status.
# getrusage(RUSAGE_CHILDREN) / wait4 would not do: Linux carries the parent's RSS at fork
# time into the child's ru_maxrss across exec, so a big parent inflates every child's figure.
_CHILD = """
import sys
{body}
with open(sys.argv[1], "w") as f:
    f.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.exit(rc)
"""


def run_child(body: str, args: list[str], hwm_file: Path) -> tuple[int, float, float]:
    """Run `body` (sets rc) in a fresh python; return (exit status, peak RSS MB, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-c", _CHILD.format(body=body), str(hwm_file), *args],
                         env=env)
    dt = time.perf_counter() - t0
    peak = int(hwm_file.read_text()) / 1024 if hwm_file.exists() else float("nan")  # KiB -> MiB
    return rc, peak, dt


def largest_shard(d: Path) -> float:
    return max(p.stat().st_size for p in d.glob("*.safetensors")) / MB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="work in this directory and keep it")
    a = ap.parse_args()

    from ds3dist.checkpoint.reader import read_header
    from ds3dist.checkpoint.validation import validate

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    src, dst = work / f"{a.preset}-fp8", work / f"{a.preset}-bf16"
    try:
        rc, synth_peak, t_synth = run_child(
            "from ds3dist.checkpoint.synthesize import main\nrc = main(sys.argv[2:])",
            ["--preset", a.preset, "--out", str(src), "--seed", str(a.seed), "--no-progress",
             *(["--shards", str(a.shards)] if a.shards else [])], work / "hwm-synth")
        if rc:
            print(f"synthesize failed: exit {rc}")
            return 1
        t0 = time.perf_counter()
        problems = validate(src)
        t_validate = time.perf_counter() - t0
        if problems:
            print("synthesized checkpoint is invalid:", *problems, sep="\n  ")
            return 1
        biggest = max(e.nbytes for p in src.glob("*.safetensors")
                      for e in read_header(p).entries.values()) / MB

        rc0, base_rss, _ = run_child("import ds3dist.checkpoint.convert\nrc = 0", [],
                                     work / "hwm-baseline")
        rc, peak, t_convert = run_child(
            "from ds3dist.checkpoint.convert import main\nrc = main(sys.argv[2:])",
            ["--to", "bf16", "--force", "--no-progress", str(src), str(dst)], work / "hwm-convert")
        if rc0 or rc:
            print(f"child failed: baseline exit {rc0}, convert exit {rc}")
            return 1
        total_in = sum(p.stat().st_size for p in src.glob("*.safetensors")) / MB
        total_out = sum(p.stat().st_size for p in dst.glob("*.safetensors")) / MB
        n_shards = len(list(src.glob("*.safetensors")))
        print(f"preset {a.preset}, {n_shards} shards, seed {a.seed}")
        print(f"synthesize        {t_synth:8.1f} s   ({total_in:.0f} MB of shards), "
              f"peak RSS {synth_peak:.0f} MB")
        print(f"validate          {t_validate:8.2f} s   (headers only)")
        print(f"convert to bf16   {t_convert:8.1f} s   ({total_out:.0f} MB of shards written)")
        print(f"peak RSS convert  {peak:8.0f} MB")
        print(f"  baseline import {base_rss:8.0f} MB   (python + torch + ds3dist)")
        print(f"  above baseline  {peak - base_rss:8.0f} MB")
        print(f"largest shard in  {largest_shard(src):8.0f} MB")
        print(f"largest shard out {largest_shard(dst):8.0f} MB")
        print(f"largest tensor    {biggest:8.0f} MB (as stored in the input)")
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
