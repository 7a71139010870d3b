"""`python -m ds3dist.build_ops`: compile, once per machine, the C++ ops that ds3dist's
processes load, so that no job (and no test) pays for a build it did not expect.

    python -m ds3dist.build_ops                 # every op that applies to this machine
    python -m ds3dist.build_ops async_io        # only those named
    python -m ds3dist.build_ops --device cuda   # the ops GPU ranks load

The ops, each cached in torch's extension folder ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions/<python>_<accelerator>/) and loaded in about a second afterwards:
  cpu_kernels  ds3dist's CPU decode kernels (CPU ranks), for this CPU's instruction set and
               the x86 vector ones below it (AVX-512, AVX2): about 30 s each on 2 cores
  shm_comm     DeepSpeed's CPU accelerator communication op (CPU ranks with weight offload):
               about 30 s
  async_io     DeepSpeed's async I/O op (execution.offload.device=nvme; needs libaio-dev):
               3 to 6 minutes
An op that does not apply here (DS3DIST_CPU_KERNEL=0, DeepSpeed or libaio not
installed) says why and is not an error. Exit 0 when every op that applies is ready, 1 when a
build failed (its error printed), 2 for a bad argument. `--json` ends with one line of JSON.
Built from a cluster image, every later job loads them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

OPS = ("cpu_kernels", "shm_comm", "async_io")
# what a first build costs, seen on a 2-core machine (stated before a build starts)
COST = {"cpu_kernels": "about 1 minute per instruction set", "shm_comm": "about 30 s", "async_io": "3 to 6 minutes"}
_DEEPSPEED_BUILDERS = {"shm_comm": "ShareMemCommBuilder", "async_io": "AsyncIOBuilder"}
TICK_S = 15.0
Say = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class OpBuild:
    """One op on this machine: ready (built now or loaded from the cache), unavailable (does
    not apply here, and why) or failed (the build's error)."""
    name: str
    state: str  # "ready" | "unavailable" | "failed"
    reason: str = ""
    seconds: float = 0.0
    built: bool = False  # compiled by this call, not loaded from the cache


def applicable(device_type: str) -> list[str]:
    """The ops a rank on this kind of device may load."""
    return ["async_io"] if device_type == "cuda" else list(OPS)


def build(names: list[str], device_type: str, say: Say = _print) -> list[OpBuild]:
    """Build (or load from the cache) each op named, saying what it builds and, every 15 s,
    for how long."""
    return [cpu_kernels(say) if n == "cpu_kernels" else deepspeed_op(n, device_type, say)
            for n in names]


def cpu_kernels(say: Say = _print) -> OpBuild:
    """ds3dist's CPU kernels for each instruction set cpu_kernel.variants() names."""
    from ds3dist.model import cpu_kernel

    why = cpu_kernel.unavailable()
    if why:
        return OpBuild("cpu_kernels", "unavailable", why)
    isas = cpu_kernel.variants()
    t0, cached = time.perf_counter(), all(cpu_kernel.is_built(isa) for isa in isas)
    for isa in isas:
        (cpu_kernel.build_dir(isa) / "FAILED").unlink(missing_ok=True)  # asked for: try again
    with _progress("cpu_kernels", cached, say):
        got = {isa: cpu_kernel.load(isa) for isa in isas}
    seconds = time.perf_counter() - t0
    errors = [f"{isa}: {b.error}" for isa, b in got.items() if b.error]
    if errors:
        return OpBuild("cpu_kernels", "failed", "; ".join(errors), seconds)
    return OpBuild("cpu_kernels", "ready", f"builds {', '.join(isas)}; this process uses "
                                           f"{cpu_kernel.host_isa()}", seconds,
                   _built(cached, seconds))


def deepspeed_op(name: str, device_type: str, say: Say = _print) -> OpBuild:
    """One of DeepSpeed's ops (shm_comm, async_io) for ranks on device_type."""
    if importlib.util.find_spec("deepspeed") is None:
        return OpBuild(name, "unavailable",
                       "DeepSpeed is not installed (pip install 'ds3dist[deepspeed]')")
    from ds3dist.model.cpu_kernel import build_lock, extensions_dir
    from ds3dist.runtime.offload import import_deepspeed

    import_deepspeed(device_type)
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(_DEEPSPEED_BUILDERS[name])
    if builder is None:
        return OpBuild(name, "unavailable", f"DeepSpeed's {device_type} accelerator has no "
                                            f"{name} op")
    if not builder.is_compatible(verbose=False):
        hint = ("it needs libaio: apt-get install libaio-dev" if name == "async_io"
                else "see ds_report")
        return OpBuild(name, "unavailable", f"DeepSpeed's {builder.name} op cannot be built "
                                            f"here ({hint})")
    folder = extensions_dir() / builder.name
    cached = (folder / f"{builder.name}.so").exists()
    t0 = time.perf_counter()
    try:
        with build_lock(folder), _progress(name, cached, say):
            builder.load(verbose=False)
    except Exception as e:  # a compiler error, no ninja, the lock held too long
        return OpBuild(name, "failed", f"{type(e).__name__}: ...{str(e)[-600:]}",
                       time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    return OpBuild(name, "ready", seconds=seconds, built=_built(cached, seconds))


@contextmanager
def _progress(name: str, cached: bool, say: Say):
    """Around a build or a load: what a build costs, up front, then how long it has run every
    TICK_S (a cached op whose sources, flags or torch changed is rebuilt: the ticks say so).
    The caller says how it ended: describe()."""
    if not cached:
        say(f"building {name} once for this machine ({COST[name]} on 2 cores; later runs "
            f"load it from torch's extension cache)")
    doing = "building" if not cached else "rebuilding (its sources, flags or torch changed)"
    t0, done = time.perf_counter(), threading.Event()

    def tick():
        while not done.wait(TICK_S):
            say(f"still {doing} {name} ({time.perf_counter() - t0:.0f} s)")

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _built(cached: bool, seconds: float) -> bool:
    """Whether a load compiled: nothing was cached, or it took as long as a build."""
    return not cached or seconds >= TICK_S


def for_ranks(device_type: str, offload=None, say: Say = _print) -> list[OpBuild]:
    """Before a job's ranks start: the ops they will load, built here, where a local
    cluster's ranks then load them from the cache. The builds run in a child process of their
    own session (`python -m ds3dist.build_ops`, its lines relayed), so that a signal stopping
    the launch ends the compilers with it. A DeepSpeed op that the offload (OffloadOptions
    or None) needs and that cannot be ready raises OffloadError naming the setting; without
    the CPU kernels the same math runs as torch ops."""
    from ds3dist.runtime.options import OffloadError

    names = ["cpu_kernels"] if device_type == "cpu" else []
    if offload is not None:
        names += ["shm_comm"] if device_type == "cpu" else []
        names += ["async_io"] if offload.device == "nvme" else []
    if not names:
        return []
    results = _build_in_child(names, device_type, say)
    for op in results:
        if op.name != "cpu_kernels" and op.state != "ready":
            raise OffloadError(f"execution.offload.device={offload.device}: {describe(op)}")
    return results


def _build_in_child(names: list[str], device_type: str, say: Say) -> list[OpBuild]:
    proc = subprocess.Popen([sys.executable, "-m", "ds3dist.build_ops", "--device", device_type,
                             "--json", *names], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last = ""
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("["):
                last = line
            elif not re.match(r"\d+ of \d+ ops ready", line):  # the CLI's own tally
                say(line)
        proc.wait()
    except BaseException:  # a signal: the build and its compilers end with the launch
        _kill_session(proc.pid)
        proc.wait()
        raise
    if not last:
        return [OpBuild(n, "failed", f"python -m ds3dist.build_ops exited {proc.returncode}")
                for n in names]
    return [OpBuild(**op) for op in json.loads(last)]


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (ninja gives each compiler a process group of
    its own, so the child's group is not enough; without /proc, the child's group)."""
    try:
        os.killpg(sid, signal.SIGKILL)
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
                os.kill(int(d), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def describe(op: OpBuild) -> str:
    if op.state == "ready":
        how = "built" if op.built else "loaded from the cache"
        return f"{op.name}: ready ({how} in {op.seconds:.1f} s{'; ' + op.reason if op.reason else ''})"
    return f"{op.name}: {'not built' if op.state == 'unavailable' else 'FAILED'}: {op.reason}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds3dist.build_ops",
                                 description="Build the C++ ops ds3dist loads, once per machine.")
    ap.add_argument("ops", nargs="*", metavar="OP",
                    help=f"ops to build ({', '.join(OPS)}); default: all that apply")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="the ranks' device (default: cuda where torch sees one, else cpu)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = ap.parse_args(argv)
    unknown = [n for n in args.ops if n not in OPS]
    if unknown:
        ap.error(f"unknown op {', '.join(unknown)} (choose from {', '.join(OPS)})")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    results = build(args.ops or applicable(device), device)
    for op in results:
        print(describe(op), flush=True)
    failed = [op.name for op in results if op.state == "failed"]
    print(f"{len(results) - len(failed)} of {len(results)} ops ready or not applicable here "
          f"in {time.perf_counter() - t0:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed
                                                     else ""), flush=True)
    if args.json:
        print(json.dumps([asdict(op) for op in results]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
