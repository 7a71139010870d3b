"""Shared test fixtures.

Session-scoped checkpoints (built once per test run, read-only for tests; copy before
modifying):
  tiny_fp8_dir   the `tiny` preset synthesized with seed 0 in 4 shards (release format, FP8)
  tiny_bf16_dir  the same checkpoint converted to bf16 (scales dropped)
  tok            the release tokenizer that tiny checkpoint carries
  ray_cluster    one local Ray cluster (num_cpus=8) shared by the session's tests (one per
                 pytest-xdist worker)

The suite runs on two pytest-xdist workers, a module at a time (pyproject's addopts:
`-n 2 --dist loadfile`): a module's fixtures are made once, on one worker. Modules are handed
out in the order LONGEST_FIRST gives (then the others as collected), so the two workers end
together instead of one running the longest module alone at the end. `-n 0` runs serially.
Each worker computes with its share of the cores (torch_threads): two workers on two cores
take one torch thread each, since oversubscribed threads wait on each other.

One-time builds (ds3dist.build_ops) run once, before the first test, in a subprocess bounded by
BUILD_BOUND_S, printing their progress: the CPU decode kernels always, DeepSpeed's ops where a
collected test is marked `ops(...)` with them. A test marked `ops(name, ...)` skips with the
build's reason where one of them is not ready; with CI set in the environment a failed build
fails it instead (an op that does not apply to this machine still skips).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ds3dist.build_ops import OPS

if not torch.cuda.is_available():  # Triton kernels (ds3dist.kernels) run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

BUILD_BOUND_S = 3600.0

# The modules with the longest run (pytest --durations on the 2-core machine), longest first.
LONGEST_FIRST = ("test_serving.py", "test_speculative_serving.py", "test_slurm.py",
                 "test_launch_e2e.py", "test_recovery.py", "test_signals.py", "test_engine.py",
                 "test_multihost.py", "test_offload.py", "test_hardening.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-module order kept


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> int:
    """Torch threads of this test process: its worker's share of the cores (all of them when
    run serially)."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    torch.set_num_threads(threads)
    return threads


@pytest.fixture(scope="session", autouse=True)
def one_time_builds(request) -> dict[str, dict]:
    """{op: its ds3dist.build_ops result} for the CPU kernels and every op a collected test
    is marked with."""
    wanted = {"cpu_kernels"} | {name for item in request.session.items
                                for mark in item.iter_markers("ops") for name in mark.args}
    names = [n for n in OPS if n in wanted]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    proc = subprocess.Popen([sys.executable, "-m", "ds3dist.build_ops", "--device", "cpu",
                             "--json", *names], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def relay():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not lines[-1].startswith("["):  # the JSON line is for us
                say(f"[one-time builds] {lines[-1]}")

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=BUILD_BOUND_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    got = {op["name"]: op for op in json.loads(lines[-1])} if lines and lines[-1][:1] == "[" else {}
    why = (f"ds3dist.build_ops ran past {BUILD_BOUND_S:.0f} s" if timed_out
           else f"ds3dist.build_ops exited {proc.returncode}: {' | '.join(lines[-5:])}")
    return {n: got.get(n, {"name": n, "state": "failed", "reason": why}) for n in names}


@pytest.fixture(autouse=True)
def _marked_ops_ready(request, one_time_builds):
    for mark in request.node.iter_markers("ops"):
        for name in mark.args:
            op = one_time_builds[name]
            if op["state"] == "ready":
                continue
            why = f"{name} is not built: {op['reason']}"
            if op["state"] == "failed" and os.environ.get("CI"):
                pytest.fail(f"a one-time build failed: {why}")
            pytest.skip(why)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory) -> Path:
    from ds3dist.checkpoint.synthesize import synthesize

    out = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    synthesize(out, preset="tiny", seed=0, shards=4, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bf16_dir(tiny_fp8_dir, tmp_path_factory) -> Path:
    from ds3dist.checkpoint.convert import convert

    out = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    convert(tiny_fp8_dir, out, to="bf16", progress=False)
    return out


@pytest.fixture(scope="session")
def tok(tiny_fp8_dir):
    from ds3dist.tokenizer import load_tokenizer

    return load_tokenizer(tiny_fp8_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (more logical CPUs than cores)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS3DIST_TORCH_THREADS", "1")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
