"""End to end on a real Slurm: `sbatch --nodes=2 slurm/run.sh ...` on two Slurm nodes of this
machine.

The test runs its own munged (own key and socket), slurmctld and two slurmd (nodes n1 and n2,
one CPU each, on free ports), all from a slurm.conf in a temp dir, submits the script with
`sbatch --wait`, and afterwards stops, by PID, every process it started (the daemons, and
anything that still carries its temp dir in its command line or environment).

Needs root and the slurm-wlm and munge packages; skipped otherwise.
"""

from __future__ import annotations

import contextlib
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

import ds3dist

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


def _processes_marked(marker: str) -> list[int]:
    """PIDs (not this one) whose command line or environment mentions `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if any(marker.encode() in (d / f).read_bytes() for f in ("cmdline", "environ")):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


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
# sbatch --wait polls every 2 s only while MinJobAge/3 > 2 (else 2, 8, then 32 s)
MinJobAge=6
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
        while _processes_marked(str(d)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _processes_marked(str(d))
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
    for pid in _processes_marked(marker):
        env = _environ(pid)
        if env.get("SLURM_JOB_ID") == job_id:
            out[pid] = env
    return out


def test_sbatch_run_sh_on_two_slurm_nodes(tmp_path, tiny_fp8_dir):
    """run.sh under sbatch on two Slurm nodes with one CPU each: the Ray head and worker
    start in srun steps and register, the two ep ranks run one on each Slurm node (seen in
    the environment of the rank processes while the job runs), the job's output is complete,
    and no process of the job outlives it."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Fact {i} about the sea:"})
                           + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    with slurm_cluster() as (d, env):
        t_up = time.monotonic()
        venv = Path(sys.prefix)
        env.update(
            PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
            PYTHONPATH=os.pathsep.join([str(PKG_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
            RAY_PORT=str(_free_ports(1)[0]), RAY_TMP_ROOT=str(d), RAY_TMPDIR=str(d),
            RAY_WAIT_S="90", DS3DIST_CACHE=str(d / "cache"), DS3DIST_TORCH_THREADS="1")
        env.pop("RAY_NET_IFACE", None)
        if (venv / "bin" / "activate").is_file():
            env["DS3DIST_VENV"] = str(venv)
        args = ["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1",
                "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                f"--output={d}/job-%j.out", str(RUN_SH),
                "model=tiny", f"model.path={tiny_fp8_dir}", "+parallel=ep2",
                f"job.input={inp}", f"job.output={out}", "sampling.temperature=0",
                "sampling.max_new_tokens=4", "job.progress=false"]
        sb_out, sb_err = d / "sbatch.out", d / "sbatch.err"
        with open(sb_out, "wb") as o, open(sb_err, "wb") as e:
            p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=o, stderr=e,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        seen: dict[int, dict[str, str]] = {}  # the job's processes, as they ran
        job_id = ""
        deadline = time.monotonic() + 180
        while p.poll() is None and time.monotonic() < deadline:
            job_id = sb_out.read_text().strip().split(";")[0]
            if job_id:
                for pid, penv in _job_processes(str(d), job_id).items():
                    seen.setdefault(pid, penv)
            time.sleep(0.2)
        if p.poll() is None:
            if job_id:
                subprocess.run(["scancel", job_id], env=env, timeout=30, check=False)
            _stop(p)
            pytest.fail(f"sbatch --wait did not return within 180 s (job {job_id!r})")
        t_job = time.monotonic()
        job_id = sb_out.read_text().strip().split(";")[0]
        logs = sorted(d.glob("job-*.out"))
        log = logs[0].read_text(errors="replace") if logs else "(no job log)"
        assert p.returncode == 0, \
            f"sbatch exit {p.returncode}: {sb_err.read_text()}\n{log[-6000:]}"
        # The job's processes (Ray head and worker included) end with it.
        gone = time.monotonic() + 20
        while _job_processes(str(d), job_id) and time.monotonic() < gone:
            time.sleep(0.2)
        job_left = {pid: _cmdline(pid) for pid in _job_processes(str(d), job_id)}
    t_end = time.monotonic()
    print(f"Slurm test: cluster up {t_up - t0:.1f} s, job {t_job - t_up:.1f} s, "
          f"teardown {t_end - t_job:.1f} s, total {t_end - t0:.1f} s")
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
