"""verify(): SHA256SUMS digests (checked against sha256sum itself) and NaN/Inf/bad-scale values
(checked against safetensors' own reader) found in a stream; the inspect --verify CLI; scale
checks when loading."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds3dist.checkpoint import inspect
from ds3dist.checkpoint.layout import TORCH_TO_ST, TensorSpec
from ds3dist.checkpoint.reader import CheckpointError, CheckpointReader, read_header
from ds3dist.checkpoint.synthesize import write_shard
from ds3dist.checkpoint.validation import KINDS, validate
from ds3dist.checkpoint.verify import MANIFEST, verify
from ds3dist.config import ModelConfig
from ds3dist.model.load import build_model, load_model
from ds3dist.model.options import BuildOptions

MiB = 1 << 20


def _copy(src: Path, dst: Path, real: tuple[str, ...] = ()) -> Path:
    """dst with symlinks to src's files, except `real` ones, which are copied (to be modified)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name in real:
            shutil.copyfile(p, dst / p.name)
        else:
            (dst / p.name).symlink_to(p)
    return dst


def _sha256sum_check(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sha256sum", "-c", "--strict", MANIFEST], cwd=d, capture_output=True,
                          text=True, timeout=60)


def _oracle(shard: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (non-finite count, first flat index)} from safetensors' own reader."""
    out = {}
    for n, t in load_file(str(shard)).items():
        bad = ~torch.isfinite(t.float().reshape(-1))
        if bad.any():
            out[n] = (int(bad.sum()), int(bad.nonzero()[0]))
    return out


