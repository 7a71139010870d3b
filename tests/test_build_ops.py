"""One-time builds (ds3dist.build_ops): each op ready, not applicable here with the reason, or
failed with its error (exit 1); the launch's step stops for an op the offload needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ds3dist import build_ops
from ds3dist.runtime.options import OffloadError
from ds3dist.runtime.options import OffloadOptions


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds3dist.build_ops", *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_an_op_that_does_not_apply_says_why_and_is_not_an_error():
    p = _cli("--json", "cpu_kernels", DS3DIST_CPU_KERNEL="0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cpu_kernels: not built: switched off by DS3DIST_CPU_KERNEL=0" in p.stdout
    assert json.loads(p.stdout.splitlines()[-1]) == [
        {"name": "cpu_kernels", "state": "unavailable", "seconds": 0.0, "built": False,
         "reason": "switched off by DS3DIST_CPU_KERNEL=0"}]


def test_a_failed_build_exits_1_with_its_error(tmp_path):
    """No working compiler (CXX=/bin/false) in an empty extension folder: every op that
    applies here fails, naming the compiler's error; nothing is called ready."""
    p = _cli("--json", TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/bin/false")
    ops = {op["name"]: op for op in json.loads(p.stdout.splitlines()[-1])}
    tried = [n for n, op in ops.items() if op["state"] != "unavailable"]
    if not tried:
        pytest.skip(f"no op applies to this machine: {ops}")
    assert p.returncode == 1, p.stdout + p.stderr
    for name in tried:
        assert ops[name]["state"] == "failed" and "/bin/false" in ops[name]["reason"]
        assert f"{name}: FAILED: " in p.stdout
    assert f"FAILED: {', '.join(tried)}" in p.stdout


def test_bad_op_name_exits_2():
    p = _cli("cpu_kernel")
    assert p.returncode == 2 and "unknown op cpu_kernel" in p.stderr


def test_a_build_says_its_cost_first_and_then_how_long_it_has_run(monkeypatch):
    monkeypatch.setattr(build_ops, "TICK_S", 0.05)
    said = []
    with build_ops._progress("async_io", False, said.append):
        time.sleep(0.3)
    assert said[0].startswith("building async_io once for this machine (3 to 6 minutes")
    assert len(said) >= 3 and all(s.startswith("still building async_io (") for s in said[1:])
    said.clear()
    with build_ops._progress("async_io", True, said.append):  # cached: loaded quietly
        pass
    assert said == []
    with build_ops._progress("async_io", True, said.append):  # cached, but rebuilt
        time.sleep(0.12)
    assert said and said[0].startswith("still rebuilding (its sources, flags or torch changed) "
                                       "async_io (")


@pytest.mark.parametrize("device,missing", [("nvme", "async_io"), ("cpu", "shm_comm")])
def test_the_launch_stops_at_once_without_an_op_the_offload_needs(monkeypatch, device,
                                                                 missing):
    def fake(name, device_type, say):
        state = "unavailable" if name == missing else "ready"
        return build_ops.OpBuild(name, state, "libaio is missing" if state != "ready" else "")

    monkeypatch.setattr(build_ops, "deepspeed_op", fake)
    monkeypatch.setattr(build_ops, "cpu_kernels", lambda say: build_ops.OpBuild(
        "cpu_kernels", "unavailable", "switched off"))

    def in_process(names, device_type, say):  # the child's work, here (so the fakes apply)
        results = build_ops.build(names, device_type, say)
        for op in results:
            say(build_ops.describe(op))
        return results

    monkeypatch.setattr(build_ops, "_build_in_child", in_process)
    said = []
    opt = OffloadOptions(device=device, nvme_path="/tmp" if device == "nvme" else None)
    with pytest.raises(OffloadError) as e:
        build_ops.for_ranks("cpu", opt, said.append)
    assert str(e.value).startswith(f"execution.offload.device={device}: {missing}: not built")
    assert "cpu_kernels: not built: switched off" in said  # without the kernels it goes on
    assert build_ops.for_ranks("cpu", None, said.append)[0].name == "cpu_kernels"


def test_the_launch_builds_in_a_child_and_relays_its_lines():
    said = []
    got = build_ops.for_ranks("cpu", None, said.append)
    assert [op.name for op in got] == ["cpu_kernels"] and got[0].state in ("ready", "unavailable")
    assert any(line.startswith("cpu_kernels: ") for line in said)
    assert not any(line[:1] == "[" or " ops ready or not applicable" in line for line in said)


@pytest.mark.parametrize("text, has, lacks", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f\n", {"avx2", "avx512f"}, {"asimddp"}),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp sve\nCPU part\t: 0xd40\n",
     {"asimd", "asimddp"}, {"avx2", "Features", ":"}),
    ("processor\t: 0\n", set(), {"flags"}),
])
def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path, monkeypatch, text, has, lacks):
    """What picks the kernels' builds and flags (AVX-512 VNNI, ARM sdot) on each CPU."""
    from ds3dist.model import cpu_kernel
    from ds3dist.model.options import cpu_flags

    path = tmp_path / "cpuinfo"
    path.write_text(text)
    flags = cpu_flags(str(path))
    assert has <= flags and not lacks & flags
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: flags)
    sdot = "-march=armv8.2-a+dotprod" in cpu_kernel.isa_flags("neon")
    assert sdot == ("asimddp" in has)
