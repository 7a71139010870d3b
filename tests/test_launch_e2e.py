"""End to end: `python -m ds3dist.launch` as a subprocess on the tiny model and the real Engine.

Each launch starts its own local Ray cluster (RAY_ADDRESS is removed from the environment)
and synthesizes the tiny checkpoint into a per-session cache dir ($DS3DIST_CACHE) on first use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ds3dist

pytestmark = pytest.mark.slow

# No skip guard: these tests need the real Engine and fail loudly if it cannot be imported.
from ds3dist.runtime.engine import Engine  # noqa: E402,F401
from procs import processes_marked, ray_tmp  # noqa: E402

PKG_ROOT = str(Path(ds3dist.__file__).resolve().parents[1])
NEW_TOKENS = 8
MAX_LINE_TOKENS = 29  # the most a line of twenty_lines asks for


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds3dist-cache")


@pytest.fixture
def ray_dir():
    with ray_tmp() as d:
        yield d


def env_for(cache_dir: Path, ray_dir: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", DS3DIST_CACHE=str(cache_dir),
               RAY_TMPDIR=ray_dir)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([PKG_ROOT] + [x for x in [env.get("PYTHONPATH")] if x])
    return env


def launch(args: list[str], cwd: Path, cache_dir: Path, ray_dir: str, timeout: float = 600,
           env: dict[str, str] | None = None):
    return subprocess.run([sys.executable, "-m", "ds3dist.launch", *args], cwd=cwd,
                          env={**env_for(cache_dir, ray_dir), **(env or {})},
                          capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def twenty_lines(path: Path) -> Path:
    """20 lines, 18 valid (prompts and chats), line 7 bad JSON, line 15 without a prompt;
    prompt lines ask for 2..29 new tokens, so requests end at different steps."""
    lines = []
    for i in range(20):
        if i == 6:
            lines.append('{"id": "broken", "prompt": "no closing quote}')
        elif i == 14:
            lines.append(json.dumps({"id": "empty"}))
        elif i % 3 == 0:
            lines.append(json.dumps({"id": f"chat-{i}", "messages": [
                {"role": "user", "content": f"Tell me fact number {i} about the sea."}]}))
        else:
            lines.append(json.dumps({"id": i, "prompt": f"Item {i}: the quick brown fox " * (1 + i % 4),
                                     "max_new_tokens": 2 + 3 * (i % 10)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_args(inp: Path, out: Path, layout: str = "+parallel=pp2ep2") -> list[str]:
    return ["model=tiny", layout, f"job.input={inp}", f"job.output={out}",
            "execution.dtype=float32", "sampling.temperature=0",
            f"sampling.max_new_tokens={NEW_TOKENS}"]


def test_default_command_runs_bundled_sample(tmp_path, cache_dir, ray_dir):
    """`python -m ds3dist.launch` with no arguments (the README's main command)."""
    p = launch([], cwd=tmp_path, cache_dir=cache_dir, ray_dir=ray_dir)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert (cache_dir / "tiny-seed0" / "config.json").is_file()
    out_line = [x for x in p.stdout.splitlines() if x.startswith("outputs:")]
    assert out_line, p.stdout
    out = Path(out_line[0].split()[1])
    assert out.parent.parent == (tmp_path / "outputs").resolve()
    from ds3dist.launch import bundled_sample

    n_sample = len([x for x in bundled_sample().read_text().splitlines() if x.strip()])
    recs = read_jsonl(out)
    assert len(recs) == n_sample
    assert all(r["finish_reason"] in ("stop", "length") and r["token_ids"] for r in recs)
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["generated"] == n_sample and summary["counts"]["errors"] == 0
    assert len(summary["stage_seconds"]) == 1
    # a newcomer is told the embedded model's text is noise and how to run real weights
    assert "random weights" in p.stdout and "model.path=/path/to/DeepSeek-V3" in p.stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("e2e-ref")
    inp = twenty_lines(d / "in.jsonl")
    out = d / "ref.jsonl"
    t0 = time.perf_counter()
    with ray_tmp() as rd:
        p = launch(run_args(inp, out), cwd=d, cache_dir=cache_dir, ray_dir=rd)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    print(f"uninterrupted pp2ep2 run: {wall:.1f} s wall")
    return inp, out


def test_pp2ep2_outputs_errors_summary(uninterrupted):
    inp, out = uninterrupted
    recs = read_jsonl(out)
    assert len(recs) == 18 and len({json.dumps(r["id"]) for r in recs}) == 18
    for r in recs:
        assert set(r) == {"id", "text", "token_ids", "finish_reason", "usage"}
        assert r["usage"]["completion_tokens"] == len(r["token_ids"]) <= MAX_LINE_TOKENS
    errs = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert [e["line"] for e in errs] == [7, 15]
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["valid"] == 18 and summary["counts"]["errors"] == 2
    assert len(summary["stage_seconds"]) == 2
    assert summary["expert_load"], "ep=2 ranks report routed-token counts"
    assert all(len(row) == 16 for row in summary["expert_load"].values())
    assert Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert summary["throughput"]["completion_tokens_per_second"] > 0
    print("pp2ep2 throughput:", summary["throughput"], "stage_seconds:",
          summary["stage_seconds"])


def test_local_control_runs_without_ray_and_equals_pp2ep2(tmp_path, uninterrupted, cache_dir):
    """runtime.control=local: the whole model in the launch's process (no Ray cluster is
    started: RAY_ADDRESS points nowhere and is never tried); the same records as pp2ep2."""
    inp, ref = uninterrupted
    out = tmp_path / "local.jsonl"
    p = launch(run_args(inp, out, "runtime.control=local"), cwd=tmp_path, cache_dir=cache_dir,
               ray_dir=str(tmp_path), env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    key = lambda r: json.dumps(r["id"])  # noqa: E731
    got, want = sorted(read_jsonl(out), key=key), sorted(read_jsonl(ref), key=key)
    assert [(r["id"], r["token_ids"], r["text"]) for r in got] == \
        [(r["id"], r["token_ids"], r["text"]) for r in want]
    bad = launch(["model=tiny", "+parallel=pp2ep2", "runtime.control=local"], cwd=tmp_path,
                 cache_dir=cache_dir, ray_dir=str(tmp_path))
    assert bad.returncode == 2 and "runtime.control: local" in bad.stderr and "pp=2" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="the deepspeed extra is not installed")
@pytest.mark.ops("shm_comm")
def test_job_with_weight_offload_equals_pp2ep2(tmp_path, uninterrupted, cache_dir, ray_dir):
    """A pp1ep2 job whose ranks offload their decoder layers (DeepSpeed ZeRO-3, host memory):
    the same records as pp2ep2 without offload (which equals one process)."""
    inp, ref = uninterrupted
    out = tmp_path / "offload.jsonl"
    p = launch(run_args(inp, out, "+parallel=ep2") + ["execution.offload.backend=deepspeed"],
               cwd=tmp_path, cache_dir=cache_dir, ray_dir=ray_dir)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert "shm_comm: ready (loaded from the cache in" in p.stdout  # built before the session
    key = lambda r: json.dumps(r["id"])  # noqa: E731
    got, want = sorted(read_jsonl(out), key=key), sorted(read_jsonl(ref), key=key)
    assert [(r["id"], r["token_ids"], r["text"]) for r in got] == \
        [(r["id"], r["token_ids"], r["text"]) for r in want]
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    ranks = summary["ranks"]
    assert len(ranks) == 2 and all(r["offload"]["offloaded_bytes"] > 0 for r in ranks)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_midway_and_resume(tmp_path, uninterrupted, cache_dir, ray_dir):
    inp, ref_out = uninterrupted
    out = tmp_path / "resumed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ds3dist.launch", *run_args(inp, out)],
                            cwd=tmp_path, env=env_for(cache_dir, ray_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 1:  # first request written
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (_group_alive(proc.pid) or processes_marked(ray_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "processes of the killed job are still running"
    assert not processes_marked(ray_dir), "the killed job's Ray processes are still running"
    partial = [json.loads(x) for x in out.read_text().splitlines() if x.endswith("}")]
    assert 1 <= len(partial) < 18, len(partial)

    p = launch(run_args(inp, out), cwd=tmp_path, cache_dir=cache_dir, ray_dir=ray_dir)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    got = read_jsonl(out)
    ids = [json.dumps(r["id"]) for r in got]
    assert len(ids) == 18 and len(set(ids)) == 18
    ref = {json.dumps(r["id"]): r for r in read_jsonl(ref_out)}
    assert {k: r["text"] for k, r in zip(ids, got)} == {k: r["text"] for k, r in ref.items()}
    assert {k: r["token_ids"] for k, r in zip(ids, got)} == \
        {k: r["token_ids"] for k, r in ref.items()}
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["already_done"] >= len(partial)
    assert summary["counts"]["generated"] == 18 - summary["counts"]["already_done"]
    assert len(read_jsonl(Path(str(out) + ".errors.jsonl"))) == 2


def test_openai_batch_file_runs_unchanged(tmp_path, cache_dir, ray_dir):
    reqs = [
        {"custom_id": "task-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "deepseek-chat", "messages": [
             {"role": "system", "content": "You are helpful."},
             {"role": "user", "content": "Name a prime number."}], "max_tokens": 6,
             "temperature": 0}},
        {"custom_id": "task-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "deepseek-chat", "prompt": "Roses are red,", "max_tokens": 5,
                  "temperature": 0.8, "top_p": 0.9, "seed": 3, "stop": ["\n"]}},
        {"custom_id": "task-3", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "deepseek-chat", "max_tokens": 4}},  # malformed: no messages
        {"custom_id": "task-4", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 6, "temperature": 0}},
    ]
    inp = tmp_path / "batch_input.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    out = tmp_path / "batch_output.jsonl"
    p = launch(["+parallel=ep2", f"job.input={inp}", f"job.output={out}"], cwd=tmp_path,
               cache_dir=cache_dir, ray_dir=ray_dir)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    recs = read_jsonl(out)
    assert sorted(r["custom_id"] for r in recs) == ["task-1", "task-2", "task-3", "task-4"]
    by = {r["custom_id"]: r for r in recs}
    for cid in ("task-1", "task-4"):
        r = by[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "deepseek-chat"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 0 < body["usage"]["completion_tokens"] <= 6
    comp = by["task-2"]["response"]["body"]
    assert comp["object"] == "text_completion" and isinstance(comp["choices"][0]["text"], str)
    assert by["task-3"]["response"] is None
    assert by["task-3"]["error"]["code"] == "missing_required_parameter"
    assert "messages" in by["task-3"]["error"]["message"]


SRUN_STUB = r'''#!/usr/bin/env bash
# stand-in for srun: the command once per node of --nodelist, in the background, FAKE_NODE set
nodelist=""
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in --nodelist=*) nodelist=${1#--nodelist=};; esac
    shift
done
IFS=, read -ra ns <<< "$nodelist"
pids=()
for n in "${ns[@]}"; do FAKE_NODE=$n "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
wait
wait
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_slurm_script_with_stub_srun(tmp_path, cache_dir, ray_dir, uninterrupted):
    """slurm/run.sh on two simulated nodes of this machine (stub srun, scontrol, scancel and
    hostname), two CPUs each: head + worker start and register, the pp2ep2 job's 4 ranks span
    both nodes through RAY_ADDRESS, and the script stops its Ray processes (checked by
    ray_dir)."""
    inp, ref_out = uninterrupted
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_hostname = shutil.which("hostname")
    (bin_dir / "srun").write_text(SRUN_STUB)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '%s\\n' node1 node2\n")
    # no controller to ask: run.sh then signals its srun clients, which pass it on
    (bin_dir / "scancel").write_text("#!/usr/bin/env bash\nexit 1\n")
    (bin_dir / "hostname").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == -s ]]; then echo "${{FAKE_NODE:-node1}}"; else exec {real_hostname} "$@"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = env_for(cache_dir, ray_dir)
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                    f"{env['PATH']}",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]", SLURMD_NODENAME="node1",
               SLURM_GPUS_PER_NODE="0", SLURM_CPUS_PER_TASK="2", RAY_PORT=str(_free_port()),
               RAY_TMP_ROOT=ray_dir, RAY_WAIT_S="120")
    out = tmp_path / "slurm.jsonl"
    p = subprocess.run(["bash", str(Path(PKG_ROOT) / "slurm" / "run.sh"), *run_args(inp, out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                       start_new_session=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "2/2 Ray nodes registered" in p.stdout
    assert "stopping the Ray nodes started by this job" in p.stdout
    got = {json.dumps(r["id"]): r["text"] for r in read_jsonl(out)}
    assert got == {json.dumps(r["id"]): r["text"] for r in read_jsonl(ref_out)}
    assert len(read_jsonl(Path(str(out) + ".errors.jsonl"))) == 2