def _found(problems, kind: str) -> dict[str, tuple[int, int]]:
    """{tensor: (count, first flat index)} parsed from verify's problems of one kind."""
    out = {}
    for p in problems:
        if p.kind == kind:
            m = re.match(r"(\d+) of \d+ .*flat index (\d+)\)", p.message)
            out[p.tensor] = (int(m.group(1)), int(m.group(2)))
    return out


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _offset(path: Path, tensor: str, index: int) -> int:
    """File offset of element `index` of `tensor`."""
    h = read_header(path)
    e = h.entries[tensor]
    return h.data_start + e.start + index * (e.nbytes // e.numel)


def _shard_of(d: Path, tensor: str) -> str:
    with CheckpointReader(d) as r:
        return r.shard_of(tensor)


def test_new_kinds_are_listed():
    assert {"checksum", "manifest", "nonfinite", "bad_scale", "read_error"} <= set(KINDS)


# ---- clean checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_fp8_dir", "tiny_bf16_dir"])
def test_clean_checkpoint_verifies_and_sha256sum_agrees(fixture, request):
    d = request.getfixturevalue(fixture)  # synthesized (fp8) / converted (bf16)
    notes = []
    assert verify(d, progress=False, note=notes.append) == []
    assert notes == []
    r = _sha256sum_check(d)
    assert r.returncode == 0, r.stdout + r.stderr
    checked = {line.rsplit(": ", 1)[0] for line in r.stdout.splitlines() if line.endswith(": OK")}
    assert checked == {p.name for p in d.iterdir()} - {MANIFEST}  # every file, once
    lines = (d / MANIFEST).read_text().splitlines()
    assert lines == sorted(lines, key=lambda line: line.split("  ", 1)[1])  # sorted by name


def test_cli_exit_codes(tiny_fp8_dir, tmp_path, capsys):
    assert inspect.main(["--verify", "--no-progress", str(tiny_fp8_dir)]) == 0
    out = capsys.readouterr().out
    assert "headers: valid" in out and "data: valid" in out and "note:" not in out
    assert inspect.main(["--verify", str(tmp_path / "nope")]) == 2


# ---- a flipped MiB in a bf16 shard -------------------------------------------------------
@pytest.fixture(scope="module")
def flipped(tiny_bf16_dir, tmp_path_factory):
    """tiny bf16 with 1 MiB XORed with 0xFF in the middle of its largest shard's data."""
    shard = max((p for p in tiny_bf16_dir.glob("*.safetensors")), key=lambda p: p.stat().st_size)
    d = _copy(tiny_bf16_dir, tmp_path_factory.mktemp("flip") / "ckpt", real=(shard.name, MANIFEST))
    h = read_header(d / shard.name)
    mid = (h.data_start + h.file_size) // 2
    with open(d / shard.name, "r+b") as f:
        f.seek(mid)
        data = bytes(b ^ 0xFF for b in f.read(MiB))
        f.seek(mid)
        f.write(data)
    assert h.file_size - h.data_start > 2 * MiB
    return d, shard.name


def test_flip_is_found_by_checksum_only(flipped, tiny_bf16_dir):
    d, shard = flipped
    assert validate(d) == []  # the headers are intact
    problems = verify(d, progress=False)
    sums = [p for p in problems if p.kind == "checksum"]
    assert [p.file for p in sums] == [shard]
    want = (tiny_bf16_dir / MANIFEST).read_text().split(f"  {shard}")[0][-64:]
    assert want in sums[0].message
    assert hashlib.sha256((d / shard).read_bytes()).hexdigest() in sums[0].message
    assert _found(problems, "nonfinite") == _oracle(d / shard)


def test_flip_without_manifest(flipped, tmp_path, capsys):
    d, shard = flipped
    bare = _copy(d, tmp_path / "bare")
    (bare / MANIFEST).unlink()
    notes = []
    problems = verify(bare, progress=False, note=notes.append)
    assert any(MANIFEST in n and "no" in n for n in notes)
    # what the value checks see: exactly the NaN/Inf safetensors reads back (XOR 0xFF turns a
    # bf16 exponent 0b0111xxxx into 0b1000xxxx: large but finite, so usually nothing)
    oracle = _oracle(bare / shard)
    assert _found(problems, "nonfinite") == oracle
    assert {p.kind for p in problems} <= {"nonfinite"}
    rc = inspect.main(["--verify", "--no-progress", str(bare)])
    out = capsys.readouterr().out
    assert f"no {MANIFEST}" in out
    assert rc == (1 if oracle else 0)


# ---- the manifest ------------------------------------------------------------------------
def test_malformed_manifest_line_is_named(tiny_fp8_dir, tmp_path):
    d = _copy(tiny_fp8_dir, tmp_path / "ckpt", real=(MANIFEST,))
    lines = [line for line in (d / MANIFEST).read_text().splitlines()
             if line.endswith(".json")]  # small files only: a fast sha256sum
    lines[0] = lines[0].replace("  ", " *", 1)  # binary-mode line: valid
    lines.insert(2, "deadbeef  config.json")  # line 3
    lines.append("0" * 64 + "  tokenizer.model")  # listed, missing
    (d / MANIFEST).write_text("\n".join(lines) + "\n")
    r = _sha256sum_check(d)
    assert "1 line is improperly formatted" in r.stderr  # sha256sum agrees on what is malformed
    notes = []
    problems = verify(d, progress=False, note=notes.append)
    assert notes == [f"4 shard(s) not in {MANIFEST}, not checksummed (first: "
                     f"model-00001-of-00004.safetensors)"]
    assert {(p.kind, p.file) for p in problems} == {("manifest", MANIFEST),
                                                    ("manifest", "tokenizer.model")}
    assert "line 3" in next(p.message for p in problems if p.file == MANIFEST)


# ---- NaN / Inf in weights ----------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 65539])  # default; odd reads that split the tensor
def test_nan_and_inf_in_bf16_weight(tiny_bf16_dir, tmp_path, chunk, capsys):
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"  # [192, 160] bf16
    shard = _shard_of(tiny_bf16_dir, name)
    d = _copy(tiny_bf16_dir, tmp_path / "ckpt", real=(shard,))
    for i, bits in ((7, 0x7FC0), (15000, 0xFF80), (30719, 0xFFC1)):  # NaN, -Inf, NaN
        _poke(d / shard, _offset(d / shard, name, i), struct.pack("<H", bits))
    kw = {"chunk": chunk} if chunk else {}
    problems = verify(d, progress=False, **kw)
    assert _oracle(d / shard) == {name: (3, 7)}
    assert _found(problems, "nonfinite") == {name: (3, 7)}
    assert {(p.kind, p.file) for p in problems} == {("checksum", shard), ("nonfinite", shard)}
    if chunk is None:
        assert inspect.main(["--verify", "--no-progress", str(d)]) == 1
        out = capsys.readouterr().out
        assert f"[nonfinite] {shard}: tensor {name}: 3 of 30720" in out


def test_nan_in_fp8_weight(tiny_fp8_dir, tmp_path):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    shard = _shard_of(tiny_fp8_dir, name)
    d = _copy(tiny_fp8_dir, tmp_path / "ckpt", real=(shard,))
    for i, bits in ((11, 0x7F), (12, 0xFF)):  # e4m3fn NaN, both signs
        _poke(d / shard, _offset(d / shard, name, i), bytes([bits]))
    assert _found(verify(d, progress=False), "nonfinite") == _oracle(d / shard) == {name: (2, 11)}


def test_odd_offsets_and_tiny_reads(tmp_path):
    """Tensors at odd byte offsets, read 8..13 bytes at a time: never a split element."""
    a = torch.zeros(3, dtype=torch.float8_e4m3fn)  # 3 bytes: everything after is misaligned
    b = torch.ones(1001, dtype=torch.bfloat16)
    b[0], b[1000] = float("nan"), float("inf")
    c = torch.ones(333, dtype=torch.float32)
    c[100] = float("-inf")
    d = tmp_path / "single"
    d.mkdir()
    specs = [TensorSpec(n, tuple(t.shape), TORCH_TO_ST[t.dtype]) for n, t in zip("abc", (a, b, c))]
    write_shard(d / "model.safetensors", specs, [a, b, c])  # in this order, unlike save_file
    h = read_header(d / "model.safetensors")
    assert (h.data_start + h.entries["b"].start) % 2 == 1
    for chunk in range(8, 14):
        problems = verify(d, progress=False, chunk=chunk)
        assert _found(problems, "nonfinite") == {"b": (2, 0), "c": (1, 100)}, chunk


# ---- scales ------------------------------------------------------------------------------
SCALE = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"


@pytest.mark.parametrize("value", [0.0, float("inf")])
def test_bad_scale_found_and_load_refuses(tiny_fp8_dir, tmp_path, value):
    shard = _shard_of(tiny_fp8_dir, SCALE)
    d = _copy(tiny_fp8_dir, tmp_path / "ckpt", real=(shard,))
    _poke(d / shard, _offset(d / shard, SCALE, 1), struct.pack("<f", value))
    problems = verify(d, progress=False)
    bad = [p for p in problems if p.kind == "bad_scale"]
    assert [(p.file, p.tensor) for p in bad] == [(shard, SCALE)]
    assert bad[0].message.startswith("1 of ") and "flat index 1" in bad[0].message
    with pytest.raises(CheckpointError) as ei:
        load_model(d, layers=[0])
    assert shard in str(ei.value) and SCALE in str(ei.value) and "1 of" in str(ei.value)


def test_build_model_refuses_bad_scale_in_memory(tiny_fp8_dir):
    with CheckpointReader(tiny_fp8_dir) as r:
        tensors = r.read_many(r.names())
    tensors[SCALE] = tensors[SCALE].clone()
    tensors[SCALE][0, 0] = -1.0
    opts = BuildOptions(ModelConfig.from_json(tiny_fp8_dir), "bf16", torch.float32)
    with pytest.raises(CheckpointError, match=f"in-memory.*{SCALE}.*1 of"):
        build_model(opts, tensors, layers=[0])


def test_cli_subprocess_exit_code_for_problems(tiny_fp8_dir, tmp_path):
    shard = _shard_of(tiny_fp8_dir, SCALE)
    d = _copy(tiny_fp8_dir, tmp_path / "ckpt", real=(shard,))
    _poke(d / shard, _offset(d / shard, SCALE, 0), struct.pack("<f", float("nan")))
    r = subprocess.run([sys.executable, "-m", "ds3dist.checkpoint.inspect", "--verify",
                        "--no-progress", str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"[bad_scale] {shard}: tensor {SCALE}" in r.stdout
    assert f"[checksum] {shard}" in r.stdout
