"""CheckpointReader lazy reads and validate(): one test per corruption kind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds3dist.checkpoint.layout import expected_tensors
from ds3dist.checkpoint.reader import CheckpointError, CheckpointReader, read_header
from ds3dist.checkpoint.summary import summary
from ds3dist.checkpoint.validation import Problem, validate
from ds3dist.config import preset

INDEX = "model.safetensors.index.json"


# ---- the reader ----------------------------------------------------------------------------
def test_reader_index_and_names(tiny_fp8_dir):
    index = json.loads((tiny_fp8_dir / INDEX).read_text())
    with CheckpointReader(tiny_fp8_dir) as r:
        assert r.config == preset("tiny")
        assert r.names() == list(index["weight_map"])
        assert r.has("lm_head.weight") and "lm_head.weight" in r
        assert not r.has("lm_head.bias")
        for n in ("model.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
            assert r.shard_of(n) == index["weight_map"][n]
        assert r.bytes_read == 0  # opening reads no tensor data


def test_get_and_read_many_equal_safetensors_load(tiny_fp8_dir):
    with CheckpointReader(tiny_fp8_dir) as r:
        shard = r.shard_of("model.layers.1.mlp.experts.5.gate_proj.weight")
        ref = load_file(str(tiny_fp8_dir / shard))
        names = [n for n in ref if n.startswith("model.layers.1.mlp.experts.5.")]
        assert len(names) == 6
        got = r.read_many(names)
        assert list(got) == names
        for n in names:
            assert got[n].dtype == ref[n].dtype and torch.equal(got[n].view(torch.uint8),
                                                                ref[n].view(torch.uint8))
        assert r.bytes_read == sum(ref[n].numel() * ref[n].element_size() for n in names)
        t = r.get("model.norm.weight")
        assert torch.equal(t, load_file(str(tiny_fp8_dir / r.shard_of("model.norm.weight")))[
            "model.norm.weight"])


def test_read_many_opens_each_shard_once(tiny_fp8_dir, monkeypatch):
    import safetensors

    opened = []
    real = safetensors.safe_open

    def counting(path, *a, **k):
        opened.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    with CheckpointReader(tiny_fp8_dir) as r:
        names = [n for n in r.names() if ".mlp.gate." in n or n.endswith("norm.weight")]
        shards = {r.shard_of(n) for n in names}
        assert len(shards) > 1
        r.read_many(names)
    assert sorted(opened) == sorted(shards)


def test_get_slice_of_expert_rows_reads_only_those_bytes(tiny_fp8_dir):
    name = "model.layers.2.mlp.experts.9.down_proj.weight"  # [192, 160] FP8: 1 byte per element
    with CheckpointReader(tiny_fp8_dir) as r:
        full = load_file(str(tiny_fp8_dir / r.shard_of(name)))[name]
        rows = r.get_slice(name, slice(64, 96))
        assert rows.shape == (32, 160) and rows.dtype == torch.float8_e4m3fn
        assert torch.equal(rows.view(torch.uint8), full[64:96].view(torch.uint8))
        assert r.bytes_read == 32 * 160
        block = r.get_slice(name, slice(128, 192), slice(0, 128))  # one 128x128 block (ragged)
        assert torch.equal(block.view(torch.uint8), full[128:192, :128].view(torch.uint8))
        assert r.bytes_read == 32 * 160 + 64 * 128
        bias = "model.layers.2.mlp.gate.e_score_correction_bias"
        part = r.get_slice(bias, slice(4, 8))  # float32: 4 bytes each
        assert part.shape == (4,)
        assert r.bytes_read == 32 * 160 + 64 * 128 + 16


def test_reader_errors_name_file_and_tensor(tiny_fp8_dir, tmp_path):
    with CheckpointReader(tiny_fp8_dir) as r:
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*'nope\.weight'"):
            r.get("nope.weight")
        with pytest.raises(CheckpointError, match="lm_head.weight"):
            r.get_slice("lm_head.weight", slice(0, 2), slice(0, 2), slice(0, 2))
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        CheckpointReader(tmp_path / "absent")
    d = _linked_copy(tiny_fp8_dir, tmp_path / "c")
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = json.loads((d / INDEX).read_text())["weight_map"][name]
    (d / shard).unlink()
    with CheckpointReader(d) as r:
        with pytest.raises(CheckpointError) as ei:
            r.get(name)
        assert shard in str(ei.value) and name in str(ei.value) and "missing" in str(ei.value)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(d)


def test_reader_closes_handles(tiny_fp8_dir):
    r = CheckpointReader(tiny_fp8_dir)
    with r:
        r.get("model.norm.weight")
        assert r._handles
    assert not r._handles


def test_reader_spec_reads_no_data(tiny_fp8_dir):
    with CheckpointReader(tiny_fp8_dir) as r:
        spec = r.spec("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
        assert (spec.shape, spec.dtype) == ((2, 2), "F32")
        assert r.bytes_read == 0


def test_single_file_checkpoint_without_index(tmp_path):
    from ds3dist.checkpoint.synthesize import synthesize

    cfg = preset("tiny").replace(vocab_size=1024)
    d = synthesize(tmp_path / "one", preset=cfg, shards=1, progress=False)
    (d / "model-00001-of-00001.safetensors").rename(d / "model.safetensors")
    (d / INDEX).unlink()
    assert validate(d) == []
    with CheckpointReader(d) as r:
        assert r.shard_of("lm_head.weight") == "model.safetensors"
        assert r.get("lm_head.weight").shape == (1024, 192)
    (d / "model.safetensors").unlink()
    assert "index" in {p.kind for p in validate(d)}
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        CheckpointReader(d)


# ---- corruption helpers ---------------------------------------------------------------------
def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy whose shards and tokenizer are symlinks to src; _rewrite replaces links, never
    writing through them (the session fixture must stay intact)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix == ".safetensors" or p.name == "tokenizer.json":
            (dst / p.name).symlink_to(p)
        else:
            shutil.copyfile(p, dst / p.name)
    return dst


def _index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def _write_index(d: Path, idx: dict) -> None:
    (d / INDEX).write_text(json.dumps(idx))


def _rewrite(d: Path, shard: str, drop=(), put=None, fix_index=True) -> None:
    """Rewrite a shard with safetensors' own writer, dropping and adding/replacing tensors;
    keep the index consistent (weight_map, total_size) unless fix_index is False."""
    tensors = load_file(str(d / shard))
    for n in drop:
        del tensors[n]
    tensors.update(put or {})
    (d / shard).unlink()
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    if fix_index:
        idx = _index(d)
        wm = idx["weight_map"]
        for n in drop:
            wm.pop(n, None)
        for n in put or {}:
            wm[n] = shard
        total = 0
        for n, s in wm.items():
            e = read_header(d / s).entries.get(n)
            total += e.nbytes if e else 0
        idx["metadata"]["total_size"] = total
        _write_index(d, idx)


@pytest.fixture
def ckpt(tiny_fp8_dir, tmp_path):
    return _linked_copy(tiny_fp8_dir, tmp_path / "ckpt")


def _shard(d: Path, name: str) -> str:
    return _index(d)["weight_map"][name]


def kinds(problems: list[Problem]) -> set[str]:
    return {p.kind for p in problems}


def only(problems: list[Problem], kind: str) -> Problem:
    """Assert exactly this kind was found, once; return it."""
    assert kinds(problems) == {kind}, [str(p) for p in problems]
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# ---- one test per corruption kind -----------------------------------------------------------
def test_valid_linked_copy(ckpt):
    assert validate(ckpt) == []


def test_missing_tensor(ckpt):
    name = "model.layers.2.post_attention_layernorm.weight"
    shard = _shard(ckpt, name)
    _rewrite(ckpt, shard, drop=[name])
    p = only(validate(ckpt), "missing_tensor")
    assert p.tensor == name and name in str(p) and "BF16 [192]" in str(p)


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.mlp.extra_proj.weight"
    shard = _shard(ckpt, "model.layers.0.mlp.up_proj.weight")
    _rewrite(ckpt, shard, put={name: torch.zeros(4, 4, dtype=torch.bfloat16)})
    p = only(validate(ckpt), "unexpected_tensor")
    assert (p.file, p.tensor) == (shard, name) and shard in str(p) and name in str(p)


def test_wrong_shape(ckpt):
    name = "model.layers.1.self_attn.kv_a_layernorm.weight"
    shard = _shard(ckpt, name)
    _rewrite(ckpt, shard, put={name: torch.ones(161, dtype=torch.bfloat16)})
    p = only(validate(ckpt), "wrong_shape")
    assert (p.file, p.tensor) == (shard, name)
    assert "[161]" in p.message and "[160]" in p.message and shard in str(p) and name in str(p)


def test_wrong_dtype(ckpt):
    name = "model.layers.1.mlp.gate.weight"
    shard = _shard(ckpt, name)
    _rewrite(ckpt, shard, put={name: torch.zeros(16, 192, dtype=torch.float32)})
    p = only(validate(ckpt), "wrong_dtype")
    assert (p.file, p.tensor) == (shard, name)
    assert "F32" in p.message and "BF16" in p.message and shard in str(p)


def test_fp8_weight_without_scale(ckpt):
    w = "model.layers.2.self_attn.q_b_proj.weight"
    shard = _shard(ckpt, w + "_scale_inv")
    _rewrite(ckpt, shard, drop=[w + "_scale_inv"])
    p = only(validate(ckpt), "missing_scale")
    assert p.tensor == w and w + "_scale_inv" in str(p) and _shard(ckpt, w) in str(p)


def test_scale_without_weight(ckpt):
    w = "model.layers.2.mlp.experts.3.up_proj.weight"
    shard = _shard(ckpt, w)
    _rewrite(ckpt, shard, drop=[w])
    p = only(validate(ckpt), "orphan_scale")
    assert p.tensor == w + "_scale_inv" and shard in str(p) and w in p.message


def test_index_points_at_missing_shard(ckpt):
    shard = "model-00003-of-00004.safetensors"
    first = next(n for n, s in _index(ckpt)["weight_map"].items() if s == shard)
    (ckpt / shard).unlink()
    p = only(validate(ckpt), "missing_shard")
    assert p.file == shard and shard in str(p) and first in str(p)


def test_tensor_in_shard_but_not_in_index(ckpt):
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    idx = _index(ckpt)
    shard = idx["weight_map"].pop(name)  # total_size still counts it: it is in the shard
    _write_index(ckpt, idx)
    p = only(validate(ckpt), "not_in_index")
    assert (p.file, p.tensor) == (shard, name) and shard in str(p) and INDEX in str(p)


def test_index_names_the_wrong_shard(ckpt):
    name = "model.norm.weight"
    idx = _index(ckpt)
    real = idx["weight_map"][name]
    other = next(s for s in set(idx["weight_map"].values()) if s != real)
    idx["weight_map"][name] = other
    _write_index(ckpt, idx)
    p = only(validate(ckpt), "wrong_shard")
    assert p.tensor == name and other in str(p) and real in str(p)


def test_index_names_a_shard_without_the_tensor(ckpt):
    name = "model.norm.weight"
    shard = _shard(ckpt, name)
    _rewrite(ckpt, shard, drop=[name], fix_index=False)
    probs = validate(ckpt)
    assert "not_in_shard" in kinds(probs)
    p = next(p for p in probs if p.kind == "not_in_shard")
    assert (p.file, p.tensor) == (shard, name) and shard in str(p) and name in str(p)
    # the index's total_size no longer matches the data either
    assert kinds(probs) == {"not_in_shard", "total_size"}


def test_duplicate_tensor(ckpt):
    name = "model.norm.weight"
    real = _shard(ckpt, name)
    other = next(s for s in sorted(set(_index(ckpt)["weight_map"].values())) if s != real)
    _rewrite(ckpt, other, put={name: torch.ones(192, dtype=torch.bfloat16)}, fix_index=False)
    p = only(validate(ckpt), "duplicate_tensor")
    assert p.tensor == name and real in str(p) and other in str(p)


def test_corrupt_header_json(ckpt):
    shard = "model-00002-of-00004.safetensors"
    (ckpt / shard).unlink()
    junk = b'{"model.layers.1.x": {"dtype": "BF16", "shape": [2]'  # cut off mid-object
    (ckpt / shard).write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 64)
    probs = validate(ckpt)
    p = next(p for p in probs if p.kind == "corrupt_header")
    assert p.file == shard and shard in str(p) and "JSON" in p.message
    assert kinds(probs) == {"corrupt_header"}  # its tensors are not reported one by one


def test_truncated_header(ckpt):
    shard = "model-00001-of-00004.safetensors"
    head = (ckpt / shard).read_bytes()[:1000]  # length prefix says ~17 kB of JSON
    (ckpt / shard).unlink()
    (ckpt / shard).write_bytes(head)
    p = only(validate(ckpt), "corrupt_header")
    assert p.file == shard and "truncated header" in p.message and shard in str(p)
    (ckpt / shard).write_bytes(b"\x01\x02")  # shorter than the 8-byte length
    p = only(validate(ckpt), "corrupt_header")
    assert "8-byte" in p.message


def test_header_offsets_inconsistent(ckpt):
    name = "model.layers.3.enorm.weight"
    shard = _shard(ckpt, name)
    data = bytearray((ckpt / shard).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    h = json.loads(data[8:8 + n])
    h[name]["shape"] = [193]  # 386 bytes, but the offsets hold 384
    hj = json.dumps(h).encode()
    (ckpt / shard).unlink()
    (ckpt / shard).write_bytes(struct.pack("<Q", len(hj)) + hj + bytes(data[8 + n:]))
    p = only(validate(ckpt), "corrupt_header")
    assert p.tensor == name and "384" in p.message and shard in str(p) and name in str(p)


def test_shard_shorter_than_data_offsets(ckpt):
    shard = "model-00003-of-00004.safetensors"
    hdr = read_header(ckpt / shard)
    last = max(hdr.entries.values(), key=lambda e: e.end).name
    data = (ckpt / shard).read_bytes()
    (ckpt / shard).unlink()
    (ckpt / shard).write_bytes(data[:-100])
    p = only(validate(ckpt), "truncated_shard")
    assert p.file == shard and p.tensor == last and shard in str(p)
    assert str(len(data) - 100) in p.message and str(len(data)) in p.message


def test_total_size_mismatch(ckpt):
    idx = _index(ckpt)
    good = idx["metadata"]["total_size"]
    idx["metadata"]["total_size"] = good + 2
    _write_index(ckpt, idx)
    p = only(validate(ckpt), "total_size")
    assert p.file == INDEX and str(good) in p.message and str(good + 2) in p.message
    del idx["metadata"]["total_size"]
    _write_index(ckpt, idx)
    assert "missing" in only(validate(ckpt), "total_size").message


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    p = only(validate(ckpt), "config")
    assert p.file == "config.json" and "config.json" in str(p)


def test_bad_config_names_the_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["topk_group"] = 7  # n_group is 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    p = only(validate(ckpt), "config")
    assert "topk_group" in p.message and "config.json" in str(p)


def test_bf16_config_on_fp8_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    probs = validate(ckpt)
    assert kinds(probs) == {"unexpected_tensor", "wrong_dtype"}
    n_fp8 = sum(s.dtype == "F8_E4M3" for s in expected_tensors(preset("tiny")).values())
    assert sum(p.kind == "wrong_dtype" for p in probs) == n_fp8
    assert any("quantization_config" in p.message for p in probs)


def test_missing_index(ckpt):
    (ckpt / INDEX).unlink()
    probs = validate(ckpt)
    assert "index" in kinds(probs)
    assert any(INDEX in str(p) for p in probs)


def test_every_problem_at_once(ckpt):
    a, b = "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"
    shard = _shard(ckpt, a)
    assert _shard(ckpt, b) == shard
    _rewrite(ckpt, shard, drop=[a], put={b: torch.ones(192)}, fix_index=False)
    gone = next(s for s in sorted(set(_index(ckpt)["weight_map"].values())) if s != shard)
    (ckpt / gone).unlink()
    probs = validate(ckpt)
    assert kinds(probs) == {"not_in_shard", "missing_shard", "wrong_dtype"}
    assert {p.tensor for p in probs if p.kind != "missing_shard"} == {a, b}


def test_no_directory(tmp_path):
    p = only(validate(tmp_path / "absent"), "no_directory")
    assert "absent" in str(p)


# ---- header-only validation of a full-size release layout ------------------------------------
def _write_header_only(path: Path, specs) -> None:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj)
        f.truncate(8 + len(hj) + off)  # sparse: the data is never written (or read)


def test_validate_full_release_layout_reads_headers_only(tmp_path, monkeypatch):
    """163 sparse shards with the release's 91991 tensors (688.6 GB of apparent data)."""
    from ds3dist.checkpoint.synthesize import plan_shards, shard_name, write_json

    cfg = preset("deepseek_v3")
    table = expected_tensors(cfg)
    groups = plan_shards(list(table.values()), 163)
    wm = {}
    for k, g in enumerate(groups, start=1):
        _write_header_only(tmp_path / shard_name(k, 163), g)
        wm.update({s.name: shard_name(k, 163) for s in g})
    total = sum(s.nbytes for s in table.values())
    write_json(tmp_path / INDEX, {"metadata": {"total_size": total}, "weight_map": wm})
    write_json(tmp_path / "config.json", cfg.to_json_dict())
    assert os.stat(tmp_path / shard_name(1, 163)).st_size > 1e9

    def no_tensor_reads(*a, **k):
        raise AssertionError("validate must not open shards for tensor data")

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    t0 = time.perf_counter()
    assert validate(tmp_path) == []
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, elapsed
    s = summary(tmp_path)
    assert s["tensors"] == 91991 and s["total_bytes"] == total
    assert 670e9 < s["total_params"] - s["components"]["mtp"]["params"] == s["main_params"] < 672e9
    assert 11.4e9 < s["mtp_unique_params"] < 11.7e9


