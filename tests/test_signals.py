"""SIGTERM / SIGINT to `python -m ds3dist.launch` mid-job: it stops admitting, writes what
finished, exits with EXIT_INTERRUPTED within the drain bound, leaves valid output and no Ray
process; a rerun completes the job with the single-process model's records."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import ds3dist
from ds3dist.jobs.stop import EXIT_INTERRUPTED
from procs import processes_marked, ray_tmp

pytestmark = pytest.mark.slow

PKG_ROOT = str(Path(ds3dist.__file__).resolve().parents[1])
N = 24


def write_input(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Line {i} of a long story:"})
                            + "\n" for i in range(N)))
    return path


def args(inp: Path, out: Path, drain_s: float) -> list[str]:
    return ["model=tiny", "+parallel=ep2", f"job.input={inp}", f"job.output={out}",
            "execution.dtype=float32", "sampling.temperature=0", "sampling.max_new_tokens=24",
            "runtime.max_seqs=2", f"runtime.drain_timeout_s={drain_s}", "job.progress=false"]


@pytest.fixture
def env(tiny_fp8_dir):
    with ray_tmp("ds3g") as ray_dir:
        e = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_dir,
                 DS3DIST_CACHE=str(Path(tiny_fp8_dir).parent / "sig-cache"))
        e.pop("RAY_ADDRESS", None)
        e["PYTHONPATH"] = os.pathsep.join([PKG_ROOT] + [x for x in [e.get("PYTHONPATH")] if x])
        yield e


def start(argv: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ds3dist.launch", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_lines(proc: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the job ended or stalled before {n} lines: {proc.communicate()}")


def wait_for_stdout(proc: subprocess.Popen, start: str) -> None:
    """Read the launch's stdout up to a line that starts with `start` (bounded by the
    launch's own limits: it ends, or prints the line)."""
    for line in proc.stdout:
        if line.startswith(start):
            return
    raise AssertionError(f"the launch ended before printing {start!r}: {proc.communicate()}")


def valid_records(out: Path) -> dict[str, dict]:
    recs = [json.loads(x) for x in out.read_text().splitlines()]  # every line whole
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a line was written twice"
    return {r["id"]: r for r in recs}


def stop(proc: subprocess.Popen, *signals: signal.Signals, gap_s: float = 0.3,
         bound_s: float = 30) -> tuple[float, str, str]:
    t0 = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap_s)
        proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=bound_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return time.monotonic() - t0, stdout, stderr


@pytest.fixture(scope="module")
def oracle(tiny_fp8_dir, tok, tmp_path_factory):
    from ds3dist.local import LocalEngine
    from ds3dist.jobs.batch import run_batch_job
    from ds3dist.jobs.requests import DEFAULT_SAMPLING

    d = tmp_path_factory.mktemp("sig-oracle")
    inp = write_input(d / "in.jsonl")
    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    run_batch_job(LocalEngine(model, tok), tok, inp, d / "out.jsonl", progress=False,
                  sampling=DEFAULT_SAMPLING.overridden({"max_new_tokens": 24, "temperature": 0.0,
                                                        "top_p": 1.0, "top_k": 0, "seed": 0}))
    return inp, valid_records(d / "out.jsonl")


def test_sigterm_drains_exits_resumable_and_a_rerun_completes(tmp_path, env, tiny_fp8_dir,
                                                              oracle):
    inp, want = oracle
    out = tmp_path / "out.jsonl"
    argv = args(inp, out, drain_s=15) + [f"model.path={tiny_fp8_dir}"]
    proc = start(argv, tmp_path, env)
    wait_for_lines(proc, out, 2)
    took, stdout, stderr = stop(proc, signal.SIGTERM)
    print(f"SIGTERM to exit: {took:.1f} s")
    assert proc.returncode == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
    assert took < 30
    assert "SIGTERM: stopping" in stderr and "rerun the same command" in stdout
    first = valid_records(out)
    assert 2 <= len(first) < N
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and "error" not in summary
    assert summary["counts"]["not_run"] == N - len(first)
    assert summary["counts"]["generated"] == len(first)

    again = start(argv, tmp_path, env)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stdout[-2000:] + stderr[-3000:]
    got = valid_records(out)
    assert sorted(got) == sorted(want)
    assert {k: r["token_ids"] for k, r in got.items()} == \
        {k: r["token_ids"] for k, r in want.items()}


