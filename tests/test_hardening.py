"""Failures that name their cause, checks before the cluster starts, and input edge cases.

One test (or more) per case a hostile but fair user tried: each asserts that the message
names the cause (file, tensor, rank, key or address) and that nothing already written is
lost or changed. Launches run in-process through `launch.run` with an engine factory that
fails the test if called, so "before any Ray cluster starts" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from ds3dist import launch
from ds3dist.jobs.batch import run_batch_job
from ds3dist.jobs.errors import JobError
from ds3dist.jobs.input_text import read_input
from ds3dist.jobs.output_file import OutputFile
from ds3dist.jobs.requests import DEFAULT_SAMPLING, PromptEncoder, parse_input
from ds3dist.jobs.schema import LaunchConfigError
from ds3dist.parallel.layout import ParallelLayout
from ds3dist.runtime.cluster import ClusterError
from ds3dist.runtime.options import RuntimeOptions
from test_jobs import FakeEngine, read_jsonl, write_lines

PKG_ROOT = str(Path(__file__).resolve().parents[1])
GREEDY = DEFAULT_SAMPLING.overridden({"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0,
                                      "top_k": 0, "seed": 0, "stop": None})


def compose_cfg(*overrides: str):
    with initialize_config_module(config_module="ds3dist.conf", version_base=None):
        return compose(config_name="config", overrides=["job.progress=false", *overrides])


def no_engine(*_args):
    raise AssertionError("the engine (and its Ray cluster) must not start")


def linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """The checkpoint's files as symlinks (cheap), config.json copied so it can be edited."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in skip:
            continue
        if f.name == "config.json":
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()
            if p.is_file()}


# ---- the checkpoint: broken ones fail before Ray, naming file and tensor -----------------
def _break(case: str, ckpt: Path) -> str:
    """Break a linked copy; return a string the error must contain."""
    if case == "hidden_size":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["hidden_size"] += 64
        (ckpt / "config.json").write_text(json.dumps(cfg))
        return "tensor model.embed_tokens.weight: shape [129280, 192], expected [129280, 256]"
    if case == "shard_deleted":
        (ckpt / "model-00002-of-00004.safetensors").unlink()
        return "model-00002-of-00004.safetensors: tensor model."
    (ckpt / "model.safetensors.index.json").unlink()
    return "model.safetensors.index.json"


@pytest.mark.parametrize("case", ["hidden_size", "shard_deleted", "index_removed"])
def test_broken_checkpoint_fails_before_the_cluster(case, tmp_path, tiny_fp8_dir):
    ckpt = linked_copy(tiny_fp8_dir, tmp_path / "ckpt")
    needle = _break(case, ckpt)
    out = tmp_path / "out.jsonl"
    cfg = compose_cfg(f"model.path={ckpt}", f"job.output={out}")
    with pytest.raises(LaunchConfigError) as e:
        launch.run(cfg, engine_factory=no_engine)
    msg = str(e.value)
    assert msg.startswith("model.path:") and needle in msg, msg
    assert "python -m ds3dist.checkpoint.inspect" in msg


def test_flipped_data_is_named_by_model_verify(tmp_path, tiny_bf16_dir, tok):
    """1 MiB flipped in a shard's data (header intact): the header check passes, and
    model.verify=true names the shard before any cluster starts."""
    shard = "model-00002-of-00004.safetensors"
    ckpt = linked_copy(tiny_bf16_dir, tmp_path / "ckpt", skip=(shard,))
    data = bytearray((tiny_bf16_dir / shard).read_bytes())
    mid = len(data) // 2
    data[mid:mid + (1 << 20)] = bytes(b ^ 0xFF for b in data[mid:mid + (1 << 20)])
    (ckpt / shard).write_bytes(bytes(data))
    out = tmp_path / "out.jsonl"
    calls = []
    launch.run(compose_cfg(f"model.path={ckpt}", f"job.output={out}"),
               engine_factory=lambda *a: calls.append(a) or FakeEngine(tok))
    assert calls, "without model.verify the headers alone pass"
    with pytest.raises(LaunchConfigError) as e:
        launch.run(compose_cfg(f"model.path={ckpt}", f"job.output={tmp_path / 'o2.jsonl'}",
                               "model.verify=true"), engine_factory=no_engine)
    msg = str(e.value)
    assert f"[checksum] {shard}" in msg and "inspect --verify" in msg, msg


