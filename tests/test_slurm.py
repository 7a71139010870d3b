"""End to end on a real Slurm: `sbatch --nodes=2 slurm/run.sh ...` on two Slurm nodes of this
machine.

The tests run their own munged (own key and socket), slurmctld and two slurmd (nodes n1 and
n2, one CPU each, on free ports), all from a slurm.conf in a temp dir, submit the script with
`sbatch --wait`, and afterwards stop, by PID, every process they started (the daemons, and
anything that still carries the temp dir in its command line or environment). One job runs
to its end; others are stopped mid-job with `scancel --signal=TERM` and then submitted again.

Needs root and the slurm-wlm and munge packages; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import ds3dist
from procs import processes_marked
from ds3dist.jobs.requests import DEFAULT_SAMPLING
from ds3dist.jobs.stop import EXIT_INTERRUPTED

PKG_ROOT = Path(ds3dist.__file__).resolve().parents[1]
RUN_SH = PKG_ROOT / "slurm" / "run.sh"
NODES = ("n1", "n2")
TOOLS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel", "srun",
         "scontrol")


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the Slurm test runs its own munged/slurmctld/slurmd and needs root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}; apt: slurm-wlm munge)"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _real_memory_mb() -> int:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    mem = next(int(w.split("=")[1]) for w in out.split() if w.startswith("RealMemory="))
    return max(256, min(4000, mem // 2 - 256))


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for(what: str, check, timeout: float, procs=(), interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        dead = [p.args[0] for p in procs if p.poll() is not None]
        assert not dead, f"{what}: {', '.join(dead)} exited early"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(interval)


SLURM_CONF = """\
ClusterName=ds3test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
# sbatch --wait polls every 2 s only while MinJobAge/3 > 2 (else 2, 8, then 32 s, and a
# record purged after MinJobAge loses the exit code: "Job N no longer found")
MinJobAge=9
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 RealMemory={mem}
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 RealMemory={mem}
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster():
    """munged + slurmctld + slurmd n1/n2, private to this test; yields (temp dir, env)."""
    # Short (Ray's socket paths live below it too) and searchable by munged, which needs
    # execute permission for all on its socket's directories.
    d = Path(tempfile.mkdtemp(prefix="ds3s", dir="/tmp"))
    d.chmod(0o755)
    procs: list[subprocess.Popen] = []
    try:
        priv = d / "munge"
        priv.mkdir(mode=0o700)
        key = priv / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        sock_dir = d / "sock"
        sock_dir.mkdir(mode=0o755)
        munge_socket = sock_dir / "munge.socket"
        (d / "state").mkdir()
        for n in NODES:
            (d / f"spool-{n}").mkdir()
        ctld_port, port1, port2 = _free_ports(3)
        host = socket.gethostname().split(".")[0]
        conf = d / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=host, ctld_port=ctld_port, port1=port1,
                                          port2=port2, munge_socket=munge_socket, d=d,
                                          mem=_real_memory_mb()))
        env = dict(os.environ, SLURM_CONF=str(conf), RAY_AUTH_MODE="disabled")
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del env[k]
        env.pop("RAY_ADDRESS", None)

        def start(args, log):
            with open(d / log, "wb") as f:
                procs.append(subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))

        start(["munged", "-F", f"--socket={munge_socket}", f"--key-file={key}",
               f"--pid-file={priv}/munged.pid", f"--log-file={priv}/munged.log",
               f"--seed-file={priv}/munged.seed"], "munged.out")
        _wait_for("munged", lambda: subprocess.run(
            ["munge", "-n", "-S", str(munge_socket)], capture_output=True, timeout=20,
            check=False).returncode == 0,
            timeout=20, procs=procs)
        start(["slurmctld", "-D", "-i"], "slurmctld.out")
        for n in NODES:
            start(["slurmd", "-D", "-N", n], f"slurmd-{n}.out")

        def idle():
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                               capture_output=True, text=True, timeout=20, check=False)
            states = dict(x.split() for x in p.stdout.splitlines() if x.strip())
            return all(states.get(n) == "idle" for n in NODES)

        try:
            _wait_for("both Slurm nodes idle", idle, timeout=60, procs=procs, interval=0.5)
        except AssertionError as e:
            logs = "".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                           for f in sorted(d.glob("*.out")) + sorted(d.glob("*.log")))
            raise AssertionError(f"{e}\n{logs}") from None
        yield d, env
    finally:
        for p in reversed(procs):  # slurmd, slurmctld, then munged
            _stop(p)
        deadline = time.monotonic() + 30
        while processes_marked(str(d), environ=True) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_marked(str(d), environ=True)
        for pid in left:  # started by this test: they carry its temp dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
    assert not left, f"processes started by the Slurm test still running: {left}"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")[:200]
    except OSError:
        return "(exited)"