def test_a_second_signal_exits_at_once_with_valid_output(tmp_path, env, tiny_fp8_dir):
    out = tmp_path / "out.jsonl"
    proc = start(args(write_input(tmp_path / "in.jsonl"), out, drain_s=300)
                 + [f"model.path={tiny_fp8_dir}"], tmp_path, env)
    wait_for_lines(proc, out, 1)
    took, stdout, stderr = stop(proc, signal.SIGTERM, signal.SIGINT, bound_s=10)
    print(f"SIGTERM + SIGINT to exit: {took:.1f} s")
    assert proc.returncode == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
    assert took < 10, "a second signal must not wait for the 300 s drain"
    assert "stopped at once after SIGTERM: SIGINT while stopping" in stderr
    assert 1 <= len(valid_records(out)) < N
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and "Interrupted" in summary["error"]


def test_sigterm_while_its_cluster_goes_down_too(tmp_path, env, tiny_fp8_dir, oracle):
    """As `scancel --signal=TERM` does under Slurm: the launch and every process of the Ray
    cluster it joined get SIGTERM at once. The launch must not wait on the dead cluster: it
    exits 75 within 30 s, its summary written, its lines whole; a rerun on a new cluster
    completes the job."""
    inp, want = oracle
    ray_tmp = tempfile.mkdtemp(prefix="ds3h", dir="/tmp")
    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         f"--port={port}", "--num-cpus=4", f"--temp-dir={ray_tmp}", "--include-dashboard=false",
         "--disable-usage-stats"],
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out = tmp_path / "out.jsonl"
        argv = args(inp, out, drain_s=20) + [f"model.path={tiny_fp8_dir}",
                                             f"runtime.address=127.0.0.1:{port}"]
        proc = start(argv, tmp_path, env)
        wait_for_lines(proc, out, 2)
        for pid in processes_marked(ray_tmp):  # the whole cluster
            with contextlib.suppress(ProcessLookupError):  # one may have ended meanwhile
                os.kill(pid, signal.SIGTERM)
        took, stdout, stderr = stop(proc, signal.SIGTERM)
        print(f"SIGTERM (cluster going down too) to exit: {took:.1f} s")
        assert proc.returncode == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
        assert took < 30
        first = valid_records(out)
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert summary["stopped"] == "SIGTERM"
        assert summary["counts"]["generated"] == len(first) < N
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            head.wait(timeout=30)
        for pid in processes_marked(ray_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    again = start(args(inp, out, drain_s=20) + [f"model.path={tiny_fp8_dir}"], tmp_path, env)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stdout[-2000:] + stderr[-3000:]
    got = valid_records(out)
    assert {k: r["token_ids"] for k, r in got.items()} == \
        {k: r["token_ids"] for k, r in want.items()}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_drain_that_finishes_every_request_exits_0(tmp_path, env, tiny_fp8_dir):
    """SIGTERM once the first line is out, every request already in flight: all finish inside
    the drain; the launch exits 0 with its summary (the drain timer cannot cut the closing
    work) and says how many finished during the drain."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"d{i}", "prompt": f"Line {i}:",
                                       "max_tokens": 4 + 6 * i}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    proc = start(["model=tiny", f"model.path={tiny_fp8_dir}", f"job.input={inp}",
                  f"job.output={out}", "execution.dtype=float32", "sampling.temperature=0",
                  "runtime.drain_timeout_s=20", "job.progress=false"], tmp_path, env)
    wait_for_lines(proc, out, 1)
    took, stdout, stderr = stop(proc, signal.SIGTERM)
    print(f"SIGTERM with everything in flight to exit: {took:.1f} s")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "did not finish" not in stderr and "SIGTERM: stopping" in stderr
    assert len(valid_records(out)) == 6
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and "error" not in summary
    assert summary["counts"]["not_run"] == 0 and summary["counts"]["generated"] == 6
    assert summary["counts"]["drained"] >= 1
    assert f"({summary['counts']['drained']} finished during the drain); the job is complete" \
        in stdout


@pytest.mark.parametrize("after_s", [0.5, 5.0])
def test_sigterm_during_start_up_exits_75_and_leaves_no_process(tmp_path, env, tiny_fp8_dir,
                                                                 after_s):
    """SIGTERM while the launch builds its ops, joins its Ray cluster or loads its ranks: exit 75
    within runtime.drain_timeout_s + 10 s, nothing written, no process of the job left (the
    env fixture's Ray temp dir must be free of processes afterwards)."""
    out = tmp_path / "out.jsonl"
    proc = start(args(write_input(tmp_path / "in.jsonl"), out, drain_s=20)
                 + [f"model.path={tiny_fp8_dir}"], tmp_path, env)
    wait_for_stdout(proc, "model tiny from")  # the engine is being made once this is out
    time.sleep(after_s)
    took, stdout, stderr = stop(proc, signal.SIGTERM)
    print(f"SIGTERM {after_s} s into start-up to exit: {took:.1f} s")
    assert proc.returncode == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
    assert took < 20 + 10
    assert "stopped by SIGTERM before generation began" in stderr, stderr[-3000:]
    assert not out.exists() or not out.read_text().strip()


def test_sigint_during_preflight_exits_75_and_leaves_the_cache_whole(tmp_path, env):
    """SIGINT while the preflight synthesizes the tiny checkpoint into an empty cache: exit 75
    at once, nothing written, no half-written checkpoint left; the next launch makes it anew
    and completes."""
    env = dict(env, DS3DIST_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out.jsonl"
    argv = ["model=tiny", f"job.input={write_input(tmp_path / 'in.jsonl')}", f"job.output={out}",
            "sampling.max_new_tokens=4", "runtime.control=local", "job.progress=false"]
    proc = start(argv, tmp_path, env)
    wait_for_stdout(proc, "synthesizing the tiny checkpoint")
    took, stdout, stderr = stop(proc, signal.SIGINT)
    print(f"SIGINT during the checkpoint's synthesis to exit: {took:.1f} s")
    assert proc.returncode == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
    assert "stopped by SIGINT before generation began" in stderr and took < 10
    assert not out.exists() or not out.read_text().strip()
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")], "a partial checkpoint"
    again = start(argv, tmp_path, env)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert len(valid_records(out)) == N


def test_sigterm_during_the_op_build_ends_the_compilers_too(tmp_path, env, tiny_fp8_dir):
    """SIGTERM while the launch compiles the CPU kernels (an empty extension folder): exit 75
    within seconds and no compiler of the build left running."""
    ext = tmp_path / "ext"
    env = dict(env, TORCH_EXTENSIONS_DIR=str(ext))
    out = tmp_path / "out.jsonl"
    proc = start(["model=tiny", f"model.path={tiny_fp8_dir}",
                  f"job.input={write_input(tmp_path / 'in.jsonl')}", f"job.output={out}",
                  "runtime.control=local", "job.progress=false"], tmp_path, env)
    wait_for_stdout(proc, "building cpu_kernels")
    time.sleep(2)  # the compilers are running
    assert processes_marked(str(ext), environ=True), "no compiler of the build was seen"
    took, stdout, stderr = stop(proc, signal.SIGTERM)
    print(f"SIGTERM during the op build to exit: {took:.1f} s")
    assert proc.returncode == EXIT_INTERRUPTED, stdout[-2000:] + stderr[-3000:]
    assert "stopped by SIGTERM before generation began" in stderr and took < 10
    deadline = time.monotonic() + 5
    while processes_marked(str(ext), environ=True) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_marked(str(ext), environ=True), "a compiler outlived the launch"