def test_rank_load_failure_reaches_the_user_whole(ray_cluster, tmp_path, tiny_fp8_dir):
    """Without the preflight (the Python API), the rank's CheckpointError comes back whole."""
    from ds3dist.runtime.engine import Engine, EngineError

    ckpt = linked_copy(tiny_fp8_dir, tmp_path / "ckpt")
    (ckpt / "model-00001-of-00004.safetensors").unlink()
    with pytest.raises(EngineError) as e:
        Engine(ckpt, ParallelLayout(pp=2, ep=1), dtype=torch.float32,
               runtime=RuntimeOptions(startup_timeout_s=120))
    msg = str(e.value)
    assert msg.startswith("loading failed")
    assert "rank 0 (stage 0, ep rank 0) on node" in msg
    assert "CheckpointError: model-00001-of-00004.safetensors: shard file is missing (needed " \
           "for tensor 'model." in msg, msg
    assert "ray::" not in msg


@pytest.mark.slow  # waits out a collective timeout, a ping and the kill of a stopped process
def test_stopped_rank_is_named_when_a_collective_hangs(ray_cluster, tiny_fp8_dir):
    """SIGSTOP one expert-parallel rank mid-job: its peer times out in the collective, and
    the error names the stopped rank as the one that is behind."""
    from ds3dist.runtime.engine import Engine, EngineError

    engine = Engine(tiny_fp8_dir, ParallelLayout(pp=1, ep=2), dtype=torch.float32,
                    runtime=RuntimeOptions(collective_timeout_s=5))
    victim = engine.infos[1]
    outcome: dict = {}

    def run():
        try:
            engine.generate(["Hello there", "The sea is"] * 2, max_new_tokens=5000)
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        time.sleep(2.0)
        os.kill(victim["pid"], signal.SIGSTOP)
        th.join(timeout=90)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(victim["pid"], sig)
            except ProcessLookupError:
                pass
    assert not th.is_alive(), "generate did not return after a rank stopped"
    msg = str(outcome.get("error"))
    assert isinstance(outcome.get("error"), EngineError), msg
    lines = {ln.split(":")[0].strip(): ln for ln in msg.splitlines()[1:]}
    stopped = [v for k, v in lines.items() if k.startswith("rank 1 ")]
    waiting = [v for k, v in lines.items() if k.startswith("rank 0 ")]
    assert stopped and "stopped or hung: last heard" in stopped[0], msg
    # rank 0 either timed out in the collective (and says where), or had finished its part
    # of the step and waits for nothing: it is never the one named as behind
    assert not waiting or ("RankStepError" in waiting[0] and "in collective #" in waiting[0]), msg
    assert engine.actors == []


# ---- the Ray address: bounded, named with its source ---------------------------------------
def test_refused_ray_address_fails_at_once_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    cfg = compose_cfg(f"job.output={tmp_path / 'o.jsonl'}")
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as e:
        launch.run(cfg, engine_factory=no_engine)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("$RAY_ADDRESS:") and "127.0.0.1:1" in msg, msg


