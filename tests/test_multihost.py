"""Two Ray hosts in network namespaces: rendezvous on the IPs Ray knows, interfaces derived.

Each host is a network namespace with one veth end (198.18.0.1 and .2, the benchmarking
range); the Ray head, the worker node and the driver all run inside the namespaces, so no
traffic leaves them. Needs root and iproute2; skipped otherwise.
"""

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

pytestmark = pytest.mark.slow  # real Ray nodes in network namespaces: about a minute

H1_IP, H2_IP, PORT = "198.18.0.1", "198.18.0.2", 6391
PROMPTS = ["The capital of France is", "Hello", "1 2 3 4 5 6", "def f(x):"]


def _netns_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"ds3p{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if r.returncode:
        return f"cannot create network namespaces: {r.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def _kill_namespace_processes(ns: str) -> None:
    """SIGTERM then SIGKILL every process this test started inside namespace `ns`."""
    def pids():
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def two_hosts():
    why = _netns_possible()
    if why:
        pytest.skip(why)
    tag = str(os.getpid())[-5:]
    h1, h2, v1, v2 = f"ds3a{tag}", f"ds3b{tag}", f"d3a{tag}", f"d3b{tag}"
    _sh("ip", "netns", "add", h1)
    _sh("ip", "netns", "add", h2)
    try:
        _sh("ip", "link", "add", v1, "type", "veth", "peer", "name", v2)
        _sh("ip", "link", "set", v1, "netns", h1)
        _sh("ip", "link", "set", v2, "netns", h2)
        for ns, dev, ip in ((h1, v1, H1_IP), (h2, v2, H2_IP)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield {"h1": h1, "h2": h2, "if1": v1, "if2": v2}
    finally:
        for ns in (h1, h2):
            _kill_namespace_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _wait_port(ns: str, ip: str, port: int, timeout: float) -> None:
    probe = (f"import socket,sys\ns=socket.socket()\ns.settimeout(1)\n"
             f"sys.exit(s.connect_ex(('{ip}', {port})))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(_in_ns(ns, sys.executable, "-c", probe), capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {ip}:{port} in {ns} after {timeout} s")


DRIVER = r"""
import json, sys, time, torch, ray
ray.init(address=sys.argv[2], log_to_driver=False)
deadline = time.monotonic() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2:
    if time.monotonic() > deadline:
        sys.exit("the second Ray node never registered")
    time.sleep(0.5)
from ds3dist import Engine, ParallelLayout
from ds3dist.runtime.options import RuntimeOptions
prompts = json.loads(sys.argv[3])
with Engine(sys.argv[1], ParallelLayout(pp=1, ep=2), execution="bf16", dtype=torch.float32,
            runtime=RuntimeOptions(collective_timeout_s=60)) as engine:
    results = engine.generate(prompts, max_new_tokens=8)
    stats = engine.stats()
print("RESULT " + json.dumps({"tokens": [r.token_ids for r in results],
                             "ranks": [{"node_ip": s.node_ip, "net": s.net}
                                       for s in stats.ranks]}))
"""


def test_engine_across_two_hosts(two_hosts, tiny_fp8_dir, tmp_path):
    import ds3dist
    from ds3dist.tokenizer import load_tokenizer

    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "DS3DIST_TORCH_THREADS": "1"}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RAY_ADDRESS"):
        env.pop(var, None)
    t1, t2 = (tempfile.mkdtemp(prefix="r", dir="/tmp") for _ in range(2))  # short socket paths
    common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
    logs = [open(tmp_path / f"{n}.log", "w") for n in ("head", "worker")]
    try:
        subprocess.Popen(_in_ns(two_hosts["h1"], ray_bin, "start", "--head", f"--port={PORT}",
                                f"--node-ip-address={H1_IP}", f"--temp-dir={t1}",
                                "--include-dashboard=false", *common),
                         env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(two_hosts["h1"], H1_IP, PORT, 90)
        subprocess.Popen(_in_ns(two_hosts["h2"], ray_bin, "start", f"--address={H1_IP}:{PORT}",
                                f"--node-ip-address={H2_IP}", f"--temp-dir={t2}", *common),
                         env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
        driver = subprocess.run(
            _in_ns(two_hosts["h1"], sys.executable, "-c", DRIVER, str(tiny_fp8_dir),
                   f"{H1_IP}:{PORT}", json.dumps(PROMPTS)),
            env=env, capture_output=True, text=True, timeout=300)
    finally:
        for f in logs:
            f.close()
    line = [ln for ln in driver.stdout.splitlines() if ln.startswith("RESULT ")]
    node_logs = {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in ("head", "worker")}
    assert driver.returncode == 0 and line, (driver.stdout[-3000:], driver.stderr[-3000:], node_logs)
    got = json.loads(line[0][len("RESULT "):])

    # one rank per host; each joined the group on its own address and interface
    ips = sorted(r["node_ip"] for r in got["ranks"])
    assert ips == [H1_IP, H2_IP]
    rank0_ip = got["ranks"][0]["node_ip"]  # rank 0 may land on either host
    for r in got["ranks"]:
        want_if = two_hosts["if1"] if r["node_ip"] == H1_IP else two_hosts["if2"]
        assert r["net"]["socket_ifname"]["GLOO_SOCKET_IFNAME"] == want_if
        assert r["net"]["rendezvous"].startswith(rank0_ip + ":")

    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    want = ds3dist.generate(model, load_tokenizer(tiny_fp8_dir), PROMPTS, max_new_tokens=8)
    assert got["tokens"] == [w.token_ids for w in want]
    for t in (t1, t2):
        shutil.rmtree(t, ignore_errors=True)


def _start_node(ns: str, args: list[str], env: dict, log) -> subprocess.Popen:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen(_in_ns(ns, ray_bin, "start", *args), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


WAIT_NODES = r"""
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit("not every Ray node registered")
    time.sleep(0.5)
"""


def _wait_nodes(ns: str, address: str, n: int, env: dict, timeout: float = 90) -> None:
    subprocess.run(_in_ns(ns, sys.executable, "-c", WAIT_NODES, address, str(n), str(timeout)),
                   env=env, check=True, capture_output=True, timeout=timeout + 60)


def test_job_outlives_the_loss_of_the_worker_host(two_hosts, tiny_fp8_dir, tok, tmp_path):
    """`python -m ds3dist.launch` (ep2: one rank per host) while the test kills every process
    of the worker host mid-job and starts its Ray node again: the replica is rebuilt once the
    node is back, and the job completes with the single-process model's records, none lost
    or written twice."""
    import ds3dist
    from ds3dist.local import LocalEngine
    from ds3dist.jobs.batch import run_batch_job

    from ds3dist.jobs.requests import DEFAULT_SAMPLING

    n, greedy = 16, DEFAULT_SAMPLING.overridden({"max_new_tokens": 16, "temperature": 0.0,
                                                 "top_p": 1.0, "top_k": 0, "seed": 0})
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"Host note {i}:"}) + "\n"
                           for i in range(n)))
    model = ds3dist.load_model(tiny_fp8_dir, execution="bf16", dtype=torch.float32)
    run_batch_job(LocalEngine(model, tok), tok, inp, tmp_path / "want.jsonl", sampling=greedy,
                  progress=False)
    want = {r["id"]: r["token_ids"] for r in map(json.loads, open(tmp_path / "want.jsonl"))}

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "DS3DIST_TORCH_THREADS": "1"}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RAY_ADDRESS"):
        env.pop(var, None)
    t1, t2 = (tempfile.mkdtemp(prefix="r", dir="/tmp") for _ in range(2))
    common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
    worker_args = [f"--address={H1_IP}:{PORT}", f"--node-ip-address={H2_IP}",
                   f"--temp-dir={t2}", *common]
    out = tmp_path / "out.jsonl"
    with open(tmp_path / "nodes.log", "w") as log:
        _start_node(two_hosts["h1"], ["--head", f"--port={PORT}", f"--node-ip-address={H1_IP}",
                                      f"--temp-dir={t1}", "--include-dashboard=false", *common],
                    env, log)
        _wait_port(two_hosts["h1"], H1_IP, PORT, 90)
        _start_node(two_hosts["h2"], worker_args, env, log)
        _wait_nodes(two_hosts["h1"], f"{H1_IP}:{PORT}", 2, env)
        launch = subprocess.Popen(
            _in_ns(two_hosts["h1"], sys.executable, "-m", "ds3dist.launch", "model=tiny",
                   f"model.path={tiny_fp8_dir}", "+parallel=ep2", f"runtime.address={H1_IP}:{PORT}",
                   "runtime.startup_timeout_s=180", "runtime.collective_timeout_s=30",
                   "runtime.max_seqs=2", "execution.dtype=float32", "sampling.temperature=0",
                   "sampling.max_new_tokens=16", f"job.input={inp}", f"job.output={out}",
                   "job.progress=false"),
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
                assert launch.poll() is None and time.monotonic() < deadline, \
                    launch.communicate(timeout=30)
                time.sleep(0.1)
            _kill_namespace_processes(two_hosts["h2"])  # the worker host is lost
            time.sleep(2)
            _start_node(two_hosts["h2"], worker_args, env, log)  # and comes back
            stdout, stderr = launch.communicate(timeout=420)
        finally:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode == 0, stdout[-3000:] + stderr[-5000:]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == sorted(want), "lost or duplicated lines"
    assert {r["id"]: r["token_ids"] for r in got} == want
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    rec = summary["recovery"]
    print("recovery:", rec)
    assert rec["restarts"] >= 1 and H2_IP in rec["events"][0]["cause"], rec
    for t in (t1, t2):
        shutil.rmtree(t, ignore_errors=True)