# ---- summary and the inspect CLI -----------------------------------------------------------
def test_summary_components(tiny_fp8_dir):
    s = summary(tiny_fp8_dir)
    cfg = preset("tiny")
    c = s["components"]
    assert s["dense_layers"] == [0] and s["moe_layers"] == [1, 2] and s["mtp_layers"] == [3]
    assert c["embedding"]["params"] == c["head"]["params"] == cfg.vocab_size * cfg.hidden_size
    assert c["routed_experts"]["params"] == 2 * 16 * 3 * 160 * 192
    assert c["shared_experts"]["params"] == 2 * 3 * 160 * 192
    assert c["gate"]["params"] == 2 * (16 * 192 + 16)
    assert c["dense_mlp"]["params"] == 3 * 448 * 192
    table = expected_tensors(cfg)
    assert s["total_bytes"] == sum(t.nbytes for t in table.values())
    assert s["dtypes"]["F8_E4M3"]["tensors"] == sum(t.dtype == "F8_E4M3" for t in table.values())
    assert sum(v["params"] for v in c.values()) == s["total_params"]
    assert s["mtp_unique_params"] == c["mtp"]["params"] - 2 * cfg.vocab_size * cfg.hidden_size


def _inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds3dist.checkpoint.inspect", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_inspect_cli_exit_codes(tiny_fp8_dir, ckpt, tmp_path):
    ok = _inspect(tiny_fp8_dir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for word in ("routed_experts", "shared_experts", "embedding", "attention", "norms", "mtp",
                 "F8_E4M3", "MoE 1,2", "MTP 3", "valid"):
        assert word in ok.stdout
    (ckpt / "model-00002-of-00004.safetensors").unlink()
    bad = _inspect(ckpt)
    assert bad.returncode == 1
    assert "missing_shard" in bad.stdout and "model-00002-of-00004.safetensors" in bad.stdout
    gone = _inspect(tmp_path / "no-such-dir")
    assert gone.returncode == 2 and "no-such-dir" in gone.stderr