def test_silent_ray_address_fails_within_connect_timeout(tmp_path, monkeypatch):
    """A host that never answers (a listener whose backlog is full drops the SYN)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fill.append(c)
    try:
        cfg = compose_cfg(f"job.output={tmp_path / 'o.jsonl'}",
                          f"runtime.address=127.0.0.1:{port}", "runtime.connect_timeout_s=2")
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as e:
            launch.run(cfg, engine_factory=no_engine)
        took = time.monotonic() - t0
    finally:
        for c in fill + [srv]:
            c.close()
    assert 1.5 <= took <= 2 + 5, took
    msg = str(e.value)
    assert msg.startswith("runtime.address:") and f"127.0.0.1:{port}" in msg
    assert "timed out" in msg and "connect_timeout_s=2" in msg


# ---- the input file ------------------------------------------------------------------------
def test_jsonl_splits_on_newline_only(tmp_path, tok):
    """Strings holding U+2028, U+2029 and U+0085, as json.dumps(ensure_ascii=False) writes
    them, stay inside their line; CRLF endings are tolerated; line numbers stay right."""
    rows = [{"id": 1, "prompt": "a\u2028b"}, {"id": 2, "prompt": "c\x85d"},
            {"id": 3, "prompt": "e\u2029f"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows) + "{broken\r\n"
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(text.encode("utf-8"))
    out = tmp_path / "out.jsonl"
    s = run_batch_job(FakeEngine(tok), tok, inp, out, sampling=GREEDY, progress=False)
    assert sorted(r["id"] for r in read_jsonl(out)) == [1, 2, 3]
    errs = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert [e["line"] for e in errs] == [4] and s.counts.lines == 4
    enc = PromptEncoder(tok, 1 << 20, "limit")
    parsed = parse_input(read_input(inp).lines, "native", enc, GREEDY)
    assert [r.prompt_ids for r in parsed.requests] == [enc.prompt(r["prompt"]) for r in rows]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
                                      "utf-32"])
def test_other_unicode_encodings_are_decoded(tmp_path, tok, encoding):
    rows = [{"id": "x", "prompt": "Grüße aus Köln"}, {"id": "y", "prompt": "東京"}]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    .encode(encoding))
    got = read_input(inp)
    assert got.lines == [json.dumps(r, ensure_ascii=False) for r in rows]
    assert got.encoding.replace("_", "-").startswith(encoding.split("-sig")[0][:6])


def test_binary_input_is_one_error(tmp_path, tok):
    inp = tmp_path / "garbage.jsonl"
    inp.write_bytes(random.Random(0).randbytes(20_000))
    out = tmp_path / "out.jsonl"
    with pytest.raises(JobError) as e:
        run_batch_job(FakeEngine(tok), tok, inp, out, sampling=GREEDY, progress=False)
    msg = str(e.value)
    assert msg.startswith("job.input:") and str(inp) in msg and "not a text file" in msg
    assert not out.exists() and not Path(str(out) + ".errors.jsonl").exists()


def test_a_latin1_line_is_a_line_error_naming_the_encoding(tmp_path, tok):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": 1, "prompt": "fine"}\n{"id": 2, "prompt": "caf\xe9"}\n'
                    b'{"id": 3, "prompt": "also fine"}\n')
    out = tmp_path / "out.jsonl"
    run_batch_job(FakeEngine(tok), tok, inp, out, sampling=GREEDY, progress=False)
    assert sorted(r["id"] for r in read_jsonl(out)) == [1, 3]
    (err,) = read_jsonl(Path(str(out) + ".errors.jsonl"))
    assert err["line"] == 2 and err["code"] == "invalid_encoding"
    assert "not valid UTF-8 (byte 0xe9" in err["reason"]


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n"])
def test_empty_input_exits_zero_with_a_warning(tmp_path, capsys, content):
    inp = tmp_path / "empty.jsonl"
    inp.write_bytes(content)
    out = tmp_path / "out.jsonl"
    assert launch.run(compose_cfg(f"job.input={inp}", f"job.output={out}"),
                      engine_factory=no_engine) is None
    err = capsys.readouterr().err
    assert "warning: job.input:" in err and str(inp) in err and "no requests" in err
    assert list(tmp_path.iterdir()) == [inp]


def test_line_errors_use_the_key_the_line_used(tok):
    enc = PromptEncoder(tok, 1 << 20, "limit")
    lines = [json.dumps({"id": 1, "prompt": "x", "max_tokens": -5}),
             json.dumps({"id": 2, "prompt": "x", "max_new_tokens": -5}),
             json.dumps({"custom_id": "c", "body": {"prompt": "x", "max_completion_tokens": 0}})]
    native = parse_input(lines[:2], "native", enc, GREEDY).errors
    assert [e.message.split(":")[0] for e in native] == ["max_tokens", "max_new_tokens"]
    (oa,) = parse_input(lines[2:], "openai", enc, GREEDY).errors
    assert oa.message.startswith("body.max_completion_tokens:")


# ---- the output file ------------------------------------------------------------------------
def test_second_job_on_the_same_output_is_refused_at_once(tmp_path, tiny_fp8_dir):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.jsonl"
    out.write_text('{"id": 1, "text": "x"}\n')
    Path(str(out) + ".errors.jsonl").write_text('{"line": 3}\n')
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}, "{bad"])
    before = snapshot(out_dir)
    with OutputFile.open(out):  # the running job holds the lock
        t0 = time.monotonic()
        with pytest.raises(JobError) as e:
            launch.run(compose_cfg(f"model.path={tiny_fp8_dir}", f"job.input={inp}",
                                   f"job.output={out}"), engine_factory=no_engine)
        took = time.monotonic() - t0
    assert took < 2, took
    assert str(e.value).startswith("job.output:") and "another job" in str(e.value)
    assert snapshot(out_dir) == before


def test_output_that_is_a_directory_is_named(tmp_path, tiny_fp8_dir):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    (tmp_path / "results").mkdir()
    with pytest.raises(JobError) as e:
        launch.run(compose_cfg(f"model.path={tiny_fp8_dir}", f"job.input={inp}",
                               f"job.output={tmp_path / 'results'}"), engine_factory=no_engine)
    assert str(e.value).startswith(f"job.output: {tmp_path / 'results'} is a directory")
    with pytest.raises(JobError) as e:
        launch.run(compose_cfg(f"model.path={tiny_fp8_dir}", f"job.input={inp}",
                               f"job.output={tmp_path / 'r.jsonl'}",
                               f"job.summary={tmp_path / 'results'}"), engine_factory=no_engine)
    assert str(e.value).startswith("job.summary:")


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (needs root and mount); yields (mountpoint, remount(options))."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")

    def remount(opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_output_is_named_and_left_intact(tmpfs, tmp_path, tiny_fp8_dir):
    mnt, remount = tmpfs
    out = mnt / "out.jsonl"
    out.write_text('{"id": 1, "text": "kept"}\n')
    remount("ro")
    before = snapshot(mnt)
    inp = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "y"}])
    with pytest.raises(JobError) as e:
        launch.run(compose_cfg(f"model.path={tiny_fp8_dir}", f"job.input={inp}",
                               f"job.output={out}"), engine_factory=no_engine)
    msg = str(e.value)
    assert msg.startswith(f"job.output: cannot open {out}") and "Read-only file system" in msg
    assert snapshot(mnt) == before


def test_full_disk_stops_naming_the_output_and_a_rerun_resumes(tmpfs, tmp_path, tok):
    mnt, remount = tmpfs
    rows = [{"id": i, "prompt": f"request {i} " * (1 + i % 5)} for i in range(120)]
    inp = write_lines(tmp_path / "in.jsonl", rows)
    sampling = GREEDY.overridden({"max_new_tokens": 48})
    ref = tmp_path / "ref.jsonl"
    run_batch_job(FakeEngine(tok), tok, inp, ref, sampling=sampling, progress=False)

    out = mnt / "out.jsonl"
    with pytest.raises(JobError) as e:
        run_batch_job(FakeEngine(tok), tok, inp, out, sampling=sampling, progress=False)
    msg = str(e.value)
    assert msg.startswith("job.") and "No space left on device" in msg, msg
    kept = out.read_text().split("\n") if out.exists() else [""]
    assert kept[-1] == "", "a partial line was left behind"
    kept = [json.loads(x) for x in kept[:-1]]
    if msg.startswith("job.output:"):
        assert f"{len(kept)} lines are safely on disk" in msg and "rerun" in msg
    assert 0 < len(kept) < len(rows)

    remount("size=4m")
    run_batch_job(FakeEngine(tok), tok, inp, out, sampling=sampling, progress=False)
    got = {r["id"]: r for r in read_jsonl(out)}
    assert len(read_jsonl(out)) == len(rows)
    assert got == {r["id"]: r for r in read_jsonl(ref)}


# ---- the launch command: one line naming the cause, the traceback in the log ----------------
def test_launch_prints_the_cause_and_keeps_the_traceback_in_its_log(tmp_path, tiny_fp8_dir):
    ckpt = linked_copy(tiny_fp8_dir, tmp_path / "ckpt")
    (ckpt / "model-00001-of-00004.safetensors").unlink()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=PKG_ROOT)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "ds3dist.launch", f"model.path={ckpt}",
                        f"job.output={tmp_path / 'out.jsonl'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert "error: model.path:" in p.stderr and "model-00001-of-00004.safetensors" in p.stderr
    log = Path(p.stderr.rsplit("(traceback in ", 1)[1].split(")")[0])
    assert log.is_file() and "Traceback (most recent call last)" in log.read_text()