def _job_processes(marker: str, job_id: str) -> dict[int, dict[str, str]]:
    """This test's processes of Slurm job `job_id` (pid -> environment)."""
    out = {}
    for pid in processes_marked(marker, environ=True):
        env = _environ(pid)
        if env.get("SLURM_JOB_ID") == job_id:
            out[pid] = env
    return out


@pytest.fixture(scope="module")
def cluster():
    """This module's Slurm cluster: (its temp dir, the environment jobs are submitted with).
    The jobs share its kernel cache (built by the first one)."""
    t0 = time.monotonic()
    with slurm_cluster() as (d, env):
        venv = Path(sys.prefix)
        env.update(
            PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
            PYTHONPATH=os.pathsep.join([str(PKG_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
            RAY_TMP_ROOT=str(d), RAY_TMPDIR=str(d), RAY_WAIT_S="90",
            DS3DIST_CACHE=str(d / "cache"), DS3DIST_TORCH_THREADS="1")
        env.pop("RAY_NET_IFACE", None)
        if (venv / "bin" / "activate").is_file():
            env["DS3DIST_VENV"] = str(venv)
        print(f"Slurm cluster up in {time.monotonic() - t0:.1f} s")
        yield d, env
        t1 = time.monotonic()
    print(f"Slurm cluster down in {time.monotonic() - t1:.1f} s")


@dataclasses.dataclass
class Job:
    """`sbatch --wait slurm/run.sh ARGS` running in the background."""

    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    d: Path
    env: dict[str, str]

    @classmethod
    def submit(cls, cluster, cwd: Path, job_args: list[str]) -> Job:
        d, env = cluster
        env = dict(env, RAY_PORT=str(_free_ports(1)[0]))
        n = len(list(cwd.glob("sbatch-*.out")))
        stdout, stderr = cwd / f"sbatch-{n}.out", cwd / f"sbatch-{n}.err"
        args = ["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1",
                "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                f"--output={d}/job-%j.out", str(RUN_SH), *job_args]
        with open(stdout, "wb") as o, open(stderr, "wb") as e:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(proc, stdout, stderr, d, env)

    @property
    def id(self) -> str:
        return self.stdout.read_text().strip().split(";")[0]

    def log(self) -> str:
        f = self.d / f"job-{self.id}.out"
        return f.read_text(errors="replace") if self.id and f.is_file() else "(no job log)"

    def scancel(self, *args: str) -> None:  # (fails once the job has ended: no matter)
        subprocess.run(["scancel", *args, self.id], env=self.env, timeout=30, check=False)

    def wait(self, timeout: float, tick=None) -> int:
        """sbatch's exit status; tick() every 0.2 s meanwhile. Past `timeout` the job is
        cancelled and the test fails."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if tick is not None and self.id:
                tick()
            time.sleep(0.2)
        if self.proc.poll() is None:
            if self.id:
                subprocess.run(["scancel", self.id], env=self.env, timeout=30, check=False)
            _stop(self.proc)
            pytest.fail(f"sbatch --wait did not return within {timeout:.0f} s (job "
                        f"{self.id!r})\n{self.log()[-4000:]}")
        return self.proc.returncode

    def failure(self) -> str:
        return (f"sbatch exit {self.proc.returncode}: {self.stderr.read_text()}\n"
                f"{self.log()[-6000:]}")

    def processes_left(self) -> dict[int, str]:
        """The job's processes (Ray head and workers included) still running 20 s after it
        ended: pid -> command line."""
        gone = time.monotonic() + 20
        while _job_processes(str(self.d), self.id) and time.monotonic() < gone:
            time.sleep(0.2)
        return {pid: _cmdline(pid) for pid in _job_processes(str(self.d), self.id)}


def _records(out: Path) -> dict[str, dict]:
    """The output's records by id; every line whole, none twice."""
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a line was written twice"
    return {r["id"]: r for r in recs}


def test_sbatch_run_sh_on_two_slurm_nodes(tmp_path, cluster, tiny_fp8_dir):
    """run.sh under sbatch on two Slurm nodes with one CPU each: the Ray head and worker
    start in srun steps and register, the two ep ranks run one on each Slurm node (seen in
    the environment of the rank processes while the job runs), the job's output is complete,
    and no process of the job outlives it."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Fact {i} about the sea:"})
                           + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    job = Job.submit(cluster, tmp_path, [
        "model=tiny", f"model.path={tiny_fp8_dir}", "+parallel=ep2", f"job.input={inp}",
        f"job.output={out}", "sampling.temperature=0", "sampling.max_new_tokens=4",
        "job.progress=false"])
    seen: dict[int, dict[str, str]] = {}  # the job's processes, as they ran

    def watch():
        for pid, penv in _job_processes(str(job.d), job.id).items():
            seen.setdefault(pid, penv)

    assert job.wait(240, watch) == 0, job.failure()
    t_job = time.monotonic()
    log = job.log()
    job_left = job.processes_left()
    print(f"Slurm job {t_job - t0:.1f} s, its processes gone {time.monotonic() - t_job:.1f} s "
          f"later")
    assert not job_left, f"processes of the job outlived it: {job_left}"
    assert "ds3dist: 2 nodes (n1 n2)" in log, log[-4000:]
    assert "2/2 Ray nodes registered" in log, log[-4000:]
    assert "launch exited with 0" in log, log[-4000:]
    assert "stopping the Ray nodes started by this job" in log, log[-4000:]

    recs = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6, recs
    assert all(r["token_ids"] and r["finish_reason"] in ("stop", "length") for r in recs)
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["generated"] == 6 and summary["counts"]["errors"] == 0
    # Each rank process ran inside an srun step on its own Slurm node.
    ranks = {r["rank"]: r["pid"] for r in summary["ranks"]}
    assert sorted(ranks) == [0, 1], summary["ranks"]
    missing = [pid for pid in ranks.values() if pid not in seen]
    assert not missing, f"rank processes {missing} not seen among the job's processes"
    where = {rank: seen[pid].get("SLURMD_NODENAME") for rank, pid in ranks.items()}
    steps = {rank: seen[pid].get("SLURM_STEP_ID") for rank, pid in ranks.items()}
    print("rank -> Slurm node:", where, "step:", steps)
    assert sorted(where.values()) == ["n1", "n2"], where
    assert steps[0] != steps[1], steps
    assert all(seen[pid].get("SLURM_STEP_NODELIST") == where[rank]
               for rank, pid in ranks.items()), where


STORY_N = 32
STORY_SAMPLING = DEFAULT_SAMPLING.overridden({"max_new_tokens": 24, "temperature": 0.0,
                                              "top_p": 1.0, "top_k": 0, "seed": 0})


@pytest.fixture(scope="module")
def story(tiny_fp8_dir, tok, tmp_path_factory):
    """STORY_N prompts, and their records from the single-process model, uninterrupted."""
    from ds3dist.local import LocalEngine
    from ds3dist.jobs.batch import run_batch_job

    d = tmp_path_factory.mktemp("slurm-story")
    inp = d / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Line {i} of a long story:"})
                           + "\n" for i in range(STORY_N)))
    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    run_batch_job(LocalEngine(model, tok), tok, inp, d / "ref.jsonl", sampling=STORY_SAMPLING,
                  progress=False)
    return inp, _records(d / "ref.jsonl")


# scancel's arguments: SIGTERM to every srun step (the launch and the Ray nodes at once), or
# to the batch script only, as the time-limit warning of `#SBATCH --signal=B:TERM@...` does.
SCANCEL = {"steps": ("--signal=TERM",), "batch": ("--batch", "--signal=TERM")}


@pytest.mark.parametrize("how", sorted(SCANCEL))
def test_scancel_sigterm_mid_job_then_a_rerun_completes_it(tmp_path, cluster, tiny_fp8_dir,
                                                           story, how):
    """`scancel --signal=TERM` (how=steps) or `scancel --batch --signal=TERM` (how=batch)
    once the job has written a line: the launch stops within 30 s and exits 75, the job with
    it, leaving valid output and no process; (steps) the same sbatch again completes the job
    with the single-process model's records."""
    inp, want = story
    out = tmp_path / "out.jsonl"
    job_args = ["model=tiny", f"model.path={tiny_fp8_dir}", "+parallel=ep2",
                f"job.input={inp}", f"job.output={out}", "execution.dtype=float32",
                "sampling.temperature=0", "sampling.max_new_tokens=24", "runtime.max_seqs=2",
                "job.progress=false"]
    job = Job.submit(cluster, tmp_path, job_args)
    t: dict[str, float] = {}

    def stop_once_a_line_is_out():
        if "scancel" not in t and out.exists() and out.read_bytes().count(b"\n") >= 1:
            job.scancel(*SCANCEL[how])
            t["scancel"] = time.monotonic()
        if "scancel" in t and "launch" not in t and "launch exited with" in job.log():
            t["launch"] = time.monotonic()

    rc = job.wait(300, stop_once_a_line_is_out)
    t_end = time.monotonic()
    log = job.log()
    job_left = job.processes_left()
    assert "scancel" in t, f"the job ended before it was stopped\n{log[-4000:]}"
    launch_s = t.get("launch", t_end) - t["scancel"]
    print(f"scancel {' '.join(SCANCEL[how])}: the launch exited {launch_s:.1f} s later, "
          f"sbatch --wait returned {t_end - t['scancel']:.1f} s later")
    assert rc == EXIT_INTERRUPTED, job.failure()
    assert f"launch exited with {EXIT_INTERRUPTED}" in log, log[-4000:]
    assert launch_s < 30, log[-4000:]
    assert t_end - t["scancel"] < 30 + 10, "Slurm took over 10 s to end the job"
    assert not job_left, f"processes of the job outlived it: {job_left}"
    if how == "batch":
        assert "ds3dist: SIGTERM: passing it on to the launch" in log, log[-4000:]
    first = _records(out)
    assert 1 <= len(first) < STORY_N, len(first)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["stopped"] == "SIGTERM", summary
    assert summary["counts"]["generated"] == len(first), summary["counts"]
    assert summary["counts"]["not_run"] == STORY_N - len(first), summary["counts"]

    if how == "batch":
        return  # the rerun after a stop is how=steps' (the same job, the same records)
    again = Job.submit(cluster, tmp_path, job_args)
    assert again.wait(300) == 0, again.failure()
    assert "launch exited with 0" in again.log()
    assert not again.processes_left()
    got = _records(out)
    assert sorted(got) == sorted(want)
    assert {k: r["token_ids"] for k, r in got.items()} == \
        {k: r["token_ids"] for k, r in want.items()}
